"""Holes counted on the host (sgl_evict.engine.hole_counts): decode forwards take their kept lengths from the counts
the prefill and lookahead hooks keep, with no read back from the device, and equal the rows' own."""

from types import SimpleNamespace

import pytest
import torch
from test_engine_laq import STEPS, Setup

from sgl_evict.engine import compact_view
from sgl_evict.engine.hole_counts import HoleCounts, count_holes
from sgl_evict.engine.runtime import STATE
from sgl_evict.holes import HOLE

DECODE = SimpleNamespace(is_extend=lambda: False, is_decode=lambda: True)


def test_count_holes_counts_only_inside_each_length():
    table = torch.tensor([[5, HOLE, 6, HOLE, HOLE], [HOLE, 7, 8, 9, 10]], dtype=torch.int32)
    assert count_holes(table, [0, 1, 0], [3, 5, 5]) == [1, 1, 3]
    assert count_holes(table, [], []) == []


def test_kept_lengths_need_every_request_counted_and_take_off_what_a_view_hides():
    counts = HoleCounts()
    table = torch.tensor([[5, HOLE, 6, 7], [1, 2, 3, 4]], dtype=torch.int32)
    counts.recount([SimpleNamespace(rid="a", req_pool_idx=0), SimpleNamespace(rid="b", req_pool_idx=1)], table,
                   [4, 4])
    assert counts.kept_lengths(["b", "a"], [6, 9], {}) == [6, 8]
    assert counts.kept_lengths(["b", "a"], [6, 9], {"b": 2}) == [4, 8]
    assert counts.kept_lengths(["a", "c"], [6, 9], {}) is None  # c not counted yet: the device counts
    counts.forget("a")
    assert counts.kept_lengths(["a"], [9], {}) is None and len(counts) == 1


def _use_setup_state(monkeypatch, setup):
    for name in ("config", "capture", "decode_capture", "pending", "shadow_offset", "holes"):
        monkeypatch.setattr(STATE, name, getattr(setup.state, name))


def _decode(monkeypatch, setup, step, check=True):
    """One decode forward of both Setup requests through the model-runner hook; returns (kept lengths the
    attention saw, the kept_cpu the hook handed to the compacted view, or 'skipped')."""
    from sgl_evict.patches import model_runner

    if check:
        monkeypatch.setenv("SGL_EVICT_CHECK_KEPT", "1")
    for i, req in enumerate(setup.reqs):
        setup.table[req.req_pool_idx, setup.lens[i] + step] = setup.decode_slots[2 * step + i]
    lens = [n + step + 1 for n in setup.lens]
    fb = SimpleNamespace(batch_size=2, forward_mode=DECODE, req_pool_indices=torch.tensor([1, 2]), rids=["a", "b"],
                         seq_lens=torch.tensor(lens), seq_lens_cpu=torch.tensor(lens), seq_lens_sum=sum(lens))
    handed, seen = {}, {}

    def enter(*args, **kwargs):
        handed["kept_cpu"] = args[4] if len(args) > 4 else kwargs.get("kept_cpu")
        return compact_view.enter_compacted(*args, **kwargs)
    monkeypatch.setattr(model_runner, "enter_compacted", enter)

    def model_forward(runner, batch):
        seen["lens"] = batch.seq_lens.tolist()
        seen["rows"] = batch.req_pool_indices.tolist()
    runner = SimpleNamespace(req_to_token_pool=SimpleNamespace(req_to_token=setup.table))
    model_runner.forward_around(model_forward, runner, fb)
    STATE.decode_capture.take()
    return seen, handed.get("kept_cpu", "skipped")


def test_after_the_prefill_hook_counts_decode_steps_read_nothing_back_and_see_the_rows_lengths(monkeypatch):
    from sgl_evict.patches.scheduler import count_prefill_holes

    setup = Setup()
    _use_setup_state(monkeypatch, setup)
    setup.prefill()
    seen, handed = _decode(monkeypatch, setup, 0)
    assert handed is None  # nothing counted yet: the device's lengths, read back
    count_prefill_holes(SimpleNamespace(reqs=setup.reqs, seq_lens_cpu=torch.tensor(setup.lens)), setup.table)
    before = STATE.host_length_forwards
    expected, handed = _decode(monkeypatch, setup, 1)
    assert STATE.host_length_forwards == before + 1
    visible = STATE.pending["a"].visible
    assert handed == [int(visible.sum()) + 2, 30 - 20 + 2] == expected["lens"]  # checked against the rows too


