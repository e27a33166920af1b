"""Eviction under SGLang's overlap scheduler (sgl_evict.engine.overlap): which results are processed before the next
launch, and a laq request driven in the overlap scheduler's order ending with the keep-set it gets without it.

The loop below is ``Scheduler.event_loop_overlap``'s order (SGLang 0.5.17): build the next batch, ask
``is_disable_overlap_for_batch`` (SGLang's answer, or ours), if so process the last result, launch the batch, then
process the last result if it was not processed yet.
"""

from collections import deque
from types import SimpleNamespace

import pytest
import torch
from test_engine_laq import LAYERS, STEPS, Setup, _harness_mask

from sgl_evict.config import EvictionConfig
from sgl_evict.engine.lookahead import pending_positions, record_step
from sgl_evict.engine.overlap import must_process_first
from sgl_evict.engine.runtime import STATE, EngineState
from sgl_evict.holes import HOLE
from sgl_evict.policies import make_policy
from sgl_evict.selection import Budget

EXTEND = SimpleNamespace(is_extend=lambda: True)
DECODE = SimpleNamespace(is_extend=lambda: False)


def _req(rid, custom=None, middle_chunks=0):
    return SimpleNamespace(rid=rid, inflight_middle_chunks=middle_chunks, is_retracted=False, finished=lambda: False,
                           sampling_params=SimpleNamespace(custom_params=custom))


def _state(policy="snapkv"):
    state = EngineState()
    state.configure(EvictionConfig(policy=policy, budget=Budget(tokens=10)) if policy else EvictionConfig())
    return state


def _batch(mode, *reqs):
    return SimpleNamespace(forward_mode=mode, reqs=list(reqs), decoding_reqs=None)


def test_a_prefill_whose_prompt_evicts_is_processed_before_the_next_launch():
    assert must_process_first(_batch(EXTEND, _req("a")), _state())


@pytest.mark.parametrize("why, state, batch", [
    ("no batch launched", _state(), None),
    ("a server without eviction", _state(None), _batch(EXTEND, _req("a"))),
    ("a middle chunk: its prompt is not done", _state(), _batch(EXTEND, _req("a", middle_chunks=1))),
    ("a request that turned eviction off", _state(), _batch(EXTEND, _req("a", {"kv_evict": {"policy": "none"}}))),
    ("a decode step with no lookahead ending", _state("laq"), _batch(DECODE, _req("a"))),
])
def test_batches_whose_result_evicts_nothing_keep_the_overlap(why, state, batch):
    assert not must_process_first(batch, state), why


def _run_overlapped(setup, steps, overlap_rule=must_process_first):
    """Runs ``steps`` decode steps of the Setup's two requests in the overlap scheduler's order (after the prefill
    was processed); returns, per launch, whether request ``a`` was still pending (its lookahead view) then."""
    decode = _batch(DECODE, *setup.reqs)
    state, unprocessed, pending_at_launch = setup.state, 0, []

    def launch(step):
        for i, req in enumerate(setup.reqs):
            setup.table[req.req_pool_idx, setup.lens[i] + step] = setup.decode_slots[2 * step + i]
        positions = pending_positions(["a", "b"], state.pending)
        taken = {layer: setup.lookahead_q[layer][step:step + 1] for layer in LAYERS} if positions else {}
        record_step(["a", "b"], positions, taken, state.pending)
        pending_at_launch.append(bool(positions))

    for step in range(steps):
        if unprocessed and overlap_rule(decode, state):
            setup.finish_lookahead()
            unprocessed -= 1
        launch(step)
        unprocessed += 1
        if unprocessed == 2:  # the overlap: the previous result, processed while this forward runs
            setup.finish_lookahead()
            unprocessed -= 1
    for _ in range(unprocessed):
        setup.finish_lookahead()
    return pending_at_launch


def test_laq_in_the_overlap_order_decodes_exactly_its_lookahead_steps_and_keeps_the_harness_set():
    setup = Setup()
    setup.prefill()
    assert _run_overlapped(setup, STEPS + 2) == [True] * STEPS + [False] * 2
    expected = _harness_mask(setup, make_policy("laq", pooling_kernel=5, lookahead_steps=STEPS))
    assert torch.equal(setup.table[1, :40] != HOLE, expected) and "a" not in setup.state.pending


