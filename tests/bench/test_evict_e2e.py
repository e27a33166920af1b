"""bench/gpu/evict_e2e.py: reading a tensor-parallel server's log rank by rank, which servers start, and the scoring
mode checks (one read with the prefill's window LSE on FlashInfer, two passes on Triton)."""

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[2]
from bench.gpu import evict_e2e as e2e

TP_LOG = """[2026-11-24 01:00:00 TP0] sgl-evict: request a keeps positions [0, 1, 5]
[2026-11-24 01:00:00 TP1] sgl-evict: request a keeps positions [0, 1, 5]
[2026-11-24 01:00:00 TP1] sgl-evict: request a kept 3 of 50 tokens, freed 47 slots, hid 0
[2026-11-24 01:00:00 TP0] sgl-evict: request a kept 3 of 50 tokens, freed 47 slots, hid 0
[2026-11-24 01:00:01 TP0] sgl-evict: request b keeps positions [0, 2]
[2026-11-24 01:00:01 TP1] sgl-evict: request b keeps positions [0, 3]
"""


def test_a_tp_log_is_read_rank_by_rank(tmp_path):
    log = tmp_path / "server.log"
    log.write_text(TP_LOG)
    assert e2e.eviction_lines(log) == [(3, 50, 47, 0)]  # rank 0's line only, not both ranks'
    assert e2e.logged_keep_sets(log, 0) == [[0, 1, 5], [0, 2]]
    assert e2e.logged_keep_sets(log, 1) == [[0, 1, 5], [0, 3]]
    single = tmp_path / "single.log"
    single.write_text("[2026-11-24 01:00:00] sgl-evict: request a kept 3 of 50 tokens, freed 47 slots, hid 0\n")
    assert e2e.eviction_lines(single) == [(3, 50, 47, 0)]


def test_ranks_that_keep_different_positions_fail_the_check(tmp_path):
    log = tmp_path / "server.log"
    log.write_text(TP_LOG)
    checks = {}
    e2e.check_ranks_agree("snapkv-tp2", SimpleNamespace(log_path=log), [[1], [2]], checks)
    assert checks["snapkv-tp2: both TP ranks keep the same positions"]["ok"] is False
    log.write_text(TP_LOG.replace("[0, 3]", "[0, 2]"))
    e2e.check_ranks_agree("snapkv-tp2", SimpleNamespace(log_path=log), [[1], [2]], checks)
    assert checks["snapkv-tp2: both TP ranks keep the same positions"]["ok"] is True
    e2e.check_ranks_agree("snapkv-tp2", SimpleNamespace(log_path=log), [[1], [2], [3]], checks)
    assert checks["snapkv-tp2: both TP ranks keep the same positions"]["ok"] is False  # an eviction missing


def _record_launch_environments(monkeypatch) -> dict:
    """Makes ``e2e.launch`` start nothing (a server is its args, with no stagger) and returns the dict it fills
    with each server's environment at launch."""
    seen = {}

    def server(name, port, args, out):
        seen[name] = dict(os.environ)
        return args
    monkeypatch.setattr(e2e, "Server", server)
    monkeypatch.setattr(e2e, "STAGGER_S", 0)
    return seen


def test_two_gpu_servers_start_only_when_named(monkeypatch, tmp_path):
    monkeypatch.setattr(e2e, "Server", lambda name, port, args, out: args)
    monkeypatch.setattr(e2e, "STAGGER_S", 0)
    default = e2e.launch(tmp_path, tmp_path, set())
    assert "plain" in default and not any(name.endswith("-tp2") for name in default)
    named = e2e.launch(tmp_path, tmp_path, {"snapkv-tp2", "plain-tp2"})
    assert set(named) == {"snapkv-tp2", "plain-tp2"}
    args = named["snapkv-tp2"]
    assert args[args.index("--tp") + 1] == "2" and "--kv-evict-policy" in args


