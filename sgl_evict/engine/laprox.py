"""laprox inside the server: each layer's output projection, read once at start, and the value norms it gives.

The harness's laprox (``sgl_evict.policies.laprox``) weighs query head ``h``'s window attention to token ``t`` by
``|| W_o^h v_t ||``, where ``W_o^h`` is the ``[hidden, head_dim]`` block of the layer's output projection that
head ``h`` writes through (``sgl_evict.scoring.projected_value_norms``). Projecting every prompt token through it
costs ``seq_len x head_dim x hidden`` per head and layer. Instead, each block is factored once at start,
``W_o^h = Q_h R_h`` (QR, ``Q_h`` with orthonormal columns, ``R_h`` ``[head_dim, head_dim]``), so
``|| W_o^h v || = || R_h v ||``: the same norm for ``head_dim / hidden`` of the work (1/32 on Llama-3-8B) and
``num_q_heads x head_dim^2`` floats per layer (64 MiB for all 32 layers of Llama-3-8B). The Gram matrix
``R_h^T R_h = W_o^h^T W_o^h`` would cost the same, but ``v^T G v`` loses precision to cancellation where
``|| R_h v ||`` does not.

Under tensor parallelism ``o_proj`` is a ``RowParallelLinear``: each rank holds the input columns of its own
query heads (``W_o^h`` whole, ``hidden`` rows), so every head's norm is computed on the rank that holds the head.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from sgl_evict.holes import is_live

#: float32 elements of one chunk of projected values (64 MiB): a 64K prompt is projected a chunk of tokens at a time
CHUNK_ELEMENTS = 1 << 24

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def find_output_projections(model: torch.nn.Module, attention_cls: type) -> dict[int, tuple[torch.Tensor, int]]:
    """Layer id -> (``[hidden, num_q_heads * v_head_dim]`` output projection weight, ``num_q_heads``) of each
    full-attention layer, heads counted on this rank.

    SGLang's attention modules hold their ``attention_cls`` (``RadixAttention``) as the child ``attn`` and their
    output projection (a ``RowParallelLinear``) as its sibling ``o_proj``; the weight's columns are this rank's
    query heads, ``v_head_dim`` each, in head order.

    Raises:
        ValueError naming the module, for a full-attention layer without such a sibling, or whose ``o_proj``
        weight is not a plain 16/32-bit float matrix of that shape (quantised or fused layouts).
    """
    found: dict[int, tuple[torch.Tensor, int]] = {}
    for name, module in model.named_modules():
        attn = getattr(module, "attn", None)
        if isinstance(attn, attention_cls) and attn.sliding_window_size == -1:
            found[attn.layer_id] = (_plain_weight(name, attn, getattr(module, "o_proj", None)), attn.tp_q_head_num)
    missing = sorted(m.layer_id for m in model.modules()
                     if isinstance(m, attention_cls) and m.sliding_window_size == -1 and m.layer_id not in found)
    if missing:
        raise ValueError(f"attention layers {missing} are not the child 'attn' of a module with an 'o_proj' "
                         "(the Llama-style layout laprox reads)")
    if not found:
        raise ValueError("the model has no full-attention layer")
    return found


def _plain_weight(name: str, attn, o_proj) -> torch.Tensor:
    """``o_proj.weight`` of the module ``name`` if it is a plain float ``[hidden, heads * v_head_dim]`` matrix."""
    if o_proj is None:
        raise ValueError(f"{name or 'the model'} has no 'o_proj' beside its 'attn'")
    weight = getattr(o_proj, "weight", None)
    where = f"{name or 'the model'}.o_proj"
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"{where} has no weight tensor")
    # a tensor subclass (torchao and alike) reports a float dtype but holds quantised data
    if type(weight.data) is not torch.Tensor or weight.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{where}.weight is {type(weight.data).__name__} of {weight.dtype}, not a plain 16/32-bit "
                         "float matrix (quantised output projections are not supported)")
    columns = attn.tp_q_head_num * attn.v_head_dim
    if weight.dim() != 2 or weight.shape[1] != columns:
        raise ValueError(f"{where}.weight has shape {tuple(weight.shape)}, expected [hidden, {columns}] "
                         f"({attn.tp_q_head_num} query heads x v_head_dim {attn.v_head_dim})")
    return weight


def norm_factors(o_proj_weight: torch.Tensor, num_q_heads: int) -> torch.Tensor:
    """``[hidden, num_q_heads * head_dim]`` -> ``[num_q_heads, head_dim, head_dim]`` float32 ``R_h`` with
    ``|| W_o^h v || = || R_h v ||`` for every ``v`` (QR of each head's block; see the module docstring)."""
    hidden = o_proj_weight.shape[0]
    blocks = o_proj_weight.detach().float().reshape(hidden, num_q_heads, -1).transpose(0, 1)  # [Hq, hidden, d]
    return torch.linalg.qr(blocks, mode="r").R.contiguous()


def model_norm_factors(projections: Mapping[int, tuple[torch.Tensor, int]],
                       device: torch.device | str | None = None) -> dict[int, torch.Tensor]:
    """Layer id -> :func:`norm_factors` of each layer of :func:`find_output_projections`, on ``device`` (where the
    KV pool is: a weight offloaded to the host is factored there too), or on each weight's own device."""
    return {layer: norm_factors(weight.to(device) if device is not None else weight, heads)
            for layer, (weight, heads) in projections.items()}


def projected_norms(value_buffer: torch.Tensor, row: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """``|| W_o^h v_t ||`` of one request's prompt tokens, values read from the pool, a chunk of tokens at a time.

    Args:
        value_buffer: ``[pool_slots, num_kv_heads, head_dim]`` one layer's values.
        row: ``[seq_len]`` the request's slot row (``HOLE`` for evicted tokens).
        factors: ``[num_q_heads, head_dim, head_dim]`` that layer's :func:`norm_factors`; query head ``h`` reads
            KV head ``h // (num_q_heads // num_kv_heads)``.

    Returns:
        ``[num_q_heads, seq_len]`` float32, as :func:`sgl_evict.scoring.projected_value_norms`; zero at holes.
    """
    num_q_heads, head_dim = factors.shape[0], factors.shape[-1]
    num_kv_heads = value_buffer.shape[1]
    groups = factors.view(num_kv_heads, num_q_heads // num_kv_heads, head_dim, head_dim)
    live = is_live(row)
    slots = torch.where(live, row, torch.zeros_like(row)).long()  # a hole reads slot 0, then scores 0
    out = torch.empty(num_q_heads, row.shape[0], dtype=torch.float32, device=row.device)
    chunk = max(1, CHUNK_ELEMENTS // (num_q_heads * head_dim))
    for start in range(0, row.shape[0], chunk):
        v = value_buffer[slots[start:start + chunk]].float()  # [n, Hkv, d]
        projected = torch.einsum("kgij,nkj->kgni", groups, v)  # [Hkv, group, n, d]
        out[:, start:start + v.shape[0]] = projected.norm(dim=-1).reshape(num_q_heads, -1)
    return out * live.to(out.dtype)
