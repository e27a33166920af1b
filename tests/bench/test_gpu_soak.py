"""bench/gpu/soak.py's CPU-checkable parts: refusals before any server, the server log's checks."""

import json

import pytest

from bench.gpu import soak


@pytest.mark.parametrize("flags, text", [(["--configs", "page1,fa3"], "fa3"), (["--configs", ""], "(none given)"),
                                         (["--overrides", "laq"], "--overrides")])
def test_bad_flags_are_refused_before_any_server_starts(monkeypatch, flags, text):
    monkeypatch.setattr(soak, "check_setup", lambda: pytest.fail("reached the server setup"))
    with pytest.raises(SystemExit) as err:
        soak.main(flags)
    assert text in str(err.value)


def test_log_checks_count_tracebacks_leaks_and_evictions(tmp_path):
    log = tmp_path / "server.log"
    log.write_text("sgl-evict: request a kept 10 of 100 tokens, freed 90 slots, hid 0\n"
                   "Traceback (most recent call last):\nValueError: token_to_kv_pool_allocator memory leak detected!\n")
    checks = soak.log_checks(log)
    assert checks["tracebacks"] == 1 and checks["leak_lines"] == 1 and checks["evictions_logged"] == 1
    log.write_text("sgl-evict: request a kept 10 of 100 tokens, freed 90 slots, hid 0\n")
    assert soak.log_checks(log)["tracebacks"] == soak.log_checks(log)["leak_lines"] == 0


def test_configs_name_their_server_flags():
    assert "--page-size" in soak.CONFIGS["page16"] and "16" in soak.CONFIGS["page16"]
    assert soak.CONFIGS["per_layer"][:2] == ["--attention-backend", "triton"]


@pytest.mark.parametrize("flags, replay_s", [([], soak.REPLAY_S), (["--replay", "0"], 0),
                                             (["--model", "llama-3.2-1b"], 0)])
def test_a_config_without_time_left_is_skipped_saying_what_it_needs(monkeypatch, tmp_path, capsys, flags,
                                                                    replay_s):
    monkeypatch.setattr(soak, "check_setup", lambda: None)
    monkeypatch.setattr(soak, "write_model_config", lambda name: tmp_path / "model")
    monkeypatch.setattr(soak, "write_tiny_llama", lambda path, **kw: tmp_path / "tiny")
    monkeypatch.setattr(soak, "write_soft_tokens", lambda path: tmp_path / "tiny" / "soft.safetensors")
    monkeypatch.setattr(soak, "gpu_query", lambda field: "no GPU")
    monkeypatch.setattr(soak, "ServerProcess", lambda *a, **k: pytest.fail("started a server without time for it"))
    rc = soak.main(["--configs", "per_layer", "--duration", "45", "--deadline", "100", "--out", str(tmp_path),
                    *flags])
    error = json.loads((tmp_path / "soak.json").read_text())["configs"]["per_layer"]["error"]
    assert rc == 1
    assert f"needs {45 + 120 + soak.STOP_MARGIN_S + replay_s} s" in error and "45 s of soak" in error
    assert f"{replay_s} s to replay" in error
    assert error in capsys.readouterr().err


def test_overrides_name_the_policy_their_requests_ran():
    assert soak.effective_policies(["server", "none", "laq@0.1", "snapkv@0.2"]) == {
        "server": "snapkv", "none": "none", "laq@0.1": "laq", "snapkv@0.2": "snapkv"}


def test_the_log_loses_its_keep_set_lines_once_parsed_and_nothing_else(tmp_path):
    log = tmp_path / "server.log"
    log.write_text("a\nsgl-evict: request r keeps positions [0, 1]\nsgl-evict: request r looks ahead on positions [0]\n"
                   "sgl-evict: request r kept 2 of 9 tokens, freed 7 slots, hid 0\nTraceback\n")
    assert soak.slim_log(log) == 2
    assert log.read_text() == "a\nsgl-evict: request r kept 2 of 9 tokens, freed 7 slots, hid 0\nTraceback\n"
    assert soak.log_checks(log)["evictions_logged"] == 1