LAYERED_LOG = """[2026-11-24 01:00:00] sgl-evict: request a kept 120 of 700 tokens in some group (280 of 2800 group-slots), freed 2520 group-slots and 580 logical slots, hid 0
[2026-11-24 01:00:01] sgl-evict: request b kept 150 of 1100 tokens in some group (440 of 4400 group-slots), freed 3960 group-slots and 950 logical slots, hid 0
"""


def test_layered_evictions_are_checked_group_slot_by_group_slot(tmp_path, monkeypatch):
    log = tmp_path / "server.log"
    log.write_text(LAYERED_LOG)
    assert e2e.layered_eviction_lines(log) == [(120, 700, 280, 2800, 2520, 580, 0), (150, 1100, 440, 4400, 3960, 950, 0)]
    assert e2e.eviction_lines(log) == []  # the uniform line's pattern does not read the layered one
    monkeypatch.setattr(e2e, "greedy", lambda server, ids, custom=None: {"meta_info": {"cached_tokens": 700}})
    monkeypatch.setattr(e2e, "PROMPT_LENS", (700, 1100))
    ps, answers = [[1] * 700, [1] * 1100], {"layered-snapkv": [{"output_ids": [5, 6]}, {"output_ids": [7]}]}
    checks = {}
    e2e.check_layered_server("layered-snapkv", SimpleNamespace(log_path=log), ps, answers, checks, groups=4)
    assert all(c["ok"] for c in checks.values()), checks
    log.write_text(LAYERED_LOG.replace("280 of 2800", "276 of 2800"))  # one group kept less than the budget
    e2e.check_layered_server("layered-snapkv", SimpleNamespace(log_path=log), ps, answers, checks, groups=4)
    assert not checks["layered-snapkv: every group kept the budget of each prompt, every dropped group-slot freed"]["ok"]


def test_layered_servers_start_only_when_named(monkeypatch, tmp_path):
    monkeypatch.setattr(e2e, "Server", lambda name, port, args, out: args)
    monkeypatch.setattr(e2e, "STAGGER_S", 0)
    assert not any("layered" in name or name == "plain-tr-eager" for name in e2e.launch(tmp_path, tmp_path, set()))
    named = e2e.launch(tmp_path, tmp_path, {"layered-g1-full", "plain-tr-eager"})
    args = named["layered-g1-full"]
    assert args[args.index("--kv-evict-granularity") + 1] == "per_layer"
    assert args[args.index("--kv-evict-layer-groups") + 1] == "1" and "--disable-cuda-graph" in args
    assert args[args.index("--attention-backend") + 1] == "triton"
    assert "--kv-evict-policy" not in named["plain-tr-eager"] and "--disable-cuda-graph" in named["plain-tr-eager"]


SCORING_LOG = """[2026-11-24 01:00:00] sgl-evict: one-read check: layer 0, max difference 3.10e-04 of the largest mass, head totals off by 2.00e-05
[2026-11-24 01:00:00] sgl-evict: one-read check: layer 1, max difference 1.20e-03 of the largest mass, head totals off by 6.00e-04
[2026-11-24 01:00:00] sgl-evict: scoring after prefill: 1 one-read, 0 mixed, 0 two-pass
[2026-11-24 01:00:01] sgl-evict: scoring after prefill: 2 one-read, 0 mixed, 0 two-pass
"""


