"""A later turn on a compressed prefix brings evicted tokens back from host memory (issue 25, step 2).

After the prefill of a request whose config says ``history: "restore"`` and whose matched prefix holds holes with
host copies (:class:`~sgl_evict.engine.reversible_radix_cache.ReversibleRadixCache`), every logical token is a
candidate again: the live ones from the device pool, the host-backed holes from their copies. The new turn's
window queries score all of them against their exact keys, one keep-set is chosen to the budget of the full
logical length (the HF harness's ``reversible`` rule, ``bench/reversible_probe.py``), and then:

- a kept host-backed hole is restored: K and V loaded into new device slots the request owns, written into its
  row at its logical position (no re-rotation: keys keep their positions);
- a dropped live token is evicted as usual (its own tokens copied to host and freed, the tree's hidden);
- shared tree nodes never change.

Scoring is two-pass: the prefill's window LSE was taken over the compacted prefix, not over every candidate. The
keys are gathered per layer into a scratch (index 0 unused, as SGLang's slot 0): resident keys on the device,
held-out keys copied from the host, K only.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable

import torch

from sgl_evict.engine.keep import keep_mask, position_scores, window_request
from sgl_evict.engine.laprox import projected_norms
from sgl_evict.engine.score_plan import ScoreRequest, score_requests
from sgl_evict.holes import HOLE, is_live
from sgl_evict.policies.base import POSITIONS

logger = logging.getLogger("sgl_evict")


@dataclasses.dataclass
class RestoreCandidates:
    """One request's candidates: ``live [seq_len]`` bool, and ``host [seq_len]`` int64 host slots of its
    host-backed holes (-1 elsewhere)."""

    live: torch.Tensor
    host: torch.Tensor

    @property
    def backed(self) -> torch.Tensor:
        """``[seq_len]`` bool: holes whose K and V are in host memory."""
        return self.host >= 0

    @property
    def count(self) -> int:
        return int(self.live.sum()) + int(self.backed.sum())

    @functools.cached_property
    def scoring_row(self) -> torch.Tensor:
        """``[seq_len]`` int32 index of each candidate's key in the scratch (live first, then host-backed, from
        1), ``HOLE`` elsewhere."""
        row = torch.full(self.live.shape, HOLE, dtype=torch.int32, device=self.live.device)
        n_live = int(self.live.sum())
        row[self.live] = torch.arange(1, n_live + 1, dtype=torch.int32, device=row.device)
        backed = self.backed.to(row.device)
        row[backed] = torch.arange(n_live + 1, n_live + 1 + int(backed.sum()), dtype=torch.int32,
                                   device=row.device)
        return row


def restore_candidates(tree, req, row: torch.Tensor) -> RestoreCandidates | None:
    """``req``'s candidates (``row``: its ``[seq_len]`` logical slot row), or None when its matched prefix has no
    host-backed hole (or its path in the tree is not that prefix)."""
    prefix = req.cache_protected_len
    if prefix == 0:
        return None
    host_prefix = tree.host_slots_of_prefix(req)
    if host_prefix is None:
        return None
    host = torch.full((row.shape[0],), -1, dtype=torch.int64)
    host[:prefix] = host_prefix
    host[is_live(row).cpu()] = -1  # a live token (the request's own, or the tree's) needs no copy
    if not bool((host >= 0).any()) and not tree.has_restored(req):
        return None  # nothing to bring back, nothing restored to drop: scored as usual
    return RestoreCandidates(is_live(row), host.to(row.device))


def restore_before_prefill(tree, req, row: torch.Tensor) -> int:
    """Brings back, before ``req``'s prefill forward, the tokens the previous turns along its matched path had
    restored and kept (:meth:`~sgl_evict.engine.reversible_radix_cache.ReversibleRadixCache.carried_positions`):
    holes of its ``row`` (``[seq_len]``, the matched prefix written) with host copies. Returns tokens restored."""
    carried = tree.carried_positions(req)
    if carried.numel() == 0:
        return 0
    host_prefix = tree.host_slots_of_prefix(req)
    if host_prefix is None:
        return 0
    holes = (row[:req.cache_protected_len] == HOLE).cpu()
    positions = carried[holes[carried] & (host_prefix[carried] >= 0)]
    return restore_tokens(tree, req, row, positions, host_prefix[positions], torch.zeros(positions.numel()))


def restore_scores(policy, candidates: RestoreCandidates, row: torch.Tensor, queries: dict, scaling: dict,
                   key_buffer: Callable, host_keys: Callable, attention_mass: Callable, rope=None,
                   value_buffer: Callable | None = None, host_values: Callable | None = None,
                   value_norm_factors: dict | None = None) -> torch.Tensor:
    """``[num_layers or 1, num_kv_heads or 1, seq_len]`` scores of every candidate, zero elsewhere.

    Args:
        policy: the request's policy object (scored from window queries, or from positions).
        row: the request's ``[seq_len]`` logical slot row.
        queries: layer id -> ``[num_q_heads, window, head_dim]`` the new turn's window queries.
        key_buffer: layer id -> ``[pool_slots, num_kv_heads, head_dim]`` the device pool's keys.
        host_keys: ``(layer id, host slots [n])`` -> ``[n, num_kv_heads, head_dim]`` keys from host memory, on the
            device, in the pool's key dtype.
        rope: dapq: the model's RoPE (its window queries are re-rotated); None otherwise.
        value_buffer, host_values, value_norm_factors: laprox: values as ``key_buffer`` / ``host_keys`` give keys,
            and layer id -> ``[num_q_heads, head_dim, head_dim]`` factors of the layer's output projection.
    """
    scoring_row = candidates.scoring_row
    if policy.query_source == POSITIONS:
        return position_scores(policy, scoring_row)
    live_slots = row[candidates.live].to(torch.int64)
    host_slots = candidates.host[candidates.backed]

    def scratch(buffer: Callable, from_host: Callable, layer: int) -> torch.Tensor:
        """One layer's ``buffer`` rows of every candidate, in ``scoring_row`` order (row 0 unused)."""
        pool = buffer(layer)
        return torch.cat((pool[:1], pool[live_slots], from_host(layer, host_slots)))

    value_norms = None
    if policy.value_weighted:
        def value_norms(layer: int) -> torch.Tensor:
            return projected_norms(scratch(value_buffer, host_values, layer), scoring_row, value_norm_factors[layer])

    used = {layer: policy.used_window(q) for layer, q in queries.items()}
    request: ScoreRequest = window_request(used, scoring_row, policy.pool_width, rope, value_norms)
    return score_requests([request], scaling, functools.partial(scratch, key_buffer, host_keys), attention_mass)[0]