def test_replay_served_reads_the_log_rebuilds_prompts_and_flags_a_wrong_answer(tmp_path):
    """The driver's replay end to end on CPU: a checkpoint as the GPU host writes it (smaller), a soak's rows and a
    server log made by the harness itself with a known keep-set; the right answer passes, a changed token fails."""
    import time

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from bench.soak import prompt_of
    from bench.soak_replay import _keep_set
    from bench.workloads import AgentMix
    from sgl_evict.harness import EvictionHarness

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=32000, max_position_embeddings=4096, initializer_range=0.2)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "model")
    mix = AgentMix(system_tokens=(40, 60), group_size=2, turns=(2, 3), tool_tokens=(20, 40),
                   instruction_tokens=(2, 4), reply_median=6, reply_sigma=0.5, reply_tokens=(4, 8), think_mean_s=0.0)
    row = dict(rid="soak7-0-0", override="server", session_id=0, turn=0, finished=True, error=None,
               client_abort=False, retractions=0, cached_tokens=0)
    prompt = prompt_of({**row, "output_ids": []}, [{**row, "output_ids": []}], 7, mix, soak.TINY_VOCAB)
    n = len(prompt)
    keep = [0, 1, 2, 3, *range(n // 3, n // 3 + 5), *range(n - 8, n)]
    harness = EvictionHarness(LlamaForCausalLM.from_pretrained(tmp_path / "model").float(), device="cpu")
    state = harness.prefill(torch.tensor([prompt]))
    cache = harness._compressed_cache(state, _keep_set(keep, n, harness))
    served = harness._greedy(cache, int(state.last_logits.argmax()), n, 6)
    log = (f"sgl-evict: request soak7-0-0 keeps positions {keep}\n"
           f"sgl-evict: request soak7-0-0 kept {len(keep)} of {n} tokens, freed {n - len(keep)} slots, hid 0\n")
    rows = [{**row, "prompt_tokens": n, "output_ids": served},
            {**row, "rid": "soak7-0-1", "turn": 1, "prompt_tokens": n + 40, "cached_tokens": n + 6,
             "output_ids": [5, 6]}]

    def run(rows):
        return soak.replay_served(tmp_path / "model", {"requests": rows}, log, ["server"], 7, mix, 10, 0.5,
                                  time.monotonic() + 60, device="cpu")

    good = run(rows)
    assert good["ok"] and good["requests"] == 1 and good["by_policy"] == {"snapkv": 1}
    assert good["left_out"] == {"read a cached prefix": 1} and good["logged"]["evictions"] == 1
    wrong = [served[0], served[1], (served[2] + 1) % 32000, *served[3:]]
    bad = run([{**rows[0], "output_ids": wrong}, rows[1]])
    assert not bad["ok"] and bad["mismatched_requests"][0]["first_mismatch"] == 2


def test_judgeq_requests_go_to_the_page1_server_only_with_its_soft_tokens(tmp_path):
    base = ["server", "none", "laq@0.1"]
    sent, flags = soak.config_overrides("page1", base, tmp_path / "soft.safetensors")
    assert sent == [*base, "judgeq@0.1"] and flags == ["--kv-evict-soft-tokens", str(tmp_path / "soft.safetensors")]
    assert soak.config_overrides("page1", [*base, "judgeq@0.2"], tmp_path)[0] == [*base, "judgeq@0.2"]
    assert soak.config_overrides("page16", [*base, "judgeq@0.2"], tmp_path) == (base, [])  # judgeq: page size 1
    assert soak.config_overrides("page1", base, None) == (base, [])  # dummy weights: no soft tokens
    assert soak.effective_policies([*base, "judgeq@0.1"])["judgeq@0.1"] == "judgeq"


def test_soft_tokens_carry_the_fingerprint_the_server_checks(tmp_path):
    """The file written for the soak's checkpoint loads against the fingerprint the harness (and the server, from
    the same config and embedding table) computes for it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from sgl_evict.soft_tokens import SoftTokens, model_fingerprint

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=300, max_position_embeddings=256)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(tmp_path)
    path = soak.write_soft_tokens(tmp_path)
    hf = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    loaded = SoftTokens.load(path, model_fingerprint(hf.config, hf.get_input_embeddings().weight))
    assert loaded.embeddings.shape == (8, 64) and soak.write_soft_tokens(tmp_path) == path
