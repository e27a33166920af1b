"""One-read scoring from the prefill's window LSE, without SGLang: FlashInfer's base-2 LSE turned into the natural
log of the keys the scorer scores (merged over prefix and new keys), the capture handing it out only when attention
saw the scorer's keys, and eviction scoring in one read where it can (the paged kernel through the Triton
interpreter), with the same keep-set as two passes.

SGLang's backend and FlashInfer's wrappers around this: ``tests/sglang/test_plugin_flashinfer_lse.py``.
"""

import logging
import math
from types import SimpleNamespace

import pytest
import torch

from sgl_evict.config import EvictionConfig
from sgl_evict.engine.capture import WindowQueryCapture
from sgl_evict.engine.evict_batch import evict_after_prefill
from sgl_evict.engine.keep import window_scores
from sgl_evict.engine.runtime import EngineState
from sgl_evict.engine.window_lse import LN2, AttentionCall, RecordingWrapper, window_lse
from sgl_evict.holes import HOLE
from sgl_evict.kernels.paged_scoring import attention_mass_paged
from sgl_evict.selection import Budget

HEADS, KV_HEADS, DIM, SCALE = 4, 2, 16, 0.25


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def natural_lse(q, keys, live, positions, scaling=SCALE):
    """``[heads, n]`` natural LSE of queries ``q [heads, n, dim]`` at ``positions [n]`` over the live keys
    ``keys [seq_len, kv_heads, dim]`` (``live [seq_len]`` bool) at or before each query's position (float64)."""
    group = q.shape[0] // keys.shape[1]
    k = keys.double().repeat_interleave(group, dim=1).transpose(0, 1)  # [heads, seq_len, dim]
    logits = scaling * q.double() @ k.transpose(1, 2)  # [heads, n, seq_len]
    seen = live.view(1, -1) & (torch.arange(keys.shape[0]).view(1, -1) <= positions.view(-1, 1))
    return torch.logsumexp(logits.masked_fill(~seen, -math.inf), dim=-1)


def _call(source, lse2, causal, **kw):
    return AttentionCall(source, lse2, causal, kw.get("sm_scale", SCALE), kw.get("logits_soft_cap"),
                         kw.get("window_left", -1), kw.get("backend", "fa2"))


def test_window_lse_turns_flashinfers_base_2_into_natural_log():
    gen = _gen(0)
    keys, q = torch.randn(30, KV_HEADS, DIM, generator=gen), torch.randn(HEADS, 30, DIM, generator=gen)
    positions = torch.arange(30)
    natural = natural_lse(q, keys, torch.ones(30, dtype=torch.bool), positions).T.float()  # [tokens, heads]
    rows = torch.tensor([26, 27, 28, 29])
    for path, source in (("paged", "paged"), ("ragged", "ragged")):
        # FlashInfer returns log2(sum 2^(scale * log2(e) * q.k)) = natural / ln 2
        lse, why = window_lse([_call(source, natural / LN2, True)], path, rows, None, SCALE)
        assert why is None
        torch.testing.assert_close(lse, natural[rows], rtol=1e-6, atol=1e-6)
        assert not torch.allclose(lse, natural[rows] / LN2, atol=1e-2)  # the conversion matters


