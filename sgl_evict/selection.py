"""Turns per-token scores into the set of prompt tokens whose KV is kept.

One selector for every policy: budgets (fraction or token count), protected tokens (the first
``sinks`` attention sinks and the last ``recent`` tokens are always kept), and three granularities:

- ``uniform``: one keep-set for every layer and KV head. The only kind a paged engine pool, whose slot
  index is shared by all layers, can turn into freed memory.
- ``per_layer``: one keep-set per layer, shared by its KV heads. With ``global_budget=True`` the
  total budget (``num_layers x tokens``) is spread over layers by raw scores, which is only sound when
  scores are comparable across layers (laprox).
- ``per_head``: one keep-set per layer and KV head.

Ties are broken towards the earlier token, so a selection is deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

GRANULARITIES = ("uniform", "per_layer", "per_head")


@dataclass(frozen=True)
class Budget:
    """How much of a prompt's KV to keep: a fraction of its tokens, or a token count.

    Attributes:
        fraction: in ``(0, 1]``, or ``None`` when ``tokens`` is set.
        tokens: at least 1, or ``None`` when ``fraction`` is set.
    """

    fraction: float | None = None
    tokens: int | None = None

    def __post_init__(self) -> None:
        if (self.fraction is None) == (self.tokens is None):
            raise ValueError("a budget is either a fraction or a token count")
        if self.fraction is not None and not (0.0 < self.fraction <= 1.0):
            raise ValueError(f"budget fraction must be in (0, 1], got {self.fraction}")
        if self.tokens is not None and self.tokens < 1:
            raise ValueError(f"budget token count must be >= 1, got {self.tokens}")

    @classmethod
    def parse(cls, text: str | float | int) -> "Budget":
        """``"0.1"``, ``0.1`` or ``"10%"``: a fraction; ``"1024"`` or ``1024``: a token count."""
        if isinstance(text, bool):
            raise ValueError(f"invalid budget {text!r}")
        if isinstance(text, int):
            return cls(tokens=text)
        if isinstance(text, float):
            return cls(fraction=text)
        s = str(text).strip()
        try:
            if s.endswith("%"):
                return cls(fraction=float(s[:-1]) / 100.0)
            if any(c in s for c in ".eE"):
                return cls(fraction=float(s))
            return cls(tokens=int(s))
        except ValueError as err:
            raise ValueError(
                f"invalid budget {text!r}: use a fraction in (0, 1] such as 0.1 or 10%, or a token count such as 1024"
                + (f" ({err})" if "budget" in str(err) else "")
            ) from None

    def num_tokens(self, seq_len: int) -> int:
        """Tokens to keep of a ``seq_len``-token prompt (never more than ``seq_len``)."""
        if self.tokens is not None:
            return min(self.tokens, seq_len)
        return min(seq_len, max(1, math.ceil(self.fraction * seq_len)))

    def scaled(self, factor: float) -> "Budget":
        """This budget ``factor`` (>= 1) times over: a fraction capped at 1, a token count rounded up."""
        if factor < 1:
            raise ValueError(f"a budget scales by a factor of at least 1, got {factor}")
        if self.tokens is not None:
            return Budget(tokens=math.ceil(self.tokens * factor))
        return Budget(fraction=min(1.0, self.fraction * factor))

    def __str__(self) -> str:
        return f"{self.fraction:g}" if self.fraction is not None else str(self.tokens)


@dataclass
class KeepSet:
    """Kept prompt tokens of one request.

    Attributes:
        indices: one ``[num_kv_heads, kept_tokens_of_layer]`` int64 tensor per layer, ascending along the
            last dimension. ``uniform`` and ``per_layer`` repeat one row over the heads.
        seq_len: prompt length the indices refer to.
    """

    indices: list[torch.Tensor]
    seq_len: int

    def mask(self, layer: int) -> torch.Tensor:
        """``[num_kv_heads, seq_len]`` bool, True where the token's KV is kept."""
        idx = self.indices[layer]
        out = torch.zeros(idx.shape[0], self.seq_len, dtype=torch.bool, device=idx.device)
        return out.scatter_(1, idx, True)

    @classmethod
    def uniform(cls, positions, num_layers: int, num_kv_heads: int, seq_len: int) -> "KeepSet":
        """One keep-set for every layer and head (what a ``uniform`` server frees around, e.g. the positions
        it logs): ``positions`` (kept token positions, any order, no repeats) sorted."""
        row = torch.as_tensor(list(positions), dtype=torch.int64).sort().values
        if row.numel() and (int(row[0]) < 0 or int(row[-1]) >= seq_len or bool((row[1:] == row[:-1]).any())):
            raise ValueError(f"keep-set positions must be distinct and in [0, {seq_len})")
        return cls([row.expand(num_kv_heads, -1) for _ in range(num_layers)], seq_len)

    def total_kept(self) -> int:
        """Kept (layer, head, token) entries, the memory the keep-set costs."""
        return sum(int(i.numel()) for i in self.indices)


