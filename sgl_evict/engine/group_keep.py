"""Per-group keep-sets for a layered KV pool (docs/design.md, "Per-layer budgets: a layered KV pool").

The L layers are cut into G groups of L/G consecutive layers; a group shares one keep-set and, in the
layered pool, one physical slot per token. G = 1 is today's ``uniform`` selection, G = L is ``per_layer``.

Selection is two steps so that tensor-parallel ranks, each holding some KV heads, pick identical keep-sets: every
rank computes :func:`group_scores` (a **sum** over its own heads), the ranks all-reduce it (sum), and every rank
runs :func:`group_keep_masks` on the same tensor (the selector's stable sort is deterministic).
"""

from __future__ import annotations

import torch

from sgl_evict.config import EvictionConfig
from sgl_evict.engine.keep import combined_scores, keep_mask
from sgl_evict.holes import is_live
from sgl_evict.layer_groups import GroupLayout
from sgl_evict.selection import carry_forward, select_keep


def group_scores(scores: torch.Tensor, num_groups: int, comparable_across_layers: bool) -> torch.Tensor:
    """``[num_layers, num_kv_heads, seq_len]`` -> ``[num_groups, seq_len]`` float32, a sum over the heads and the
    group's layers, so that the sum over tensor-parallel ranks of their results is the result over all heads.

    ``comparable_across_layers`` False: each (layer, head) row is normalised first (:func:`combined_scores` per
    group: the ``uniform`` combination restricted to the group's layers), so no layer's scale dominates.
    True (laprox): raw scores, whose contributions add up in the residual stream; the global split ranks them
    across groups. Raises ValueError unless ``num_groups`` divides ``num_layers``.
    """
    num_layers, num_kv_heads, seq_len = scores.shape
    if num_groups < 1 or num_layers % num_groups:
        raise ValueError(f"{num_groups} layer groups do not divide {num_layers} layers")
    grouped = scores.float().view(num_groups, num_layers // num_groups, num_kv_heads, seq_len)
    if comparable_across_layers:
        return grouped.sum(dim=(1, 2))
    return torch.stack([combined_scores(group) for group in grouped])


def group_keep_masks(scores: torch.Tensor, config: EvictionConfig, row: torch.Tensor, page_size: int = 1,
                     protected_recent: int = 0, global_split: bool = False,
                     min_group_fraction: float = 0.0) -> torch.Tensor:
    """``[num_groups, seq_len]`` bool keep masks of one request from its (all-reduced) :func:`group_scores`.

    Without ``global_split`` every group keeps what :func:`keep_mask` keeps from its own row: exactly
    ``max(budget, protected)`` tokens (whole pages with ``page_size > 1``), the first ``sinks`` and the last
    ``max(window, protected_recent)`` always. G = 1 is therefore today's uniform keep mask.

    ``global_split`` (laprox): ``num_groups x max(budget, protected)`` (group, token) pairs in total; every group
    first keeps its best ``ceil(min_group_fraction x max(budget, protected))`` tokens (protected first), the rest
    goes to the best remaining pairs by raw score (``select_keep``'s global budget with ``min_layer_fraction``).
    Token-granular only: a page-granular global split is not built (design step 8).

    Args:
        scores: ``[num_groups, seq_len]`` from :func:`group_scores`, zero at holes.
        row: ``[seq_len]`` the request's logical slot row (its pages, for ``page_size > 1``).
    """
    if not global_split:
        if min_group_fraction:
            raise ValueError("min_group_fraction applies to the global split only")
        return torch.stack([keep_mask(group, config, row, page_size, protected_recent) for group in scores])
    if page_size != 1:
        raise ValueError("the global split across layer groups is token-granular only (page_size 1)")
    recent = max(config.window, protected_recent)
    scores = carry_forward(scores, config.continuation, is_live(row))
    kept = select_keep(scores.unsqueeze(1), config.budget, config.sinks, recent, "per_layer", global_budget=True,
                       min_layer_fraction=min_group_fraction)
    return torch.stack([kept.mask(g)[0] for g in range(scores.shape[0])])


def layout_group_scores(scores: torch.Tensor, layers: list[int] | None, layout: GroupLayout,
                        comparable_across_layers: bool) -> torch.Tensor:
    """``[num_scored_layers, num_kv_heads, seq_len]`` -> ``[len(layout.scored_groups), seq_len]`` float32: as
    :func:`group_scores`, with each row summed into the group of its layer (``layers[i]`` is row ``i``'s layer id).

    Only full-attention layers are scored (sliding-window layers have no window queries), so rows are grouped by
    layer id rather than by position. ``layers`` None: one row of position scores (streaming, random) shared by every
    scored group. A sum over heads and layers, so tensor-parallel ranks all-reduce it as :func:`group_scores`.
    """
    if layers is None:
        return torch.cat([group_scores(scores, 1, comparable_across_layers)] * len(layout.scored_groups))
    if len(layers) != scores.shape[0]:
        raise ValueError(f"{scores.shape[0]} score rows for {len(layers)} layers")
    rows = []
    for group in layout.scored_groups:
        members = [i for i, layer in enumerate(layers) if layout.group_of(layer) == group]
        if not members:
            raise ValueError(f"group {group} holds a full-attention layer, but none of its layers was scored")
        rows.append(group_scores(scores[members], 1, comparable_across_layers))
    return torch.cat(rows)


def layout_keep_masks(scores: torch.Tensor, layout: GroupLayout, config: EvictionConfig, row: torch.Tensor,
                      protected_recent: int = 0, global_split: bool = False) -> torch.Tensor:
    """``[num_groups, seq_len]`` bool keep masks of one request, page size 1, from its (all-reduced)
    :func:`layout_group_scores` ``[len(layout.scored_groups), seq_len]``.

    Scored groups keep what :func:`group_keep_masks` keeps (the last ``max(window, protected_recent)`` tokens
    included); laprox's ``global_split`` spreads ``len(scored_groups) x max(budget, protected)`` over them only, so
    the total a full-attention layer keeps does not depend on how many sliding-window groups the model has.
    Window-only groups keep the prompt's last ``protected_recent`` tokens (their layers read nothing before).
    """
    seq_len = scores.shape[1]
    tail = torch.arange(seq_len, device=scores.device) >= seq_len - protected_recent
    keep = tail.expand(layout.num_groups, seq_len).clone()
    keep[list(layout.scored_groups)] = group_keep_masks(scores, config, row, 1, protected_recent,
                                                        global_split=global_split)
    return keep
