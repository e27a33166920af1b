"""bench/gpu/gemma_quality.py's CPU parts: requests, answers, eviction log check, comparison, laq as served."""


import pytest
import torch

from bench.gpu import gemma_quality as gq

EOS = (1, 106)


def test_plan_runs_puts_each_samples_full_cache_first_with_evals_seeds():
    runs = gq.plan_runs(["niah_single", "kv_retrieval"], [1024, 2048], 2, 3, ["snapkv", "laq"], ["0.1", "0.5"])
    assert len(runs) == 2 * 2 * 2 * (1 + 2 * 2)
    assert runs[0] == gq.Run("niah_single", 1024, 3 * 100_003, gq.FULL, gq.FULL)
    assert [r.policy for r in runs[:5]] == [gq.FULL, "snapkv", "snapkv", "laq", "laq"]
    assert runs[5].seed == 3 * 100_003 + 1 and len({r.key for r in runs}) == len(runs)


def test_payload_asks_for_the_runs_policy_in_its_own_namespace():
    run = gq.Run("niah_single", 1024, 7, "dapq", "0.05")
    body = gq.payload(run, [2, 5, 6], 16)
    params = body["sampling_params"]
    assert body["input_ids"] == [2, 5, 6] and params["temperature"] == 0 and params["max_new_tokens"] == 16
    assert params["custom_params"] == {"kv_evict": {"policy": "dapq", "budget": 0.05}}
    assert params["ignore_eos"]  # cut at EOS afterwards, as the harness stops
    full = gq.payload(gq.Run("niah_single", 1024, 7, gq.FULL, gq.FULL), [2], 16)
    assert full["sampling_params"]["custom_params"] == {"kv_evict": {"policy": "none"}}
    assert body["extra_key"] != full["extra_key"]  # no request starts from another's evicted prefix


def test_answers_are_cut_at_eos_and_compared_token_by_token():
    assert gq.answer_tokens([5, 6, 106, 7], 16, EOS) == [5, 6]
    assert gq.answer_tokens([5, 6, 7, 8], 3, EOS) == [5, 6, 7]
    assert gq.first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert gq.first_divergence([1, 2, 3], [1, 9, 3]) == 1
    assert gq.first_divergence([1, 2], [1, 2, 3]) == 2


def test_expected_kept_is_the_budget_or_the_protected_tokens():
    assert gq.expected_kept(4000, "0.5", 4, 512) == 2000
    assert gq.expected_kept(4000, "0.05", 4, 512) == 516  # the sliding window above the budget
    assert gq.expected_kept(500, "0.1", 4, 512) == 500  # covered: not evicted


def test_check_kept_matches_the_logged_evictions_in_order():
    runs = gq.plan_runs(["niah_single"], [1024], 1, 0, ["snapkv"], ["0.05", "0.5", "1.0"])
    key = ("niah_single", 1024, 0)
    lens = {key: 2000}
    logged = [(516, 2000), (1000, 2000)]  # full cache and 1.0 log nothing
    assert gq.check_kept(runs, lens, logged, 512)["ok"]
    assert not gq.check_kept(runs, lens, [(100, 2000), (1000, 2000)], 512)["ok"]
    assert not gq.check_kept(runs, lens, logged[:1], 512)["ok"]
    text = "x sgl-evict: request ab12 kept 516 of 2000 tokens, freed 1484 slots, hid 0\n"
    assert gq.eviction_log(text) == [(516, 2000)]


class FakeServer:
    """Answers with the budget's digits, so each run's answer is recognisable; records the payloads."""

    def __init__(self):
        self.payloads = []

    def generate(self, payload):
        self.payloads.append(payload)
        kv = payload["sampling_params"]["custom_params"]["kv_evict"]
        tokens = [7, 8, 9] if kv["policy"] == "none" else [7, int(kv["budget"] * 100), 1, 5]
        return 0.01, {"output_ids": tokens}


def test_query_server_sends_every_run_in_order_and_cuts_answers():
    runs = gq.plan_runs(["niah_single"], [1024], 1, 0, ["snapkv"], ["0.05", "0.5"])
    server = FakeServer()
    answers = gq.query_server(server, runs, {("niah_single", 1024, 0): [2, 3]}, 16, EOS, progress=lambda _: None)
    assert [p["extra_key"] for p in server.payloads] == [f"gemma-quality:{r.key}" for r in runs]
    assert answers == {runs[0].key: [7, 8, 9], runs[1].key: [7, 5], runs[2].key: [7, 50]}