def protected_mask(seq_len: int, sinks: int, recent: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``[seq_len]`` bool: the first ``sinks`` and the last ``recent`` tokens."""
    pos = torch.arange(seq_len, device=device)
    return (pos < sinks) | (pos >= seq_len - recent)


def carry_forward(scores: torch.Tensor, span: int, live: torch.Tensor | None = None) -> torch.Tensor:
    """``scores [..., seq_len]`` with each token's score raised to the best of the ``span`` tokens before it.

    A question's window queries attend to the start of a fact they match ("... opens with the code 74"), much
    less to its later digits, which the answer then copies; carrying a score forward keeps a kept token's next
    ``span`` tokens with it. ``live [seq_len]`` bool: the positions that may take a score (holes, and candidates
    with no KV, keep theirs). ``span`` 0 returns ``scores`` itself.
    """
    if span < 0:
        raise ValueError(f"continuation span must be >= 0, got {span}")
    if span == 0:
        return scores
    flat = F.pad(scores.reshape(-1, 1, scores.shape[-1]), (span, 0), value=float("-inf"))
    carried = F.max_pool1d(flat, span + 1, stride=1).view(scores.shape)
    return carried if live is None else torch.where(live, carried, scores)


def _top_indices(scores: torch.Tensor, protected: torch.Tensor, num_keep: int) -> torch.Tensor:
    """Indices of the ``num_keep`` best tokens of ``scores [..., seq_len]``, protected first, ascending."""
    ranked = scores.masked_fill(protected, float("inf"))
    order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices
    return order[..., :num_keep].sort(dim=-1).values


def _normalise(scores: torch.Tensor) -> torch.Tensor:
    """Each row of ``[..., seq_len]`` scaled to sum to 1 (rows of zeros stay zero)."""
    total = scores.sum(dim=-1, keepdim=True)
    return scores / torch.where(total > 0, total, torch.ones_like(total))


def select_keep(
    scores: torch.Tensor,
    budget: Budget,
    sinks: int = 4,
    recent: int = 32,
    granularity: str = "uniform",
    global_budget: bool = False,
    min_layer_fraction: float = 0.0,
    continuation: int = 0,
) -> KeepSet:
    """Chooses the kept tokens of one request from its scores.

    Args:
        scores: ``[num_layers, num_kv_heads, seq_len]`` non-negative scores, higher is more important.
        budget: tokens to keep per layer and KV head. Protected tokens always count and are always
            kept; a budget below their number keeps exactly the protected tokens.
        sinks: leading tokens always kept (attention sinks).
        recent: trailing tokens always kept.
        granularity: one of :data:`GRANULARITIES`.
        global_budget: ``per_layer`` only: spread ``num_layers x budget`` over layers by raw scores.
        min_layer_fraction: ``global_budget`` only, in ``[0, 1]``: every layer first keeps its best
            ``ceil(min_layer_fraction x budget)`` tokens (protected first), so the split cannot leave a layer
            with only its protected tokens; 0 is the plain global split, 1 is ``per_layer`` without it.
        continuation: each token also takes the best combined score of the ``continuation`` tokens before it
            (:func:`carry_forward`), so a kept token's next tokens stay with it; 0 is off.

    Returns:
        The :class:`KeepSet`. Every layer keeps exactly ``max(budget, protected)`` tokens per KV head,
        except with ``global_budget``, where the total over layers is exact and each layer keeps at least
        ``max(protected, ceil(min_layer_fraction x budget))``.
    """
    if scores.dim() != 3:
        raise ValueError(f"scores must be [num_layers, num_kv_heads, seq_len], got shape {tuple(scores.shape)}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")
    if global_budget and granularity != "per_layer":
        raise ValueError("global_budget applies to granularity 'per_layer' only")
    if min_layer_fraction and not global_budget:
        raise ValueError("min_layer_fraction applies to global_budget only")
    if not 0.0 <= min_layer_fraction <= 1.0:
        raise ValueError(f"min_layer_fraction must be in [0, 1], got {min_layer_fraction}")
    if sinks < 0 or recent < 0:
        raise ValueError(f"sinks and recent must be >= 0, got {sinks} and {recent}")
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN; refusing to select from them")

    num_layers, num_kv_heads, seq_len = scores.shape
    scores = scores.float()
    protected = protected_mask(seq_len, sinks, recent, scores.device)
    num_keep = max(budget.num_tokens(seq_len), int(protected.sum()))

    def per_layer_rows(rows: torch.Tensor) -> list[torch.Tensor]:  # rows: [num_layers, k]
        return [r.expand(num_kv_heads, -1) for r in rows]

    if granularity == "uniform":
        combined = carry_forward(_normalise(scores).mean(dim=(0, 1)), continuation)
        row = _top_indices(combined, protected, num_keep)
        return KeepSet(per_layer_rows(row.expand(num_layers, -1)), seq_len)
    if granularity == "per_head":
        scores = carry_forward(scores, continuation)
        return KeepSet(list(_top_indices(scores, protected, num_keep).unbind(0)), seq_len)
    if not global_budget:
        combined = carry_forward(_normalise(scores).mean(dim=1), continuation)  # [num_layers, seq_len]
        return KeepSet(per_layer_rows(_top_indices(combined, protected, num_keep)), seq_len)

    # Global: every layer's floor first (its protected tokens, then its best tokens up to the floor), then the
    # best remaining (layer, token) pairs by raw score.
    raw = carry_forward(scores.sum(dim=1), continuation)  # [num_layers, seq_len]
    floor = max(int(protected.sum()), math.ceil(min_layer_fraction * num_keep))
    first = torch.zeros_like(raw, dtype=torch.bool).scatter_(1, _top_indices(raw, protected, floor), True)
    combined = raw.masked_fill(first, float("inf")).flatten()
    order = torch.sort(combined, descending=True, stable=True).indices[: num_layers * num_keep]
    chosen = torch.zeros(num_layers * seq_len, dtype=torch.bool, device=scores.device)
    chosen[order] = True
    chosen = chosen.view(num_layers, seq_len)
    rows = [chosen[i].nonzero().squeeze(1).expand(num_kv_heads, -1) for i in range(num_layers)]
    return KeepSet(rows, seq_len)


def select_keep_grouped(
    scores: torch.Tensor,
    groups: Sequence[int],
    budget: Budget,
    sinks: int = 4,
    recent: int = 32,
    global_budget: bool = False,
    continuation: int = 0,
) -> KeepSet:
    """``per_layer`` selection where layers of one layer group share a keep-set (the server's layered pool with
    ``--kv-evict-layer-groups``; :class:`sgl_evict.layer_groups.GroupLayout` says which group a layer is in).

    Args:
        scores: ``[num_layers, num_kv_heads, seq_len]`` of the compressed layers.
        groups: ``[num_layers]`` the group of each row of ``scores``; rows of one group share a keep-set.
        budget, sinks, recent, continuation: as for :func:`select_keep`.
        global_budget: laprox: raw scores summed over each group's layers and heads, then ``select_keep``'s global
            split over groups (``num_groups x max(budget, protected)`` in total). Otherwise each group keeps
            ``uniform``'s keep-set of its own layers: exactly ``max(budget, protected)``.

    Returns:
        The :class:`KeepSet` of the ``num_layers`` rows, each row its group's keep-set. One group per layer is
        :func:`select_keep` ``per_layer``.
    """
    if len(groups) != scores.shape[0]:
        raise ValueError(f"{scores.shape[0]} score rows for {len(groups)} group labels")
    labels = sorted(set(groups))
    members = [[i for i, g in enumerate(groups) if g == label] for label in labels]
    if global_budget:
        raw = torch.stack([scores[rows].float().sum(dim=0) for rows in members])  # [num_groups, kv_heads, seq_len]
        per_group = select_keep(raw, budget, sinks, recent, "per_layer", global_budget=True,
                                continuation=continuation).indices
    else:
        per_group = [select_keep(scores[rows], budget, sinks, recent, "uniform",
                                 continuation=continuation).indices[0] for rows in members]
    indices: list[torch.Tensor] = [torch.empty(0)] * scores.shape[0]
    for rows, kept in zip(members, per_group):
        for i in rows:
            indices[i] = kept
    return KeepSet(indices, scores.shape[-1])
