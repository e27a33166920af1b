"""Query capture in ``sglang.srt.layers.radix_attention.RadixAttention.forward`` (AROUND).

Every attention layer of a model calls ``RadixAttention.forward(q, k, v, forward_batch)`` with post-RoPE queries
packed over the batch's new tokens. During an extend (prefill) forward, the hook copies the rows of each
request's last window (:class:`sgl_evict.engine.capture.WindowQueryCapture`) before attention runs; the policy
scores them against the pool after the forward. Sliding-window layers are not captured: they never see the
evicted prefix anyway.
"""

from __future__ import annotations

from sgl_evict.engine.runtime import STATE


def forward_around(original, self, q, k, v, forward_batch, *args, **kwargs):
    capture = STATE.capture
    if (capture is not None and capture.active and forward_batch.forward_mode.is_extend()
            and self.sliding_window_size == -1):
        capture.record(self.layer_id, q, self.tp_q_head_num, self.qk_head_dim, self.scaling)
    return original(self, q, k, v, forward_batch, *args, **kwargs)