def test_without_the_rule_a_step_past_the_lookahead_runs_on_its_view_and_the_keep_set_changes():
    setup = Setup()
    setup.prefill()
    expected = _harness_mask(setup, make_policy("laq", pooling_kernel=5, lookahead_steps=STEPS))
    # a step past STEPS whose queries point at a token laq drops: scoring it would keep that token
    dropped = int((~expected).nonzero()[len(expected) // 4])
    setup.lookahead_q = {layer: torch.cat((q, 20 * setup.pools[layer][setup.row_a[dropped]].repeat_interleave(
        q.shape[1] // setup.pools[layer].shape[1], 0)[None])) for layer, q in setup.lookahead_q.items()}
    assert _run_overlapped(setup, STEPS + 2, lambda *_: False) == [True] * (STEPS + 1) + [False]
    assert setup.table[1, dropped] != HOLE  # the extra step was scored


def test_a_result_is_not_evicted_before_its_last_step_was_processed():
    setup = Setup()
    setup.prefill()
    for step in range(STEPS):  # every step launched, none processed: the last one's queries do not exist yet
        record_step(["a", "b"], [0], {layer: setup.lookahead_q[layer][step:step + 1] for layer in LAYERS},
                    setup.state.pending)
    assert setup.finish_lookahead() == 0 and "a" in setup.state.pending  # the first step's result
    assert must_process_first(_batch(DECODE, *setup.reqs), setup.state)  # the rest before the next launch


def test_the_scheduler_hook_judges_the_queued_launch_time_batch_not_last_batch(monkeypatch):
    from sgl_evict.patches.scheduler import is_disable_overlap_for_batch_around

    monkeypatch.setattr(STATE, "config", _state().config)
    launched = _batch(EXTEND, _req("a"))
    last_batch = _batch(DECODE, *launched.reqs)  # what get_next_batch_to_run turned the prefill batch into
    queued = SimpleNamespace(result_queue=deque([(launched, None)]))
    sglang_says_no, sglang_says_yes = (lambda *a, **k: False), (lambda *a, **k: True)
    assert is_disable_overlap_for_batch_around(sglang_says_no, queued, None, last_batch=last_batch)
    assert is_disable_overlap_for_batch_around(sglang_says_no, queued, None, last_batch)
    nothing_queued = SimpleNamespace(result_queue=deque())
    assert not is_disable_overlap_for_batch_around(sglang_says_no, nothing_queued, None, last_batch=None)
    assert is_disable_overlap_for_batch_around(sglang_says_yes, nothing_queued, None, last_batch=None)


@pytest.mark.parametrize("overlap", [True, False])
def test_result_hooks_wait_for_their_forward_under_the_overlap_scheduler_only(monkeypatch, overlap):
    from sgl_evict.patches import lookahead, scheduler

    order = []
    monkeypatch.setattr(STATE, "config", _state("laq").config)
    monkeypatch.setattr(STATE, "pending", {"a": object()})
    monkeypatch.setattr(STATE, "soft_tokens", None)
    monkeypatch.setattr(lookahead, "evict_after_lookahead", lambda *a, **k: order.append("evict"))
    monkeypatch.setattr(scheduler, "evict_after_prefill", lambda *a, **k: order.append("evict"))
    monkeypatch.setattr(lookahead, "pool_arguments", lambda _: {})
    monkeypatch.setattr(scheduler, "pool_arguments", lambda _: {})
    monkeypatch.setattr(scheduler, "layered_allocator", lambda _: None)
    allocator = SimpleNamespace(get_kvcache=lambda: SimpleNamespace(get_value_buffer=None))
    processor = SimpleNamespace(enable_overlap=overlap, token_to_kv_pool_allocator=allocator,
                                req_to_token_pool=SimpleNamespace(req_to_token=None))
    result = SimpleNamespace(copy_done=SimpleNamespace(synchronize=lambda: order.append("wait")))
    batch = SimpleNamespace(reqs=[], seq_lens_cpu=[])
    for hook in (lookahead.process_batch_result_decode_around, scheduler.process_batch_result_prefill_around):
        order.clear()
        hook(lambda *a: order.append("sglang"), processor, batch, result)
        assert order == (["wait", "evict", "sglang"] if overlap else ["evict", "sglang"])