def test_the_scoring_mode_of_every_prefill_batch_is_checked(tmp_path):
    log = tmp_path / "server.log"
    log.write_text(SCORING_LOG)
    assert e2e.scoring_lines(log) == [(1, 0, 0), (2, 0, 0)]
    assert e2e.one_read_check_errors(log) == [3.1e-4, 1.2e-3]
    server = SimpleNamespace(log_path=log)
    checks = {}
    e2e.check_scoring_mode("snapkv-fi", server, checks)
    assert checks["snapkv-fi: every prefill batch scored one-read"]["ok"]
    assert checks["snapkv-fi: one-read scores equal two-pass scores (SGL_EVICT_CHECK_LSE=1)"]["ok"]
    e2e.check_scoring_mode("snapkv-tr", server, checks)  # Triton must score in two passes
    assert not checks["snapkv-tr: every prefill batch scored two-pass"]["ok"]
    log.write_text(SCORING_LOG.replace("6.00e-04", "4.00e-02") + "[x] sgl-evict: scoring after prefill: 0 one-read, "
                   "0 mixed, 1 two-pass; no window LSE captured (the attention backend is not FlashInfer) (x1)\n")
    e2e.check_scoring_mode("snapkv-fi", server, checks)
    assert not checks["snapkv-fi: every prefill batch scored one-read"]["ok"]
    assert not checks["snapkv-fi: one-read scores equal two-pass scores (SGL_EVICT_CHECK_LSE=1)"]["ok"]
    log.write_text("")
    e2e.check_scoring_mode("dapq", server, checks)  # no line at all: not a pass
    assert not checks["dapq: every prefill batch scored two-pass"]["ok"]


def test_the_lse_checked_servers_run_with_the_debug_check(monkeypatch, tmp_path):
    envs = {}

    def server(name, port, args, out):
        envs[name] = {k: os.environ.get(k) for k in ("SGL_EVICT_CHECK_LSE",)}
        return args

    monkeypatch.setattr(e2e, "Server", server)
    monkeypatch.setattr(e2e, "STAGGER_S", 0)
    e2e.launch(tmp_path, tmp_path, set())
    # the servers launched by default (no --only) among those checked
    checked = {name for name, env in envs.items() if env["SGL_EVICT_CHECK_LSE"] == "1"}
    assert checked == set(e2e.LSE_CHECKED) & set(envs)
    named_only = {"snapkv-tp2", "laq-tp2", "snapkv-fa3", "snapkv-page64", "snapkv-fp8"} | {
        f"{name}-overlap" for name in e2e.OVERLAP_TWINS} | set(e2e.PAGED_OTHER_BACKENDS)
    assert set(e2e.SCORING_MODES) - named_only <= set(envs)
    envs.clear()
    e2e.launch(tmp_path, tmp_path, {"snapkv-page64", "snapkv-fp8"})  # named: launched; FP8 is two-pass, unchecked
    assert envs == {"snapkv-page64": {"SGL_EVICT_CHECK_LSE": "1"}, "snapkv-fp8": {"SGL_EVICT_CHECK_LSE": None}}


def test_a_laq_reserve_is_checked_as_two_evictions(tmp_path, monkeypatch):
    log = tmp_path / "server.log"
    monkeypatch.setattr(e2e, "PROMPT_LENS", (10, 10, 10, 1000))

    def greedy(server, ids, custom=None):  # the server logs the request's evictions as it answers
        assert custom == {"kv_evict": {"policy": "laq", "lookahead_reserve": 2}}
        log.write_text(log.read_text() + lines)
        return {"meta_info": {"cached_tokens": 0}}
    monkeypatch.setattr(e2e, "greedy", greedy)
    name = "snapkv-fi: a laq request with a reserve of 2 holds twice the budget through its lookahead"
    for lines, ok in (("sgl-evict: request r kept 200 of 1000 tokens, freed 800 slots, hid 0\n"
                       "sgl-evict: request r kept 100 of 1000 tokens, freed 100 slots, hid 0\n", True),
                      ("sgl-evict: request r kept 100 of 1000 tokens, freed 900 slots, hid 0\n", False)):
        log.write_text("")
        checks = {}
        e2e.check_laq_reserve_override(SimpleNamespace(log_path=log), [[1]] * 4, checks)
        assert checks[name]["ok"] is ok, checks


@pytest.mark.parametrize("tag, flag, value", [("fa3", "--attention-backend", "fa3"),
                                              ("fp8", "--kv-cache-dtype", "fp8_e4m3")])
