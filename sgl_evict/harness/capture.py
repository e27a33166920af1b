"""Query capture and compressed-cache attention for HF transformers models.

One attention function, registered with transformers' ``AttentionInterface`` under
:data:`ATTN_IMPLEMENTATION`, replaces sdpa in every attention layer of a harnessed model:

- ``prefill`` mode: plain sdpa with the model's own mask (outputs identical to sdpa); records the post-RoPE
  queries of the last ``window`` positions of each compressible layer.
- ``extend`` mode (every forward after prefill): the cache may have been compressed, so the model's mask, which
  assumes a contiguous cache, is ignored. The new tokens see every cached key (they all precede them), each other
  causally, and, in sliding-window layers, only the last ``sliding_window`` positions. Records the new tokens'
  queries when asked (lookahead decode steps, soft tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

ATTN_IMPLEMENTATION = "sgl_evict_capture"


@dataclass
class CaptureContext:
    """Per-model capture state, attached to each attention module as ``_sgl_evict_ctx``.

    Attributes:
        mode: ``"prefill"`` or ``"extend"``.
        window: how many trailing prefill queries to keep.
        layers: indices of the layers whose queries are recorded (the compressible ones).
        record: whether ``extend`` forwards record their queries.
        queries: layer index -> list of ``[num_q_heads, n, head_dim]`` float32 chunks, in call order.
    """

    window: int
    layers: frozenset[int]
    mode: str = "prefill"
    record: bool = False
    queries: dict[int, list[torch.Tensor]] = field(default_factory=dict)

    def take(self) -> dict[int, torch.Tensor]:
        """Recorded queries per layer, ``[num_q_heads, n_total, head_dim]``, and clears the record."""
        out = {layer: torch.cat(chunks, dim=1) for layer, chunks in self.queries.items()}
        self.queries = {}
        return out


def _extend_mask(num_new: int, num_keys: int, sliding_window: int | None, device) -> torch.Tensor:
    """``[num_new, num_keys]`` bool: the new tokens are the last ``num_new`` of the ``num_keys`` keys."""
    q_idx = torch.arange(num_keys - num_new, num_keys, device=device)[:, None]
    k_idx = torch.arange(num_keys, device=device)[None, :]
    allowed = k_idx <= q_idx
    if sliding_window:
        allowed &= k_idx > q_idx - sliding_window
    return allowed


def capture_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None,
                      **kwargs):
    """Attention function with the transformers interface: ``query [B, Hq, n, d]``, ``key/value [B, Hkv, K, d]``.

    Returns ``(output [B, n, Hq, d], None)`` like ``sdpa_attention_forward``.
    """
    ctx: CaptureContext = module._sgl_evict_ctx
    layer = module.layer_idx
    if ctx.mode == "prefill":
        if layer in ctx.layers:
            ctx.queries.setdefault(layer, []).append(query[0, :, -ctx.window :, :].float().clone())
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if ctx.record and layer in ctx.layers:
        ctx.queries.setdefault(layer, []).append(query[0].float().clone())
    if query.shape[0] != 1:
        raise ValueError("the eviction harness runs one request at a time (batch size 1)")
    num_new, num_keys = query.shape[2], key.shape[2]
    num_q_heads, num_kv_heads, head_dim = query.shape[1], key.shape[1], query.shape[3]
    groups = num_q_heads // num_kv_heads
    softcap = kwargs.get("softcap")
    if num_new == 1 and not softcap and (not sliding_window or num_keys <= sliding_window):
        # decode step: every cached key is visible, so no mask; a KV head's query heads go in as its query rows
        # (head h = kv * groups + g, as repeat_interleave orders them), which avoids copying K/V per query head
        out = F.scaled_dot_product_attention(query.view(1, num_kv_heads, groups, head_dim), key, value, scale=scaling)
        return out.view(1, 1, num_q_heads, head_dim), None
    mask = _extend_mask(num_new, num_keys, sliding_window, query.device)
    k = key.repeat_interleave(groups, dim=1)
    v = value.repeat_interleave(groups, dim=1)
    if softcap:
        logits = torch.matmul(query, k.transpose(-1, -2)) * scaling
        logits = softcap * torch.tanh(logits / softcap)
        probs = torch.softmax(logits.masked_fill(~mask, float("-inf")).float(), dim=-1).to(value.dtype)
        out = torch.matmul(probs, v)
    else:
        out = F.scaled_dot_product_attention(query, k, v, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def install(model, window: int, layers: frozenset[int]) -> CaptureContext:
    """Registers :func:`capture_attention` and switches ``model`` to it; returns the model's context."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, capture_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, sdpa_mask)  # prefill masks as for sdpa
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    ctx = CaptureContext(window=window, layers=layers)
    found = 0
    for module in model.modules():
        if hasattr(module, "layer_idx") and hasattr(module, "o_proj"):
            module._sgl_evict_ctx = ctx
            found += 1
    if found == 0:
        raise ValueError(f"{type(model).__name__}: no attention modules with layer_idx and o_proj found")
    return ctx