def test_summary_and_agreement_checks():
    runs = gq.plan_runs(["niah_single"], [1024, 2048], 1, 0, ["snapkv"], ["0.1"])
    server = {r.key: [1, 2] for r in runs}
    harness = {r.key: [1, 2] if r.policy == gq.FULL or r.context == 1024 else [1, 3] for r in runs}
    scores = {(side, r.key): 1.0 if side == "server" else 0.5 for r in runs for side in ("server", "harness")}
    summary = gq.summarize(runs, server, harness, scores)
    assert summary["full@full"] == {"n": 2, "server_accuracy": 1.0, "harness_accuracy": 0.5, "token_agreement": 1.0}
    assert summary["snapkv@0.1"]["token_agreement"] == 0.5 and summary["snapkv@0.1/1024"]["token_agreement"] == 1.0
    checks = gq.agreement_checks(summary, ["snapkv"], ["0.1"], slack=0.2)
    assert [c["ok"] for c in checks.values()] == [False]
    assert all(c["ok"] for c in gq.agreement_checks(summary, ["snapkv"], ["0.1"], slack=0.5).values())


@pytest.fixture(scope="module")
def gemma_harness():
    pytest.importorskip("transformers")
    from tiny_models import tiny_gemma3

    from sgl_evict.harness import EvictionHarness

    harness = EvictionHarness(tiny_gemma3(), window=4, sinks=2, protected_recent=16)
    ids = torch.randint(2, 200, (1, 90), generator=torch.Generator().manual_seed(1))
    return harness, harness.prefill(ids)


def test_laq_as_served_at_full_budget_is_the_full_cache_answer(gemma_harness):
    from sgl_evict import Budget, make_policy

    harness, state = gemma_harness
    full = harness.generate(state, make_policy("none"), Budget(fraction=1.0), max_new_tokens=14).tokens
    assert gq.laq_as_served(harness, state, Budget(fraction=1.0), 14, ()) == full


def test_laq_as_served_decodes_its_lookahead_on_the_snapkv_view(gemma_harness):
    from sgl_evict import Budget, make_policy

    harness, state = gemma_harness
    budget = Budget(tokens=24)
    snap = harness.generate(state, make_policy("snapkv"), budget, max_new_tokens=14).tokens
    served = gq.laq_as_served(harness, state, budget, 14, ())
    assert len(served) == 14 and served[:gq.LOOKAHEAD_STEPS + 1] == snap[:gq.LOOKAHEAD_STEPS + 1]
    assert gq.laq_as_served(harness, state, budget, 5, ()) == snap[:5]  # ends within the lookahead


def test_harness_answers_stop_at_a_sample_boundary_after_the_deadline(gemma_harness):
    harness, _ = gemma_harness
    runs = gq.plan_runs(["t"], [90, 91], 1, 0, ["snapkv"], ["0.5"])
    ids = {(r.task, r.context, r.seed): list(range(2, r.context + 2)) for r in runs}
    everything = gq.harness_answers(harness, runs, ids, 3, EOS, "cpu", progress=lambda _: None)
    assert list(everything) == [r.key for r in runs]
    assert gq.harness_answers(harness, runs, ids, 3, EOS, "cpu", progress=lambda _: None, stop_at=0.0) == {}


def test_harness_answers_run_judgeq_with_the_servers_soft_token_file(gemma_harness, tmp_path):
    from sgl_evict import Budget, make_policy
    from sgl_evict.soft_tokens import SoftTokens, model_fingerprint

    harness, _ = gemma_harness
    model = harness.model
    path = tmp_path / "soft.safetensors"
    hidden = model.config.get_text_config().hidden_size
    SoftTokens(torch.randn(4, hidden, generator=torch.Generator().manual_seed(3)),
               model_fingerprint(model.config.get_text_config(), model.get_input_embeddings().weight)).save(path)
    runs = gq.plan_runs(["t"], [90], 1, 0, ["judgeq"], ["0.3"])
    ids = {(r.task, r.context, r.seed): list(range(2, r.context + 2)) for r in runs}
    got = gq.harness_answers(harness, runs, ids, 6, EOS, "cpu", progress=lambda _: None, soft_tokens=str(path))
    state = harness.prefill(torch.tensor([ids[("t", 90, 0)]]))
    want = harness.generate(state, make_policy("judgeq", soft_tokens_path=str(path)), Budget.parse("0.3"),
                            max_new_tokens=6, eos_token_ids=EOS).tokens
    assert got[runs[1].key] == gq.answer_tokens(want, 6, EOS)
    with pytest.raises(Exception):  # judgeq without the server's file: the harness cannot pick vectors
        gq.harness_answers(harness, runs, ids, 6, EOS, "cpu", progress=lambda _: None)


def test_launch_passes_the_soft_token_file_to_the_server(monkeypatch, tmp_path):
    monkeypatch.setattr(gq, "Server", lambda name, port, args, out: args)
    args = gq.launch(tmp_path, tmp_path, 4096, "/x/soft.safetensors")
    assert args[args.index("--kv-evict-soft-tokens") + 1] == "/x/soft.safetensors"
    assert "--kv-evict-soft-tokens" not in gq.launch(tmp_path, tmp_path, 4096)