def test_fa3_and_fp8_servers_start_only_when_named_without_an_opt_in(monkeypatch, tmp_path, tag, flag, value):
    """fa3 (issue 22 item 1) and an FP8 KV cache (item 4): plain, budget 1.0 and 10% servers, launched only when
    named, as a user launches them (both verified: no opt-in)."""
    seen = _record_launch_environments(monkeypatch)
    assert not any(name.endswith(f"-{tag}") for name in e2e.launch(tmp_path, tmp_path, set()))
    named = e2e.launch(tmp_path, tmp_path, {f"plain-{tag}", f"full-{tag}", f"snapkv-{tag}"})
    assert all(args[args.index(flag) + 1] == value for args in named.values())
    assert not any(key.startswith("SGL_EVICT_UNVERIFIED") for env in seen.values() for key in env)
    assert seen[f"plain-{tag}"]["SGLANG_PLUGINS"] and "SGL_EVICT_LOG_KEEP" in seen[f"snapkv-{tag}"]


def test_keep_set_jaccard_pairs_the_first_turn_prompts_in_order(tmp_path):
    def log(name, sets):
        path = tmp_path / f"{name}.log"
        path.write_text("".join(f"sgl-evict: request r{i} keeps positions {json.dumps(s)}\n"
                                for i, s in enumerate(sets)))
        return SimpleNamespace(log_path=path, name=name)
    ours, theirs = log("snapkv-fa3", [[0, 1, 2], [0, 5, 9], [4]]), log("snapkv-fi", [[0, 1, 2], [0, 5, 8], [4]])
    assert e2e.keep_set_jaccard(ours, theirs, 2) == [1.0, 0.5]


def test_the_keep_set_check_compares_prompt_by_prompt_and_answers_where_equal(tmp_path):
    def log(path, sets):
        path.write_text("".join(f"sgl-evict: request r{i} keeps positions {json.dumps(s)}\n"
                                for i, s in enumerate(sets)))
        return SimpleNamespace(log_path=path, name=path.stem)
    fi = log(tmp_path / "snapkv-fi.log", [[0, 1, 2], [0, 5, 9]])
    ids = {"snapkv-fi": [[1, 2], [3, 4]], "snapkv-fa3": [[1, 2], [3, 5]]}
    checks = {}
    e2e.check_same_keep_sets("snapkv-fa3", log(tmp_path / "snapkv-fa3.log", [[0, 1, 2], [0, 5, 9]]), fi,
                             [[7], [8]], ids, checks)
    keep, answers = checks.values()
    assert keep["ok"] and not answers["ok"]  # same keep-sets, but the second answer differs
    ids["snapkv-fa3"][1] = [3, 4]
    checks = {}
    e2e.check_same_keep_sets("snapkv-fa3", log(tmp_path / "snapkv-fa3.log", [[0, 1, 2], [0, 5, 8]]), fi,
                             [[7], [8]], ids, checks)
    keep, answers = checks.values()
    assert not keep["ok"] and keep["jaccard"][1] == 0.5 and answers["ok"] and answers["prompts"] == [0]


class _LoggingServer:
    """Stands in for a server run with SGL_EVICT_LOG_KEEP=1: each request appends its eviction lines, and
    ``batch`` requests at a time share one scoring line (what one prefill batch logs)."""

    def __init__(self, tmp_path, name, batch, keep):
        self.name, self.batch, self.keep, self.count = name, batch, keep, 0
        self.log_path = tmp_path / f"{name}.log"
        self.log_path.write_text("")

    def generate(self, payload):
        n = len(payload["input_ids"])
        with self.log_path.open("a") as log:
            self.count += 1
            if self.count % self.batch == 0:
                log.write(f"sgl-evict: scoring after prefill: {self.batch} one-read, 0 mixed, 0 two-pass\n")
            log.write(f"sgl-evict: request {self.name}{self.count} keeps positions {self.keep(n)}\n")
            log.write(f"sgl-evict: request {self.name}{self.count} kept 3 of {n} tokens, freed {n - 3} slots, "
                      "hid 0\n")
        return 0.0, {"output_ids": [1], "meta_info": {}}


