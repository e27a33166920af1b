"""bench/soak_replay.py: served answers replayed on the HF harness with the logged keep-sets (a tiny random Llama on
CPU stands in for the server: its answers are decoded step by step, the replay scores them teacher-forced)."""

import asyncio

import pytest
import torch
from stub_sglang import StubSGLang

from bench import soak
from bench.soak_replay import LoggedEvictions, ReplayCase, pick_cases, replay, replay_case, why_not_replayable
from bench.workloads import AgentMix

N, STEPS = 60, 3


@pytest.fixture(scope="module")
def harness():
    from transformers import LlamaConfig, LlamaForCausalLM

    from sgl_evict.harness import EvictionHarness

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=200, max_position_embeddings=512, initializer_range=0.2)
    return EvictionHarness(LlamaForCausalLM(cfg).float(), window=4, sinks=2, device="cpu")


def _served(harness, prompt, keep, new_tokens=12, lookahead=None, steps=0):
    """What a correct server answers: greedy, step by step, on the prefill's last logits, then (laq) ``steps``
    tokens on the lookahead view, then on the kept prompt with the answer's KV as it was computed."""
    from bench.soak_replay import _cat_answer, _keep_set

    state = harness.prefill(torch.tensor([prompt]))
    first = int(state.last_logits.argmax())
    if lookahead is None:
        cache = harness._compressed_cache(state, _keep_set(keep, N, harness))
        return harness._greedy(cache, first, N, new_tokens)
    view = harness._compressed_cache(state, _keep_set(lookahead, N, harness))
    tokens = harness._greedy(view, first, N, steps + 1)  # steps forwards on the view
    cache = harness._compressed_cache(state, _keep_set(keep, N, harness))
    cache = _cat_answer(harness, cache, view, len(lookahead))
    while len(tokens) < new_tokens:
        logits = harness._extend(cache, torch.tensor([N + len(tokens) - 1]),
                                 input_ids=torch.tensor([[tokens[-1]]]))
        tokens.append(int(logits[-1].argmax()))
    return tokens


PROMPT = [int(x) for x in torch.randint(0, 200, (N,), generator=torch.Generator().manual_seed(1))]
KEEP = [0, 1, 7, 13, 20, 31, 44, 56, 57, 58, 59]
VIEW = [0, 1, 3, 13, 25, 31, 40, 56, 57, 58, 59]


def test_a_correct_answer_replays_with_no_mismatch(harness):
    out = _served(harness, PROMPT, KEEP)
    r = replay_case(harness, ReplayCase("a", "snapkv", PROMPT, out, KEEP))
    assert r["mismatches"] == 0 and r["tokens"] == 12 and r["max_gap"] < 1e-4 and r["kept"] == len(KEEP)


def test_a_laq_answer_replays_through_its_lookahead_view_and_not_without_it(harness):
    out = _served(harness, PROMPT, KEEP, lookahead=VIEW, steps=STEPS)
    r = replay_case(harness, ReplayCase("l", "laq", PROMPT, out, KEEP, VIEW, STEPS))
    assert r["mismatches"] == 0 and r["max_gap"] < 1e-4
    # the same tokens scored as if decoded on the final keep-set all along differ: the view matters here
    plain = replay_case(harness, ReplayCase("l", "laq", PROMPT, out, KEEP), tol=1e-3)
    assert plain["max_gap"] > 1e-3


def test_a_per_layer_answer_replays_with_each_group_s_keep_set(harness):
    """A per_layer server logs one list per layer group (here 2 groups of the 2 layers): each layer is replayed
    with its group's positions, not with one list for all."""
    from bench.soak_replay import _keep_set

    state = harness.prefill(torch.tensor([PROMPT]))
    cache = harness._compressed_cache(state, _keep_set([KEEP, VIEW], N, harness))
    out = harness._greedy(cache, int(state.last_logits.argmax()), N, 12)
    r = replay_case(harness, ReplayCase("p", "snapkv", PROMPT, out, [KEEP, VIEW]))
    assert r["mismatches"] == 0 and r["max_gap"] < 1e-4 and r["kept"] == [len(KEEP), len(VIEW)]
    assert replay_case(harness, ReplayCase("p", "snapkv", PROMPT, out, KEEP), tol=1e-3)["max_gap"] > 1e-3
    with pytest.raises(ValueError, match="layer groups"):
        _keep_set([KEEP, VIEW, KEEP], N, harness)


def test_a_corrupted_answer_is_caught_at_the_token_that_went_wrong(harness):
    out = _served(harness, PROMPT, KEEP)
    from bench.soak_replay import reference_logprobs

    logp = reference_logprobs(harness, ReplayCase("a", "snapkv", PROMPT, out, KEEP))
    bad = list(out)
    bad[5] = int(logp[5].argmin())  # what a read of the wrong KV could make the server say
    r = replay_case(harness, ReplayCase("a", "snapkv", PROMPT, bad, KEEP))
    assert r["mismatches"] >= 1 and r["first_mismatch"] == 5
    # the full cache is not the cache these tokens were decoded with: far apart
    assert replay_case(harness, ReplayCase("a", "none", PROMPT, out, None))["max_gap"] > 0.5
    report = replay(harness, [ReplayCase("a", "snapkv", PROMPT, out, KEEP),
                              ReplayCase("b", "snapkv", PROMPT, bad, KEEP)])
    assert not report["ok"] and [r["rid"] for r in report["mismatched_requests"]] == ["b"]
    assert report["requests"] == 2 and report["by_policy"] == {"snapkv": 2}