def test_plot_and_table_from_the_summary(tmp_path):
    from bench import plot_gemma_quality as pg

    row = lambda s, h, a: {"n": 2, "server_accuracy": s, "harness_accuracy": h, "token_agreement": a}
    doc = {"device": "test", "summary": {"full@full": row(0.6, 0.5, 0.9), "snapkv@0.1": row(0.25, 0.5, 0.5),
                                        "snapkv@0.1/1024": row(0.0, 0.0, 1.0), "laq@0.2": row(0.4, 0.4, 1.0)}}
    table = pg.markdown_table(doc).splitlines()
    assert table[2].startswith("| full cache | 0.60 / 0.50 (0.90)")
    assert table[3] == "| laq | - | 0.40 / 0.40 (1.00) |" and table[4] == "| snapkv | 0.25 / 0.50 (0.50) | - |"
    path = tmp_path / "q.json"
    path.write_text(__import__("json").dumps(doc))
    assert pg.main([str(path), "--png", str(tmp_path / "q.png")]) == 0 and (tmp_path / "q.png").stat().st_size > 0
    path.write_text("{}")
    assert pg.main([str(path)]) == 1


GEMMA_270M = {"num_hidden_layers": 18, "sliding_window": 512,
              "layer_types": ["full_attention" if i % 6 == 5 else "sliding_attention" for i in range(18)]}


def test_per_layer_log_check_counts_group_slots_of_full_and_window_only_groups():
    layout = gq.model_layout(GEMMA_270M, "per_layer", None)  # 18 groups: 3 full-attention, 15 window-only
    assert gq.expected_group_slots(4000, "0.5", 512, layout) == 3 * 2000 + 15 * 512
    six = gq.model_layout(GEMMA_270M, "per_layer", 6)  # 3 groups hold a full-attention layer, 3 slide only
    assert gq.expected_group_slots(4000, "0.05", 512, six) == 3 * 516 + 3 * 512
    assert gq.model_layout(GEMMA_270M, "uniform", None) is None
    with pytest.raises(SystemExit, match="--layer-groups: 4 layer groups do not divide 18 layers"):
        gq.model_layout(GEMMA_270M, "per_layer", 4)
    runs = gq.plan_runs(["niah_single"], [1024], 1, 0, ["snapkv"], ["0.05", "0.5", "1.0"])
    lens = {("niah_single", 1024, 0): 2000}
    text = ("x sgl-evict: request a kept 520 of 2000 tokens in some group (9228 of 36000 group-slots), freed 26772 "
            "group-slots and 1480 logical slots, hid 0\n"
            "x sgl-evict: request b kept 1010 of 2000 tokens in some group (10680 of 36000 group-slots), freed 25320 "
            "group-slots and 990 logical slots, hid 0\n")
    logged = gq.eviction_log(text)
    assert logged == [(9228, 2000), (10680, 2000)]
    assert gq.check_kept(runs, lens, logged, 512, layout)["ok"]
    assert not gq.check_kept(runs, lens, logged, 512)["ok"]  # the uniform count is per token, not per group-slot


def test_kv_fraction_is_the_kept_share_of_layer_token_entries():
    layout = gq.model_layout(GEMMA_270M, "per_layer", None)
    assert gq.kv_fraction(4000, "0.5", 512, None) == 0.5
    assert gq.kv_fraction(4000, "0.5", 512, layout) == (3 * 2000 + 15 * 512) / (18 * 4000)
    assert gq.kv_fraction(4000, gq.FULL, 512, layout) == gq.kv_fraction(500, "0.1", 512, layout) == 1.0


def test_launch_per_layer_runs_the_layered_server_eagerly(monkeypatch, tmp_path):
    monkeypatch.setattr(gq, "Server", lambda name, port, args, out: args)
    args = gq.launch(tmp_path, tmp_path, 4096, granularity="per_layer", layer_groups=6)
    joined = " ".join(args)
    assert "--kv-evict-granularity per_layer --disable-cuda-graph --page-size 1 --kv-evict-layer-groups 6" in joined
    assert "--attention-backend triton" in joined
    assert "--kv-evict-granularity" not in gq.launch(tmp_path, tmp_path, 4096)


def test_harness_answers_select_per_layer_with_the_servers_granularity(gemma_harness):
    from sgl_evict import Budget, make_policy

    harness, _ = gemma_harness
    runs = gq.plan_runs(["t"], [90], 1, 0, ["snapkv"], ["0.3"])
    ids = {(r.task, r.context, r.seed): list(range(2, r.context + 2)) for r in runs}
    got = gq.harness_answers(harness, runs, ids, 6, EOS, "cpu", progress=lambda _: None, granularity="per_layer")
    state = harness.prefill(torch.tensor([ids[("t", 90, 0)]]))
    want = harness.generate(state, make_policy("snapkv"), Budget.parse("0.3"), "per_layer", max_new_tokens=6,
                            eos_token_ids=EOS).tokens
    assert got[runs[1].key] == gq.answer_tokens(want, 6, EOS)