def test_the_batched_scoring_check_pairs_keep_sets_by_length_and_needs_a_batch(tmp_path):
    checks = {}
    same = _LoggingServer(tmp_path, "ref", 1, lambda n: [0, 1, n - 1])
    e2e.check_batched_scoring(_LoggingServer(tmp_path, "batched", 4, lambda n: [0, 1, n - 1]), same, checks)
    (name, check), = checks.items()
    assert check["ok"] and check["requests_per_prefill_batch"] == [4] and check["equal"] == 4
    # one request per prefill batch: nothing batched, so nothing checked
    checks.clear()
    e2e.check_batched_scoring(_LoggingServer(tmp_path, "alone", 1, lambda n: [0, 1, n - 1]), same, checks)
    assert not next(iter(checks.values()))["ok"]
    # a batched keep-set that differs in a third of its positions
    checks.clear()
    e2e.check_batched_scoring(_LoggingServer(tmp_path, "wrong", 2, lambda n: [0, 2, n - 1]), same, checks)
    assert not next(iter(checks.values()))["ok"]


def test_expected_kept_is_what_the_selector_keeps_with_pages_of_1_16_and_64():
    """The page-64 server (issue 22 item 5) keeps more than the budget where the protected pages outnumber it."""
    import torch

    from sgl_evict.config import EvictionConfig
    from sgl_evict.engine.keep import keep_mask
    from sgl_evict.selection import Budget

    for page in (1, 16, 64):
        for n in (*e2e.PROMPT_LENS, 764, 130):
            for budget in (e2e.BUDGET, 0.5):
                config = EvictionConfig(policy="snapkv", budget=Budget.parse(str(budget)), window=e2e.WINDOW,
                                        sinks=e2e.SINKS, page_granular=page > 1)
                kept = keep_mask(torch.rand(n, generator=torch.Generator().manual_seed(n)), config,
                                 torch.arange(1, n + 1, dtype=torch.int32), page)
                assert int(kept.sum()) == e2e.expected_kept(n, budget, page), (page, n, budget)
    assert e2e.page_size_of("snapkv-page64") == 64 and e2e.page_size_of("snapkv-fi") == 1
    assert e2e.page_size_of("snapkv-page16-overlap") == 16