LOG = """
[2026-12-07] sgl-evict: request r1 keeps positions [0, 1, 5]
[2026-12-07] sgl-evict: request r1 kept 3 of 9 tokens, freed 6 slots, hid 0
[2026-12-07] sgl-evict: request r2 looks ahead on positions [0, 2, 8]
[2026-12-07] sgl-evict: request r2 keeps positions [0, 3, 8]
[2026-12-07] sgl-evict: request r2 kept 3 of 9 tokens, freed 6 slots, hid 0
[2026-12-07] sgl-evict: request r3 keeps positions [0, 1]
[2026-12-07] sgl-evict: request r3 kept 2 of 9 tokens, freed 7 slots, hid 0
[2026-12-07] sgl-evict: request r3 keeps positions [0, 1, 12]
[2026-12-07] sgl-evict: request r3 kept 3 of 13 tokens, freed 10 slots, hid 0
[2026-12-07] sgl-evict: request r5 keeps per group [[0, 1, 8], [0, 2, 8]]
[2026-12-07] sgl-evict: request r5 kept 4 of 9 tokens in some group (6 of 18 group-slots), freed 12 group-slots
"""


def _row(rid, override, **kw):
    row = dict(rid=rid, override=override, session_id=0, turn=0, prompt_tokens=9, finished=True, error=None,
               client_abort=False, retractions=0, cached_tokens=0, output_ids=[5, 6, 7])
    row.update(kw)
    return row


def test_only_requests_whose_caches_the_log_fully_gives_are_replayed():
    logged = LoggedEvictions.parse(LOG)
    assert logged.keeps["r2"] == [[0, 3, 8]] and logged.lookahead == {"r2": [[0, 2, 8]]}
    assert logged.lengths["r3"] == [9, 13]
    assert logged.keeps["r5"] == [[[0, 1, 8], [0, 2, 8]]] and logged.lengths["r5"] == [9]
    assert why_not_replayable(_row("r5", "server"), "snapkv", logged) is None
    assert why_not_replayable(_row("r1", "server"), "snapkv", logged) is None
    assert why_not_replayable(_row("r2", "laq@0.1"), "laq", logged) is None
    assert why_not_replayable(_row("r4", "none"), "none", logged) is None
    assert "retracted" in why_not_replayable(_row("r1", "server", retractions=1), "snapkv", logged)
    assert "cached prefix" in why_not_replayable(_row("r1", "server", cached_tokens=64), "snapkv", logged)
    assert "aborted" in why_not_replayable(_row("r1", "server", client_abort=True), "snapkv", logged)
    assert "2 logged evictions" in why_not_replayable(_row("r3", "server"), "snapkv", logged)
    assert "lookahead" in why_not_replayable(_row("r1", "laq@0.1"), "laq", logged)
    assert "policy is none" in why_not_replayable(_row("r1", "none"), "none", logged)
    rows = [_row("r1", "server"), _row("r2", "laq@0.1"), _row("r3", "server"), _row("r4", "none")]
    policies = {"server": "snapkv", "laq@0.1": "laq", "none": "none"}
    cases, skipped = pick_cases(rows, policies, logged, lambda row: [1] * 9, sample=10, seed=0, lookahead_steps=8)
    by_rid = {c.rid: c for c in cases}
    assert set(by_rid) == {"r1", "r2", "r4"} and sum(skipped.values()) == 1
    assert by_rid["r2"].lookahead == [0, 2, 8] and by_rid["r2"].steps == 8 and by_rid["r1"].steps == 0
    assert by_rid["r4"].keep is None and by_rid["r1"].keep == [0, 1, 5]
    assert len(pick_cases(rows, policies, logged, lambda row: [1] * 9, 2, 0, 8)[0]) == 2


def test_the_soak_sends_request_ids_and_rebuilds_every_prompt_it_sent():
    """prompt_of gives, for each row, the exact prompt the server received under that row's rid (later turns hold
    the earlier answers), which is what the replay feeds the harness."""
    mix = AgentMix(system_tokens=(20, 40), group_size=2, turns=(2, 4), tool_tokens=(5, 20),
                   instruction_tokens=(2, 4), reply_median=6, reply_sigma=0.5, reply_tokens=(2, 12),
                   think_mean_s=0.05)
    vocab = (100, 5000)
    stub = StubSGLang(ttft_s=0.02, token_s=0.005)
    try:
        result = asyncio.run(soak.run_soak(stub.port, 2.0, 4.0, 5, mix, ["server", "none"], 0.0, 0, 0,
                                           stub.CONTEXT, vocab, idle_timeout_s=10.0, settle_s=2.0))
    finally:
        stub.close()
    rows = result["requests"]
    assert len(rows) >= 4 and any(r["turn"] > 0 for r in rows)
    assert {r["rid"] for r in rows} == set(stub.prompts_by_rid)
    for row in rows:
        assert soak.prompt_of(row, rows, 5, mix, vocab) == stub.prompts_by_rid[row["rid"]]
