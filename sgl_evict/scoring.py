"""Reference scoring math (PyTorch, float32): the oracle for the Triton kernels in ``kernels/``.

Every function works on one attention layer of one request. Shapes:
    queries   ``[num_q_heads, num_queries, head_dim]``  post-RoPE observation queries
    keys      ``[num_kv_heads, seq_len, head_dim]``     post-RoPE prompt keys
    values    ``[num_kv_heads, seq_len, head_dim]``
Query head ``h`` reads KV head ``h // (num_q_heads // num_kv_heads)`` (grouped-query attention).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def expand_kv_heads(x: torch.Tensor, num_q_heads: int) -> torch.Tensor:
    """``[num_kv_heads, seq_len, d]`` -> ``[num_q_heads, seq_len, d]``, each KV head repeated for its group."""
    num_kv_heads = x.shape[0]
    if num_q_heads % num_kv_heads:
        raise ValueError(f"num_q_heads={num_q_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    return x.repeat_interleave(num_q_heads // num_kv_heads, dim=0)


def attention_probs(
    queries: torch.Tensor,
    keys: torch.Tensor,
    scaling: float,
    query_positions: torch.Tensor | None = None,
    logit_softcap: float | None = None,
) -> torch.Tensor:
    """Softmax attention of observation queries over the prompt keys.

    Args:
        queries: ``[num_q_heads, num_queries, head_dim]``.
        keys: ``[num_kv_heads, seq_len, head_dim]``; key ``t`` sits at position ``t``.
        scaling: logit scale (``head_dim ** -0.5`` for most models).
        query_positions: ``[num_queries]`` positions of queries that lie inside the prompt; query ``i``
            then sees keys ``t <= query_positions[i]`` (causal). ``None``: every query sees every key
            (queries placed after the prompt: lookahead, re-rotated, soft-token).
        logit_softcap: Gemma 2 style ``softcap * tanh(logits / softcap)``, or ``None``.

    Returns:
        ``[num_q_heads, num_queries, seq_len]`` float32 probabilities; each row sums to 1.
    """
    q = queries.float()
    k = expand_kv_heads(keys.float(), q.shape[0])
    logits = torch.einsum("hqd,hkd->hqk", q, k) * scaling
    if logit_softcap:
        logits = logit_softcap * torch.tanh(logits / logit_softcap)
    if query_positions is not None:
        seq_len = keys.shape[1]
        future = torch.arange(seq_len, device=keys.device)[None, :] > query_positions.to(keys.device)[:, None]
        logits = logits.masked_fill(future[None], float("-inf"))
    return torch.softmax(logits, dim=-1)


def pool_scores(scores: torch.Tensor, kernel_size: int, mode: str = "max") -> torch.Tensor:
    """Smooths ``scores [..., seq_len]`` over neighbouring tokens (SnapKV's clustering), same length out.

    ``kernel_size`` must be odd; 1 (or less) returns the input unchanged. ``mode`` is ``"max"`` or ``"avg"``.
    """
    if kernel_size <= 1:
        return scores
    if kernel_size % 2 == 0:
        raise ValueError(f"pooling kernel size must be odd, got {kernel_size}")
    shape = scores.shape
    flat = scores.reshape(-1, 1, shape[-1])
    pad = kernel_size // 2
    if mode == "max":
        out = F.max_pool1d(flat, kernel_size, stride=1, padding=pad)
    elif mode == "avg":
        # count_include_pad=False so the first and last tokens are not diluted by padding
        out = F.avg_pool1d(flat, kernel_size, stride=1, padding=pad, count_include_pad=False)
    else:
        raise ValueError(f"pooling mode must be 'max' or 'avg', got {mode!r}")
    return out.reshape(shape)


def reduce_gqa(scores: torch.Tensor, num_kv_heads: int, mode: str = "mean") -> torch.Tensor:
    """``[num_q_heads, seq_len]`` -> ``[num_kv_heads, seq_len]`` by ``mean``, ``max`` or ``sum`` over each group."""
    grouped = scores.reshape(num_kv_heads, scores.shape[0] // num_kv_heads, scores.shape[-1])
    if mode == "mean":
        return grouped.mean(dim=1)
    if mode == "max":
        return grouped.amax(dim=1)
    if mode == "sum":
        return grouped.sum(dim=1)
    raise ValueError(f"GQA reduction must be 'mean', 'max' or 'sum', got {mode!r}")


def projected_value_norms(values: torch.Tensor, o_proj_weight: torch.Tensor, num_q_heads: int) -> torch.Tensor:
    """Norm of each token's value after the output projection, per query head.

    Query head ``h`` writes ``W_o[:, h*d:(h+1)*d] @ v_t`` to the residual stream when it fully attends
    token ``t``; its norm is how much that token can move the layer's output through head ``h``.

    Args:
        values: ``[num_kv_heads, seq_len, head_dim]``.
        o_proj_weight: ``[hidden_size, num_q_heads * head_dim]`` (``nn.Linear.weight`` layout).

    Returns:
        ``[num_q_heads, seq_len]`` float32.
    """
    head_dim = values.shape[-1]
    w = o_proj_weight.float().reshape(o_proj_weight.shape[0], num_q_heads, head_dim)  # [hidden, Hq, d]
    v = expand_kv_heads(values.float(), num_q_heads)  # [Hq, L, d]
    projected = torch.einsum("hld,nhd->hln", v, w)  # [Hq, L, hidden]
    return projected.norm(dim=-1)


def finish_scores(
    per_head: torch.Tensor,
    num_kv_heads: int,
    pooling_kernel: int = 1,
    pooling_mode: str = "max",
    gqa_reduce: str = "mean",
    value_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean attention per query head ``[num_q_heads, seq_len]`` -> scores ``[num_kv_heads, seq_len]``.

    Times ``value_weights [num_q_heads, seq_len]`` if given (laprox), pooled over neighbouring tokens,
    reduced over each GQA group. Shared by the reference and the paged kernel's wrapper.
    """
    if value_weights is not None:
        per_head = per_head * value_weights.float()
    return reduce_gqa(pool_scores(per_head, pooling_kernel, pooling_mode), num_kv_heads, gqa_reduce)


def score_queries(
    queries: torch.Tensor,
    keys: torch.Tensor,
    scaling: float,
    query_positions: torch.Tensor | None = None,
    pooling_kernel: int = 1,
    pooling_mode: str = "max",
    gqa_reduce: str = "mean",
    value_weights: torch.Tensor | None = None,
    logit_softcap: float | None = None,
) -> torch.Tensor:
    """Per-key importance: attention mass that the observation queries pay to each key.

    Mean attention over the queries (so scores of different query sets are on one scale), times
    ``value_weights`` if given (laprox), pooled over neighbouring tokens, reduced over each GQA group.

    Args:
        queries, keys, scaling, query_positions, logit_softcap: as in :func:`attention_probs`.
        value_weights: ``[num_q_heads, seq_len]`` per-head token weights, or ``None``.

    Returns:
        ``[num_kv_heads, seq_len]`` float32.
    """
    per_head = attention_probs(queries, keys, scaling, query_positions, logit_softcap).mean(dim=1)  # [Hq, L]
    return finish_scores(per_head, keys.shape[0], pooling_kernel, pooling_mode, gqa_reduce, value_weights)
