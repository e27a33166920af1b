"""Query capture in ``sglang.srt.layers.radix_attention.RadixAttention.forward`` (AROUND).

Every attention layer of a model calls ``RadixAttention.forward(q, k, v, forward_batch)`` with post-RoPE queries
packed over the batch's new tokens. Before attention runs, the hook copies

- during an extend (prefill) forward, the rows of each request's last window
  (:class:`sgl_evict.engine.capture.WindowQueryCapture`); the policy scores them against the pool after the forward;
- during a decode forward, the rows of the laq requests still in their lookahead steps
  (:class:`sgl_evict.engine.capture.DecodeQueryCapture`). Decode forwards replay CUDA graphs, where this hook
  does not run: at capture it records a gather into static buffers, which every replay repeats.

Sliding-window layers are not captured: they never see the evicted prefix anyway.
"""

from __future__ import annotations

import torch

from sgl_evict.engine.runtime import STATE


def forward_around(original, self, q, k, v, forward_batch, *args, **kwargs):
    if self.sliding_window_size == -1:
        capture = STATE.capture
        if capture is not None and capture.active and forward_batch.forward_mode.is_extend():
            capture.record(self.layer_id, q, self.tp_q_head_num, self.qk_head_dim, key_scaled(self))
        decode = STATE.decode_capture
        if decode is not None and forward_batch.forward_mode.is_decode():
            decode.record(self.layer_id, q, self.tp_q_head_num, self.qk_head_dim,
                          q.is_cuda and torch.cuda.is_current_stream_capturing())
    return original(self, q, k, v, forward_batch, *args, **kwargs)


def key_scaled(attn) -> float:
    """The logit scale of ``attn``'s keys as the pool stores them: an FP8 pool holds ``k / k_scale``, so scoring
    ``q . k_stored`` takes ``scaling x k_scale`` (SGLang's ``k_scale_float``; None when the model has no KV scales,
    i.e. 1)."""
    k_scale = getattr(attn, "k_scale_float", None)
    return attn.scaling if k_scale is None else attn.scaling * float(k_scale)
