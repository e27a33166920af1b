"""Window-query LSE capture in ``sglang.srt.layers.attention.flashinfer_backend.FlashInferAttnBackend.forward_extend``
(AROUND).

SGLang 0.5.17's FlashInfer prefill runs one of three paths (``forward_metadata``): the paged wrapper over the
request's (compacted) row, prefix and new tokens, causal (``use_ragged`` False); the ragged wrapper over the new
tokens, causal (``extend_no_prefix``); or the ragged wrapper over the new tokens (causal) and the paged wrapper over
the prefix (not causal), whose outputs ``_safe_merge_state`` merges. Only the last path asks FlashInfer for the LSE
(``forward_return_lse``), and it drops the merged one. So, for a layer whose window queries the plugin captured
(``RadixAttention.forward`` hook, ``patches/attention.py``, which runs first), this hook puts
:class:`~sgl_evict.engine.window_lse.RecordingWrapper` s in place of the backend's wrappers for the one call: every
wrapper call runs its ``forward_return_lse`` variant (the same kernel, which also writes the LSE) and hands SGLang
the output it asked for, unchanged. The window rows' LSE (merged over prefix and new keys on the third path,
converted from FlashInfer's base 2 to natural log) goes to the capture, and the scorer reads each key once
(``row_lse`` of ``kernels/paged_scoring.py``) instead of twice.

Layers whose attention does not normalise over exactly the keys the scorer scores, with its scale, get no LSE and
are scored in two passes: cross-attention and encoder-only layers (not causal), sliding-window layers (the capture
skips them anyway), logit soft-capping, scaled (quantised) keys, a dequantised KV workspace, keys stored in another
dtype than attention read them, multi-item scoring masks and speculative batches. The Triton backend has no hook:
it is always two-pass.
"""

from __future__ import annotations

from contextlib import contextmanager

from sgl_evict.engine.runtime import STATE
from sgl_evict.engine.window_lse import RecordingWrapper, window_lse

BACKEND = "sglang.srt.layers.attention.flashinfer_backend.FlashInferAttnBackend"


def forward_extend_around(original, self, q, k, v, layer, forward_batch, *args, **kwargs):
    capture = STATE.capture
    if capture is None or not capture.wants_lse(layer.layer_id):
        return original(self, q, k, v, layer, forward_batch, *args, **kwargs)
    reason = _unscorable(self, layer, k, forward_batch)
    if reason is not None:
        capture.skip_lse(layer.layer_id, reason)
        return original(self, q, k, v, layer, forward_batch, *args, **kwargs)
    calls = []
    with _recording_wrappers(self, calls):
        out = original(self, q, k, v, layer, forward_batch, *args, **kwargs)
    _record_window_lse(capture, layer.layer_id, calls, self.forward_metadata, forward_batch)
    return out


@contextmanager
def _recording_wrappers(backend, calls: list):
    """For one ``forward_extend``: the backend's ragged wrapper and its per-layer-kind paged wrappers (SGLang picks
    one by ``_get_wrapper_idx``) replaced by recording stand-ins appending to ``calls``; put back after."""
    meta = backend.forward_metadata
    ragged, paged = backend.prefill_wrapper_ragged, meta.prefill_wrappers
    backend.prefill_wrapper_ragged = RecordingWrapper(ragged, "ragged", calls)
    meta.prefill_wrappers = [RecordingWrapper(wrapper, "paged", calls) for wrapper in paged]
    try:
        yield
    finally:
        backend.prefill_wrapper_ragged, meta.prefill_wrappers = ragged, paged


def _record_window_lse(capture, layer_id: int, calls: list, meta, forward_batch) -> None:
    """Hands the capture the window rows' natural LSE of the recorded ``calls`` (or why there is none), reading which
    path ``forward_extend`` took from the backend's forward metadata ``meta``."""
    path = "paged" if not meta.use_ragged else "ragged" if meta.extend_no_prefix else "ragged+prefix"
    row_has_prefix = None
    if path == "ragged+prefix":
        # the batch's lengths here are the compacted ones (patches/model_runner.py points it at the shadow rows)
        row_has_prefix = capture.rows_with_prefix(forward_batch.extend_prefix_lens_cpu)
    lse, reason = window_lse(calls, path, capture.rows, row_has_prefix, capture.scaling[layer_id])
    if lse is None:
        capture.skip_lse(layer_id, reason)
    else:
        capture.record_lse(layer_id, lse, [int(n) for n in forward_batch.seq_lens_cpu])


def _unscorable(backend, layer, k, forward_batch) -> str | None:
    """Why this layer's prefill attention does not normalise over the scorer's keys with the scorer's scale, or
    None when it does (the call's own scale, soft cap and window are checked again on what FlashInfer receives)."""
    from sglang.srt.layers.radix_attention import AttentionType

    if layer.is_cross_attention or layer.attn_type != AttentionType.DECODER:
        return "not causal self-attention"
    if layer.sliding_window_size not in (-1, None):
        return "sliding-window layer"
    if layer.logit_cap:
        return "logit soft-capping"
    if getattr(layer, "k_scale_float", None) not in (None, 1.0):
        return "scaled keys"
    if getattr(backend, "prefill_uses_dequant_workspace", False):
        return "dequantised KV workspace"
    stored = getattr(backend.token_to_kv_pool, "dtype", None)
    if k is not None and k.dtype != stored:
        # the ragged path attends the forward's own keys; the scorer reads them back from the pool
        return f"attention read {k.dtype} keys, the pool stores {stored}"
    items = backend.forward_metadata.multi_item_params
    if items is not None and items.is_enabled():
        return "multi-item scoring mask"
    if (forward_batch.spec_info is not None or forward_batch.seq_lens_cpu is None
            or forward_batch.extend_prefix_lens_cpu is None):
        return "speculative or incomplete batch"
    return None