def restore_keep(combined: torch.Tensor, config, candidates: RestoreCandidates,
                 protected_recent: int) -> torch.Tensor:
    """``[seq_len]`` bool keep mask over every candidate from their combined scores
    (:func:`~sgl_evict.engine.keep.combined_scores`): the budget of the full logical length, sinks and the recent
    tail protected (the harness's rule). Positions that are no candidate are never kept."""
    keep = keep_mask(combined, dataclasses.replace(config, history="rescore"), candidates.scoring_row, 1,
                     protected_recent)
    return keep & (candidates.live | candidates.backed)


def restore_tokens(tree, req, row: torch.Tensor, positions: torch.Tensor, host_slots: torch.Tensor,
                   priority: torch.Tensor) -> int:
    """Loads ``host_slots [m]`` into new device slots written into ``row`` at ``positions [m]``, owned by ``req``.
    Short of free slots, the radix tree evicts (never ``req``'s locked path); still short, only the best
    ``priority [m]`` that fit are restored. Returns tokens restored."""
    from sglang.srt.mem_cache.base_prefix_cache import EvictParams

    allocator = tree.token_to_kv_pool_allocator
    m = positions.numel()
    if m == 0:
        return 0
    if allocator.available_size() < m:
        tree.evict(EvictParams(num_tokens=m - allocator.available_size()))
    fit = min(m, allocator.available_size())
    if fit < m:
        logger.warning("sgl-evict: request %s: room to restore %d of %d tokens", req.rid, fit, m)
        chosen = priority.argsort(descending=True)[:fit].sort().values
        positions, host_slots = positions[chosen], host_slots[chosen]
    if fit == 0:
        return 0
    slots = allocator.alloc(fit)
    tree.host_pool.load(tree.device_pool, host_slots, slots)
    row[positions.to(row.device)] = slots.to(row.dtype)
    tree.record_restored(req, positions, slots)
    return fit