def test_overlap_servers_start_only_when_named_and_are_checked_against_twins_that_turn_it_off(
        monkeypatch, tmp_path):
    """Issue 22 item 2: the -overlap servers run SGLang's overlap scheduler as eviction leaves it by default (no
    opt-in) and are checked against the same setting with ``--disable-overlap-schedule``; a log without the
    scheduler on (or a reference with it on) fails the check."""
    seen = _record_launch_environments(monkeypatch)
    twins = {f"{name}-overlap" for name in e2e.OVERLAP_TWINS}
    names = {"full-overlap", "snapkv-overlap", "laq-overlap"} | twins
    assert not names & set(e2e.launch(tmp_path, tmp_path, set()))
    launched = e2e.launch(tmp_path, tmp_path, names | set(e2e.OVERLAP_TWINS))
    assert set(launched) == names | set(e2e.OVERLAP_TWINS)
    assert all("SGL_EVICT_EXPERIMENTAL_OVERLAP" not in seen[n] and seen[n]["SGL_EVICT_CHECK_KEPT"] == "1"
               for n in names)
    assert all("--disable-overlap-schedule" not in launched[n] for n in names)
    for twin in twins:  # a twin is its reference's launch without the flag, and both log their keep-sets
        reference = twin.removesuffix("-overlap")
        assert launched[reference] == [*launched[twin], "--disable-overlap-schedule"]
        assert seen[reference].get("SGL_EVICT_LOG_KEEP") == "1" and seen[twin] == seen[reference]
        assert e2e.SCORING_MODES.get(twin) == e2e.SCORING_MODES.get(reference)
        assert (twin in e2e.LSE_CHECKED) == (reference in e2e.LSE_CHECKED)

    def up(name, on):
        path = tmp_path / f"{name}.log"
        path.write_text(f"server_args=ServerArgs(disable_overlap_schedule={not on})\n")
        return SimpleNamespace(log_path=path, name=name)
    ids = {"plain": [[1, 2]], "full-overlap": [[1, 2]]}
    for on in (True, False):
        checks = {}
        e2e.check_overlap({"plain": up("plain", True), "full-overlap": up("full-overlap", on)}, [[7]], {}, ids,
                          checks)
        assert checks == {"full-overlap: SGLang's overlap scheduler on": {"ok": on},
                          "full-overlap == plain SGLang, token for token": {"ok": True}}
    compared = []
    monkeypatch.setattr(e2e, "check_server", lambda name, *a: None)
    monkeypatch.setattr(e2e, "check_same_keep_sets", lambda name, server, ref, *a: compared.append((name, ref.name)))
    for reference_on in (False, True):  # the reference must have run without the scheduler
        checks = {}
        e2e.check_overlap({"dapq": up("dapq", reference_on), "dapq-overlap": up("dapq-overlap", True)}, [[7]], {},
                          {}, checks)
        assert checks["dapq: SGLang's overlap scheduler off"] == {"ok": not reference_on}
    assert compared == [("dapq-overlap", "dapq")] * 2


def test_the_host_lengths_check_reads_the_line_the_plugin_logs(monkeypatch):
    import logging

    from sgl_evict.engine.runtime import STATE
    from sgl_evict.patches import model_runner

    logged = []
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())
    logger = logging.getLogger("sgl_evict")
    monkeypatch.setattr(logger, "level", logging.INFO)
    monkeypatch.setattr(STATE, "host_length_forwards", 0)
    logger.addHandler(handler)
    try:
        for _ in range(10):
            model_runner._count_host_lengths(compacted=True)
    finally:
        logger.removeHandler(handler)
    assert len(logged) == 2 and all(e2e.HOST_LENGTHS in line for line in logged)  # at the 1st and the 10th


def test_kv_memory_reads_the_pool_sglang_logged_and_the_slots_each_prompt_kept(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"num_hidden_layers": 4, "num_key_value_heads": 4,
                                                   "hidden_size": 512, "num_attention_heads": 8}))
    ps = [[1] * 700, [2] * 1100]

    def server(name, dtype, gb, evictions):
        path = tmp_path / f"{name}.log"
        path.write_text(f"[t] KV Cache is allocated. dtype: torch.{dtype}, #tokens: 40000, K size: {gb} GB, "
                        f"V size: {gb} GB\n" + "".join(f"sgl-evict: request r kept {k} of {n} tokens, freed "
                                                      f"{n - k} slots, hid 0\n" for k, n in evictions))
        return SimpleNamespace(log_path=path, name=name)
    plain = e2e.kv_memory(server("plain", "bfloat16", 0.08, []), ps, model)
    assert plain["bytes_per_token"] == 4 * 4 * 64 * 2 * 2 and plain["kept_slots"] == [700, 1100]
    assert plain["kv_bytes_held"] == 4096 * 1800 and plain["dtype"] == "bfloat16"
    assert plain["pool_gb_from_bytes_per_token"] == round(40000 * 4096 / 2**30, 4)
    both = e2e.kv_memory(server("snapkv-fp8", "float8_e4m3fn", 0.04, [(70, 700), (5, 33), (110, 1100)]), ps, model)
    assert both["bytes_per_token"] == 2048 and both["kept_slots"] == [70, 110]  # a 33-token request is not a prompt
    assert both["kv_bytes_held"] * 20 == plain["kv_bytes_held"]  # half the bytes, a tenth of the tokens
    (tmp_path / "broken.log").write_text("no pool line\n")
    assert "error" in e2e.kv_memory(SimpleNamespace(log_path=tmp_path / "broken.log"), ps, model)