def test_a_wrong_count_is_caught_by_the_debug_check(monkeypatch):
    setup = Setup()
    _use_setup_state(monkeypatch, setup)
    setup.prefill()
    STATE.holes.recount(setup.reqs, setup.table, [10, 10])  # counted over too short a prefix: too few holes
    with pytest.raises(RuntimeError, match="kept lengths counted on the host"):
        _decode(monkeypatch, setup, 0)


def test_a_batch_whose_requests_skip_nothing_reads_its_logical_rows(monkeypatch):
    setup = Setup(budget=100)  # nothing evicted: b keeps all; a (laq) pending with a view hiding nothing
    _use_setup_state(monkeypatch, setup)
    setup.prefill()
    STATE.pending.clear()
    STATE.holes.recount(setup.reqs, setup.table, setup.lens)
    seen, handed = _decode(monkeypatch, setup, 0)
    assert handed == "skipped" and seen["rows"] == [1, 2] and seen["lens"] == [41, 31]


def test_the_lookahead_hook_counts_the_holes_of_the_requests_it_evicts_and_the_free_hook_forgets(monkeypatch):
    from sgl_evict.patches import lookahead as hooks
    from sgl_evict.patches.scheduler import count_prefill_holes

    setup = Setup()
    _use_setup_state(monkeypatch, setup)
    setup.prefill()
    count_prefill_holes(SimpleNamespace(reqs=setup.reqs, seq_lens_cpu=torch.tensor(setup.lens)), setup.table)
    allocator = SimpleNamespace(get_kvcache=lambda: SimpleNamespace(get_key_buffer=setup.pools.__getitem__),
                                free=setup.freed.append, page_size=1)
    processor = SimpleNamespace(server_args=SimpleNamespace(tp_size=1), token_to_kv_pool_allocator=allocator,
                                req_to_token_pool=SimpleNamespace(req_to_token=setup.table))
    for step in range(STEPS):
        seen, handed = _decode(monkeypatch, setup, step)
        assert handed == seen["lens"]  # (no queries recorded here: a's final keep-set is its snapkv view)
        hooks.process_batch_result_decode_around(lambda *a: None, processor, SimpleNamespace(reqs=setup.reqs), None)
    assert "a" not in STATE.pending
    seen, handed = _decode(monkeypatch, setup, STEPS)  # a evicted to its budget: counted, checked
    assert handed == seen["lens"] == [10 + STEPS + 1, 10 + STEPS + 1]
    hooks.req_row_free_before(None, setup.reqs[0])
    assert STATE.holes.kept_lengths(["a"], [50], {}) is None


def test_the_prefill_hook_counts_after_sglangs_processing_which_may_write_the_trees_holes(monkeypatch):
    from sgl_evict.patches import scheduler

    setup = Setup(budget=100)  # nothing evicted here
    _use_setup_state(monkeypatch, setup)
    monkeypatch.setattr(STATE, "soft_tokens", None)
    monkeypatch.setattr(scheduler, "pool_arguments", lambda _: {})
    monkeypatch.setattr(scheduler, "evict_after_prefill", lambda *a, **k: 0)
    monkeypatch.setattr(scheduler, "layered_allocator", lambda _: None)
    allocator = SimpleNamespace(get_kvcache=lambda: SimpleNamespace(get_value_buffer=None))
    processor = SimpleNamespace(token_to_kv_pool_allocator=allocator,
                                req_to_token_pool=SimpleNamespace(req_to_token=setup.table))
    finished = SimpleNamespace(rid="c", req_pool_idx=3, finished=lambda: True)

    def process(self, batch, result):  # SGLang's radix insert: the tree's entries, with its holes, over a's prefix
        setup.table[1, 2:5] = HOLE
    batch = SimpleNamespace(reqs=[*setup.reqs, finished], seq_lens_cpu=torch.tensor([*setup.lens, 8]))
    scheduler.process_batch_result_prefill_around(process, processor, batch, None)
    assert STATE.holes.kept_lengths(["a", "b"], [41, 31], {}) == [41 - 3, 31]
    assert STATE.holes.kept_lengths(["c"], [9], {}) is None  # finished: not counted
