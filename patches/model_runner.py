"""Per-forward eviction bookkeeping around ``sglang.srt.model_executor.model_runner.ModelRunner.forward`` (AROUND).

Every forward of the scheduler's model goes through ``ModelRunner.forward(forward_batch)`` after SGLang built the
batch (positions included, from the logical lengths); decode CUDA graphs are replayed from inside it. With eviction
on, the hook

- starts the window-query capture for extend forwards (the attention hook fills it), numbering the forward so
  eviction uses its own batch's queries only;
- for decode forwards, names the batch positions of laq requests still in their lookahead steps to the decode
  query capture (before the graph replay reads its static index), and after the forward hands each of them its
  queries (:mod:`sgl_evict.engine.lookahead`);
- points the batch at compacted shadow rows with kept lengths (:mod:`sgl_evict.engine.compact_view`), the
  positions a pending laq request hides left out, so FlashInfer and Triton attention, eager or in CUDA graphs,
  read only kept slots, and puts the logical fields back afterwards. A decode batch takes its kept lengths from
  the host's hole counts (:mod:`sgl_evict.engine.hole_counts`: no read back from the device), and one whose
  requests skip nothing reads its logical rows as they are.
"""

from __future__ import annotations

import logging

from sgl_evict.engine.compact_view import enter_compacted, leave_compacted
from sgl_evict.engine.lookahead import pending_positions, record_step
from sgl_evict.engine.runtime import STATE


def forward_around(original, self, forward_batch, *args, **kwargs):
    if not STATE.enabled:
        return original(self, forward_batch, *args, **kwargs)
    if STATE.shadow_offset is None:
        raise RuntimeError("sgl-evict: this model runner's request-to-token pool was built without the shadow rows "
                           "eviction needs (its pool class does not run ReqToTokenPool.__init__)")
    STATE.forward_id += 1
    capture = STATE.capture
    if forward_batch.forward_mode.is_extend() and forward_batch.extend_seq_lens_cpu is not None:
        capture.begin(STATE.forward_id, list(forward_batch.extend_seq_lens_cpu), forward_batch.seq_lens.device)
    rids = getattr(forward_batch, "rids", None)
    positions = pending_positions(rids, STATE.pending)
    decode = forward_batch.forward_mode.is_decode()
    if decode:
        STATE.decode_capture.begin(positions, forward_batch.seq_lens.device)
    views = [(i, STATE.pending[rids[i]].visible) for i in positions]
    kept_cpu = _decode_kept_lengths(forward_batch, rids) if decode else None
    saved = None
    if views or kept_cpu is None or kept_cpu != forward_batch.seq_lens_cpu.tolist():
        saved = enter_compacted(forward_batch, self.req_to_token_pool.req_to_token, STATE.shadow_offset, views,
                                kept_cpu)
    if kept_cpu is not None:
        _count_host_lengths(compacted=saved is not None)
    try:
        result = original(self, forward_batch, *args, **kwargs)
    finally:
        leave_compacted(forward_batch, saved)
        capture.end()
    if decode and positions:
        record_step(rids, positions, STATE.decode_capture.take(), STATE.pending)
    return result


def _decode_kept_lengths(forward_batch, rids) -> list[int] | None:
    """A decode batch's kept lengths from the host's hole counts, or None (a request not counted yet, or no host
    lengths to start from)."""
    if forward_batch.seq_lens_cpu is None:
        return None
    hidden = {rid: entry.hidden for rid, entry in STATE.pending.items()}
    return STATE.holes.kept_lengths(rids, forward_batch.seq_lens_cpu.tolist(), hidden)


def _count_host_lengths(compacted: bool) -> None:
    """Counts decode forwards whose kept lengths came from the host, logged at 1, 10, 100, ... (the GPU end-to-end
    check looks for the line)."""
    STATE.host_length_forwards += 1
    STATE.uncompacted_forwards += not compacted
    n = STATE.host_length_forwards
    if n == 10 ** (len(str(n)) - 1):
        logging.getLogger("sgl_evict").info(
            "sgl-evict: %d decode forwards took their kept lengths from the host's hole counts (%d of them read "
            "their rows uncompacted: nothing skipped)", n, STATE.uncompacted_forwards)