def test_paged_triton_and_fa3_servers_and_the_fa3_fp8_page64_overlap_twins_start_only_when_named(
        monkeypatch, tmp_path):
    seen = _record_launch_environments(monkeypatch)
    paged = set(e2e.PAGED_OTHER_BACKENDS)
    references = {"snapkv-fa3", "snapkv-fp8", "snapkv-page64"}
    twins = {f"{name}-overlap" for name in references}
    assert not (paged | twins | references) & set(e2e.launch(tmp_path, tmp_path, set()))
    launched = e2e.launch(tmp_path, tmp_path, paged | twins | references)
    for name, (backend, page) in e2e.PAGED_OTHER_BACKENDS.items():
        args = launched[name]
        assert args[args.index("--attention-backend") + 1] == backend and e2e.page_size_of(name) == page
        assert args[args.index("--page-size") + 1] == str(page) and seen[name]["SGL_EVICT_EXPERIMENTAL_PAGES"] == "1"
        assert e2e.SCORING_MODES[name] == "two-pass"
    for twin in twins:  # verified with the overlap scheduler: no opt-in any more
        reference = twin.removesuffix("-overlap")
        assert "SGL_EVICT_EXPERIMENTAL_OVERLAP" not in seen[twin] | seen[reference]
        assert launched[reference] == [*launched[twin], "--disable-overlap-schedule"]


class _ConversationServer:
    """A stand-in restore server: each generate call is one turn, logging what the plugin logs for it."""

    def __init__(self, tmp_path, carry: bool):
        self.name, self.log_path, self.turn, self.carry = "snapkv-restore", tmp_path / "restore.log", 0, carry
        self.log_path.write_text("")

    def generate(self, payload):
        lines = []
        if self.turn == 2 and self.carry:
            lines.append("sgl-evict: request r2 brought back 4 tokens the previous turn kept, before its prefill")
        if self.turn:
            lines.append(f"sgl-evict: request r{self.turn} restored {3 + self.turn} of its 30 held-out tokens from "
                         f"host memory{'; its last prompt token runs next, over them' if self.carry else ''}")
        with self.log_path.open("a") as log:
            log.write("".join(f"[2026-12-07 20:00:0{self.turn}] {line}\n" for line in lines))
        cached = 0 if self.turn == 0 else len(payload["input_ids"]) - 1
        self.turn += 1
        return None, {"output_ids": [7] * e2e.NEW_TOKENS, "meta_info": {"cached_tokens": cached}}


@pytest.mark.parametrize("carry", [True, False])
def test_the_restore_check_reads_a_three_turn_conversation_from_the_log(tmp_path, carry):
    checks, report = {}, {}
    e2e.check_restore_server("snapkv-restore", _ConversationServer(tmp_path, carry), checks, report)
    assert checks["snapkv-restore: later turns hit the radix cache"]["ok"]
    assert checks["snapkv-restore: later turns restored held-out tokens after their prefill"]["ok"]
    assert report["snapkv-restore_conversation"]["restored"] == [(4, 30), (5, 30)]
    assert checks["snapkv-restore: the third turn brought back the second's before its prefill"]["ok"] is carry
    assert checks["snapkv-restore: later turns ran their last prompt token after the restore"]["ok"] is carry
    # each later prompt: the previous prompt, its answer but the last token (cached by the overlap scheduler
    # alone), then 40 new tokens
    lens = [t["prompt_len"] for t in report["snapkv-restore_conversation"]["turns"]]
    assert lens == [e2e.PROMPT_LENS[0] + k * (e2e.NEW_TOKENS - 1 + 40) for k in range(3)]
    # the lines read are the ones the plugin writes
    source = (ROOT / "sgl_evict" / "engine" / "evict_batch.py").read_text()
    assert "restored %d of its %d held-out tokens from host memory%s" in source
    assert "; its last prompt token runs next, over them" in source
    assert "brought back %d tokens the previous turn" in (ROOT / "patches" / "scheduler.py").read_text()