def test_window_lse_merges_the_prefix_and_the_new_tokens_over_all_their_keys():
    gen = _gen(1)
    prefix, new = 20, 10
    keys = torch.randn(prefix + new, KV_HEADS, DIM, generator=gen)
    q = torch.randn(HEADS, new, DIM, generator=gen)
    live = torch.ones(prefix + new, dtype=torch.bool)
    positions = torch.arange(prefix, prefix + new)
    whole = natural_lse(q, keys, live, positions).T.float()
    # ragged: new tokens, causal among themselves; paged: the prefix, every query sees all of it
    ragged = natural_lse(q, keys[prefix:], live[prefix:], torch.arange(new)).T.float() / LN2
    paged = natural_lse(q, keys[:prefix], live[:prefix], torch.full((new,), prefix)).T.float() / LN2
    rows = torch.arange(6, 10)
    calls = [_call("ragged", ragged, True), _call("paged", paged, False)]
    lse, why = window_lse(calls, "ragged+prefix", rows, torch.ones(4, dtype=torch.bool), SCALE)
    assert why is None
    torch.testing.assert_close(lse, whole[rows], rtol=1e-5, atol=1e-5)
    # a request without a prefix: its rows' paged LSE (whatever FlashInfer left there) is not merged in
    junk = torch.full_like(paged, 7.0)
    alone = natural_lse(q, keys[prefix:], live[prefix:], torch.arange(new)).T.float()
    lse, _ = window_lse([_call("ragged", ragged, True), _call("paged", junk, False)], "ragged+prefix", rows,
                        torch.zeros(4, dtype=torch.bool), SCALE)
    torch.testing.assert_close(lse, alone[rows], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("calls, path, reason", [
    ([("ragged", True, {})], "paged", "not the paged path"),
    ([("ragged", True, {})], "ragged+prefix", "not the ragged+prefix path"),
    ([("paged", False, {})], "paged", "not the paged path"),  # not causal
    ([("paged", True, {"sm_scale": 0.5})], "paged", "attention scale"),
    ([("paged", True, {"logits_soft_cap": 30.0})], "paged", "soft-capping"),
    ([("paged", True, {"window_left": 511})], "paged", "sliding window"),
    ([("ragged", True, {"backend": "cutlass"})], "ragged", "backend 'cutlass'"),  # LSE base not checked
])
def test_window_lse_refuses_calls_that_did_not_attend_the_scorers_keys(calls, path, reason):
    lse2 = torch.zeros(8, HEADS)
    found = [_call(source, lse2, causal, **kw) for source, causal, kw in calls]
    lse, why = window_lse(found, path, torch.arange(4), torch.ones(4, dtype=torch.bool), SCALE)
    assert lse is None and reason in why


def test_recording_wrapper_hands_the_output_through_and_keeps_the_lse():
    out, lse = torch.randn(5, HEADS, DIM), torch.randn(5, HEADS)

    class Wrapper:
        planned = "yes"
        _backend = "fa3"

        def forward(self, *args, **kwargs):
            raise AssertionError("the recording wrapper must run forward_return_lse")

        def forward_return_lse(self, q, kv, **kwargs):
            self.seen = (q, kv, kwargs)
            return out, lse

    wrapper, calls = Wrapper(), []
    recording = RecordingWrapper(wrapper, "paged", calls)
    got = recording.forward("q", "kv", causal=True, sm_scale=SCALE, window_left=-1, logits_soft_cap=0.0)
    assert got is out  # forward's output, the very tensor
    assert wrapper.seen == ("q", "kv", {"causal": True, "sm_scale": SCALE, "window_left": -1,
                                        "logits_soft_cap": 0.0})
    assert recording.forward_return_lse("q", "kv", sm_scale=SCALE) == (out, lse)
    assert [(c.source, c.causal, c.sm_scale, c.window_left, c.backend) for c in calls] == [
        ("paged", True, SCALE, -1, "fa3"), ("paged", False, SCALE, -1, "fa3")]
    assert calls[0].lse is lse and recording.planned == "yes"


def test_capture_hands_out_the_lse_only_for_the_keys_attention_saw():
    window, lens = 4, [6, 2]  # the second request has fewer new tokens than the window
    capture = WindowQueryCapture(window)
    capture.begin(1, lens, "cpu")
    q = torch.randn(sum(lens), HEADS * DIM, generator=_gen(2))
    for layer in (0, 1):
        capture.record(layer, q, HEADS, DIM, SCALE)
    assert capture.wants_lse(0) and not capture.wants_lse(5)
    lse = torch.randn(len(capture.rows), HEADS)
    capture.record_lse(0, lse, [40, 12])
    capture.skip_lse(1, "logit soft-capping")
    found, why = capture.lse_of(1, 12)
    assert torch.equal(found[0], lse.view(2, window, HEADS)[1, window - 2:].T) and set(found) == {0}
    assert why == "layers [1] without LSE (logit soft-capping)"
    found, why = capture.lse_of(0, 39)  # a hole appeared since the forward: the LSE is not that of these keys
    assert found == {} and "attention saw 40 keys" in why
    capture.begin(2, lens, "cpu")  # a new forward forgets the last one's LSE
    assert capture.lse == {} and capture.lse_of(0, 40)[0] == {}


def _request_with_a_compressed_prefix(seed=3, seq_len=48, window=6):
    """A request whose matched prefix has holes, its window queries, and the natural LSE of those queries over
    its live keys (what FlashInfer computes over the compacted row), for two layers."""
    gen = _gen(seed)
    pool = {layer: torch.randn(128, KV_HEADS, DIM, generator=gen) for layer in (0, 1)}
    row = (torch.randperm(127, generator=gen)[:seq_len] + 1).to(torch.int32)
    row[3:20:2] = HOLE
    queries = {layer: torch.randn(HEADS, window, DIM, generator=gen) for layer in (0, 1)}
    positions = torch.arange(seq_len - window, seq_len)
    live = row != HOLE
    lse = {layer: natural_lse(queries[layer], pool[layer][row.clamp_min(0).long()], live, positions).float()
           for layer in (0, 1)}
    return pool, row, queries, lse


def test_one_read_scores_equal_two_pass_scores_on_the_same_keys():
    pool, row, queries, lse = _request_with_a_compressed_prefix()
    scaling = {0: SCALE, 1: SCALE}
    seen = []

    def spy(*args, **kwargs):
        seen.append("row_lse" in kwargs)
        return attention_mass_paged(*args, **kwargs)

    two = window_scores(queries, scaling, pool.__getitem__, row, 7, attention_mass_paged)
    one = window_scores(queries, scaling, pool.__getitem__, row, 7, spy, row_lse=lse)
    assert seen == [True, True]
    torch.testing.assert_close(one, two, rtol=1e-4, atol=1e-6)
    wrong = window_scores(queries, scaling, pool.__getitem__, row, 7, attention_mass_paged,
                          row_lse={layer: value / LN2 for layer, value in lse.items()})  # left in base 2
    assert not torch.allclose(wrong, two, rtol=1e-2)


def _state_with(capture_lse, policy="snapkv", window=6, seq_len=48):
    pool, row, queries, lse = _request_with_a_compressed_prefix(window=window, seq_len=seq_len)
    table = torch.zeros(2, 64, dtype=torch.int32)
    table[1, :seq_len] = row
    state = EngineState()
    state.configure(EvictionConfig(policy=policy, budget=Budget(tokens=12), window=window, sinks=2))
    state.forward_id = 3
    state.capture.begin(3, [seq_len - 20], "cpu")  # a second turn: 20 prefix tokens matched, 28 new
    packed = torch.zeros(seq_len - 20, HEADS * DIM)
    for layer in (0, 1):
        packed[-window:] = queries[layer].transpose(0, 1).reshape(window, HEADS * DIM)
        state.capture.record(layer, packed, HEADS, DIM, SCALE)
        if capture_lse:
            rows = torch.zeros(window, HEADS)
            rows[:] = lse[layer].T
            state.capture.record_lse(layer, rows, [int((row != HOLE).sum())])
    state.capture.end()
    req = SimpleNamespace(rid="r", req_pool_idx=1, cache_protected_len=20, inflight_middle_chunks=0,
                          is_retracted=False, finished=lambda: False,
                          sampling_params=SimpleNamespace(custom_params=None))
    batch = SimpleNamespace(reqs=[req], decoding_reqs=None, seq_lens_cpu=torch.tensor([seq_len]))
    return state, table, pool, batch


@pytest.mark.parametrize("policy", ["snapkv", "laq"])
def test_eviction_scores_in_one_read_with_the_captured_lse_and_keeps_the_two_pass_keep_set(policy, caplog):
    caplog.set_level(logging.INFO, logger="sgl_evict")
    kept = {}
    for capture_lse in (False, True):
        state, table, pool, batch = _state_with(capture_lse, policy)
        calls = []

        def spy(*args, **kwargs):
            calls.append("row_lse" in kwargs)
            return attention_mass_paged(*args, **kwargs)

        evict_after_prefill(batch, state, table, pool.__getitem__, lambda slots: None, spy)
        assert calls == [capture_lse] * 2
        kept[capture_lse] = table[1, :48].clone() if policy == "snapkv" else state.pending["r"].visible
    assert torch.equal(kept[True], kept[False])
    lines = [r.getMessage() for r in caplog.records if "scoring after prefill" in r.getMessage()]
    assert lines[0].startswith("sgl-evict: scoring after prefill: 0 one-read, 0 mixed, 1 two-pass; no window LSE")
    assert lines[1] == "sgl-evict: scoring after prefill: 1 one-read, 0 mixed, 0 two-pass"


def test_dapq_is_scored_in_two_passes_even_with_a_captured_lse(caplog):
    caplog.set_level(logging.INFO, logger="sgl_evict")
    from sgl_evict.rope import RopeSpec

    state, table, pool, batch = _state_with(True, "dapq")
    state.rope = RopeSpec(inv_freq=1.0 / (10000 ** (torch.arange(0, DIM, 2).float() / DIM)))
    calls = []

    def spy(*args, **kwargs):
        calls.append("row_lse" in kwargs)
        return attention_mass_paged(*args, **kwargs)

    evict_after_prefill(batch, state, table, pool.__getitem__, lambda slots: None, spy)
    assert calls == [False, False]
    assert any("1 two-pass; dapq does not score the window queries" in r.getMessage() for r in caplog.records)


def test_the_debug_check_flags_a_wrong_lse(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="sgl_evict")
    monkeypatch.setenv("SGL_EVICT_CHECK_LSE", "1")
    pool, row, queries, lse = _request_with_a_compressed_prefix()
    scaling = {0: SCALE, 1: SCALE}
    window_scores(queries, scaling, pool.__getitem__, row, 7, attention_mass_paged, row_lse=lse)
    assert [r.levelname for r in caplog.records if "one-read check" in r.getMessage()] == ["INFO", "INFO"]
    caplog.clear()
    window_scores(queries, scaling, pool.__getitem__, row, 7, attention_mass_paged,
                  row_lse={0: lse[0] - 0.5, 1: lse[1]})
    assert [r.levelname for r in caplog.records if "one-read check" in r.getMessage()] == ["WARNING", "INFO"]
    caplog.clear()
    off = lse[1].clone()
    off[:, -1] += 0.1  # one query of six, a little off: its row's mass is 10% too small
    window_scores(queries, scaling, pool.__getitem__, row, 7, attention_mass_paged, row_lse={0: lse[0], 1: off})
    assert [r.levelname for r in caplog.records if "one-read check" in r.getMessage()] == ["INFO", "WARNING"]
