"""The log-sum-exp of each window query's prefill attention, taken from FlashInfer for one-read scoring.

The paged scoring kernel reads the keys once when it is given each observation query's natural log-sum-exp over
the keys it scores (``kernels/paged_scoring.py``, ``row_lse``). For snapkv's window queries (and laprox's, and laq's
provisional snapkv) the prefill attention already computed it: the window rows are queries of the prefill, and
FlashInfer's prefill kernels return their LSE (``forward_return_lse``). :class:`RecordingWrapper` stands in for a
FlashInfer prefill wrapper during one ``forward_extend`` call and keeps the LSE of every call, handing the output
through unchanged; :func:`window_lse` checks that the calls attended what the scorer scores and turns their LSE into
the window rows' natural LSE.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

#: FlashInfer's LSE is base 2: ``log2(sum_j 2^(sm_scale * log2(e) * q.k_j)) = ln(sum_j e^(sm_scale * q.k_j)) / ln 2``
#: (its kernels run the softmax in base 2: in 0.6.15.post1 the fa2 prefill writes ``log2(d) + m`` with ``m`` in
#: scaled log2 units, ``include/flashinfer/attention/prefill.cuh``, and fa3 ``row_max * sm_scale_log2 + log2(sum)``,
#: ``hopper/attention_updater.cuh``; ``merge_state`` merges in base 2), so ``natural = base2 * ln 2``.
LN2 = math.log(2.0)

#: FlashInfer backends whose LSE was read to be base 2 (above); the others (SM100 ``cutlass``, ``cudnn``,
#: ``trtllm-gen``) are not used: their scoring falls back to two passes
BASE2_BACKENDS = ("fa2", "fa3")

#: the FlashInfer call sequence of each path of SGLang 0.5.17's ``FlashInferAttnBackend.forward_extend``
#: (source, causal): paged wrapper over the compacted row (prefix + new tokens); ragged wrapper over the new tokens
#: (no prefix); ragged over the new tokens then paged over the prefix, merged by ``merge_state``
PATHS = {
    "paged": (("paged", True),),
    "ragged": (("ragged", True),),
    "ragged+prefix": (("ragged", True), ("paged", False)),
}


@dataclass
class AttentionCall:
    """One FlashInfer prefill call seen by a :class:`RecordingWrapper`.

    Attributes:
        source: ``"ragged"`` or ``"paged"`` (which wrapper ran).
        lse: ``[num_tokens, num_q_heads]`` float32 base-2 LSE of every query row of the batch.
        causal, sm_scale, logits_soft_cap, window_left: the call's arguments (FlashInfer's defaults when not passed).
        backend: the wrapper's kernel family after planning (FlashInfer's ``_backend``: ``fa2``, ``fa3``, ...).
    """

    source: str
    lse: torch.Tensor
    causal: bool
    sm_scale: float | None
    logits_soft_cap: float | None
    window_left: int
    backend: str | None


class RecordingWrapper:
    """A FlashInfer prefill wrapper whose ``forward`` runs ``forward_return_lse`` (same arguments, same kernel;
    only the LSE is written too) and returns the output alone, as ``forward`` does; ``forward_return_lse`` is handed
    through. Every call's LSE is appended to ``calls``. Anything else is the wrapped object's."""

    def __init__(self, wrapper, source: str, calls: list[AttentionCall]):
        self._wrapper = wrapper
        self._source = source
        self._calls = calls

    def forward(self, *args, **kwargs):
        out, _ = self.forward_return_lse(*args, **kwargs)
        return out

    def forward_return_lse(self, *args, **kwargs):
        out, lse = self._wrapper.forward_return_lse(*args, **kwargs)
        self._calls.append(AttentionCall(self._source, lse, bool(kwargs.get("causal", False)), kwargs.get("sm_scale"),
                                         kwargs.get("logits_soft_cap"), kwargs.get("window_left", -1),
                                         getattr(self._wrapper, "_backend", None)))
        return out, lse

    def __getattr__(self, name):
        return getattr(self._wrapper, name)


def window_lse(calls: list[AttentionCall], path: str, rows: torch.Tensor, row_has_prefix: torch.Tensor | None,
               sm_scale: float) -> tuple[torch.Tensor | None, str | None]:
    """Natural LSE of the window rows ``rows`` from the calls of one ``forward_extend``, or why there is none.

    Args:
        calls: what the :class:`RecordingWrapper` s saw, in order.
        path: the backend's path (a key of :data:`PATHS`), from its forward metadata.
        rows: ``[num_rows]`` long, the window rows among the batch's query tokens.
        row_has_prefix: ``ragged+prefix`` only (None otherwise): ``[num_rows]`` bool, the row's request attended a
            (compacted) prefix; a request without one has no paged part to merge (its rows' paged LSE is not used).
        sm_scale: the logit scale the scorer uses for this layer.

    Returns:
        (``[num_rows, num_q_heads]`` float32 natural LSE, None), or (None, reason) when the calls are not exactly
        ``path``'s, ran a kernel family not in :data:`BASE2_BACKENDS`, or attended with another scale, capped logits
        or a sliding window: the LSE would then not be the natural normaliser of the keys the scorer scores.
    """
    expected = PATHS[path]
    if tuple((call.source, call.causal) for call in calls) != expected:
        return None, f"FlashInfer calls {[(c.source, c.causal) for c in calls]} are not the {path} path's {expected}"
    for call in calls:
        if call.backend not in BASE2_BACKENDS:
            return None, f"FlashInfer {call.source} backend {call.backend!r}, whose LSE's base was not checked"
        if call.sm_scale is None or call.sm_scale != sm_scale:
            return None, f"attention scale {call.sm_scale} differs from the scorer's {sm_scale}"
        if call.logits_soft_cap:
            return None, "logit soft-capping"
        if call.window_left not in (-1, None):
            return None, f"sliding window ({call.window_left})"
    lse = calls[0].lse.index_select(0, rows).float()
    if path == "ragged+prefix":
        # merge_state's LSE: log2(2^new + 2^prefix), the attention over prefix and new keys together
        prefix = calls[1].lse.index_select(0, rows).float()
        lse = torch.where(row_has_prefix.view(-1, 1), torch.logaddexp2(lse, prefix), lse)
    return lse * LN2, None