def test_restore_servers_start_only_when_named(monkeypatch, tmp_path):
    _record_launch_environments(monkeypatch)
    assert not any("restore" in name for name in e2e.launch(Path("/m"), tmp_path, set()))
    servers = e2e.launch(Path("/m"), tmp_path, {"snapkv-restore", "snapkv-restore-overlap"})
    assert "--kv-evict-host-pool-gb" in servers["snapkv-restore"]
    assert "--disable-overlap-schedule" in servers["snapkv-restore"]  # the twin's reference
    assert "--disable-overlap-schedule" not in servers["snapkv-restore-overlap"]


def test_the_continuation_server_starts_only_when_named_and_is_compared_with_the_harness_variant(
        monkeypatch, tmp_path):
    _record_launch_environments(monkeypatch)
    assert "laprox-cont3" not in e2e.launch(Path("/m"), tmp_path, set())
    args = e2e.launch(Path("/m"), tmp_path, {"laprox-cont3"})["laprox-cont3"]
    assert args[args.index("--kv-evict-continuation") + 1] == "3"
    policy = e2e.harness_policy("laprox+continuation=3", [])
    assert policy.name == "laprox" and policy.continuation == 3
    assert e2e.harness_policy("laprox", []).continuation == 0


def test_servers_answers_are_scored_under_the_keep_sets_they_logged(tmp_path):
    """A server that decoded on the keep-set it logged passes; one whose answers came from the full cache (a
    backend ignoring the holes, say) fails."""
    import torch
    from tiny_models import tiny_llama

    from sgl_evict import Budget, make_policy
    from sgl_evict.harness import EvictionHarness
    from sgl_evict.selection import KeepSet

    tiny_llama().save_pretrained(tmp_path)
    model = type(tiny_llama())  # the same class, loaded as compare_with_harness loads it
    harness = EvictionHarness(model.from_pretrained(tmp_path, dtype=torch.bfloat16), window=e2e.WINDOW,
                              sinks=e2e.SINKS, device="cpu")
    ids = [int(x) for x in torch.randint(3, 200, (120,), generator=torch.Generator().manual_seed(4))]
    logged = [*range(4), *range(40, 48), *range(120 - e2e.WINDOW, 120)]  # sinks, a span, the window
    state = harness.prefill(torch.tensor([ids]))
    heads = state.cache.layers[harness.layers[0]].keys.shape[1]
    keep = KeepSet.uniform(logged, len(harness.layers), heads, len(ids))
    tokens = harness._greedy(harness._compressed_cache(state, keep), int(state.last_logits.argmax()), len(ids), 8)

    def body(policy, fraction, kept=None):
        lps = harness.token_logprobs(state, make_policy(policy), Budget(fraction=fraction), "uniform", tokens, kept)
        return {"output_ids": tokens, "meta_info": {"output_token_logprobs": [(lp, t, None)
                                                                              for lp, t in zip(lps, tokens)]}}

    answers = {"snapkv-tr-page16": [body("snapkv", 0.1, keep)], "snapkv-fa3-page16": [body("none", 1.0)]}
    checks, report = {}, {}
    e2e.compare_with_harness(tmp_path, [ids], answers, checks, report,
                             {name: [logged] for name in answers}, device="cpu")
    name = "{}: answer scored by the harness closer under its logged keep-set than under the full cache"
    assert checks[name.format("snapkv-tr-page16")]["ok"]
    assert not checks[name.format("snapkv-fa3-page16")]["ok"]
    assert report["harness_logprob_gap_under_logged_keep_sets"]["snapkv-tr-page16"]["logged_keep_set"] < 1e-3
