"""Eviction under SGLang's overlap scheduler: which results must be processed before the next forward launches.

The overlap scheduler (``Scheduler.event_loop_overlap``) launches forward ``N+1`` before it processes the result
of forward ``N``, and eviction runs while a result is processed. Left alone, a request's first decode step would
read its whole prompt (launched before its prefill's result evicted), a laq request's last lookahead queries would
be scored before their forward ran, and the window queries of a prefill would be those of the next one. SGLang
already processes a result first when the next batch needs it (``is_disable_overlap_for_batch``: two prefills in a
row, grammar); :func:`must_process_first` adds the batches whose results evict. Every other step, decode steps
of requests already evicted above all, keeps the overlap. Each request then sees exactly the caches it would see
without the overlap scheduler.
"""

from __future__ import annotations

from sgl_evict.engine.evict_batch import evicts_now
from sgl_evict.engine.runtime import EngineState


def lookahead_done(state: EngineState) -> bool:
    """Whether a pending laq request has launched all its lookahead steps: the result of the last of them evicts."""
    for entry in state.pending.values():
        config = entry.config if entry.config is not None else state.config_of(entry.req)
        if entry.decoded >= config.lookahead_steps:
            return True
    return False


def must_process_first(unprocessed, state: EngineState) -> bool:
    """Whether the result of ``unprocessed`` must be processed before the next forward launches, because processing
    it evicts: it finished a prompt that evicts (or its chunk cut one token short, ``engine/last_token.py``), or it
    ran a pending laq request's last lookahead step.

    ``unprocessed`` is the batch as it was launched (the copy SGLang queues with its result; None: nothing queued),
    not ``Scheduler.last_batch``: by the time the next launch is decided, ``get_next_batch_to_run`` has merged the
    last prefill batch into the running batch, often as that very object, and turned it into a decode batch.
    """
    if not state.enabled or unprocessed is None:
        return False
    if lookahead_done(state):
        return True
    if not unprocessed.forward_mode.is_extend():
        return False
    return any(evicts_now(req, unprocessed, i) and state.config_of(req).enabled
               for i, req in enumerate(unprocessed.reqs))
