"""Holes in a request's logical KV index row, and the radix-cache namespace of compressed KV.

A request's ``req_to_token`` row stays logical: one entry per token position, so SGLang's scheduler bookkeeping,
``seq_lens`` and RoPE positions do not change when tokens are evicted. An evicted token's entry becomes
:data:`HOLE`; its KV slot is returned to the allocator (by whoever owned it). Values stored in SGLang's radix tree
(``TreeNode.value``, int64) therefore contain holes too. With ``page_size > 1`` holes are whole pages: every
slot of a page is a hole or none is.
"""

from __future__ import annotations

import torch

HOLE = -1
"""Entry of an evicted token in a logical index row (never a real slot: slot 0 is SGLang's padding slot and
real slots are >= 1)."""


def is_live(indices: torch.Tensor) -> torch.Tensor:
    """Mask of real slots. ``indices`` [n] int -> [n] bool."""
    return indices != HOLE


def live(indices: torch.Tensor) -> torch.Tensor:
    """The real slots of ``indices`` [n] int, in order, without holes -> [m] (m <= n), same dtype and device."""
    return indices[is_live(indices)]


def count_live(indices: torch.Tensor) -> int:
    """How many entries of ``indices`` [n] int are real slots (not holes)."""
    return int(is_live(indices).sum().item())


def has_holes(indices: torch.Tensor) -> bool:
    """Whether any entry of ``indices`` [n] int is a hole."""
    return bool((indices == HOLE).any().item())


def whole_tail_prefix(indices: torch.Tensor, tail: int) -> int:
    """Length of the longest prefix of ``indices`` [n] int whose last ``tail`` entries hold no hole.

    A prefix ends right before a hole, or at ``n``; it qualifies when no hole lies within ``tail`` entries before
    its end (a prefix shorter than ``tail`` must have no hole at all). Used for radix matches on models with
    sliding-window layers, which read a row's last ``tail`` entries.
    """
    n = indices.shape[0]
    holes = (indices == HOLE).nonzero().flatten().tolist()
    if not holes or holes[-1] < n - tail:
        return n
    best = holes[0]
    for before, hole in zip(holes, holes[1:]):
        if hole - before > tail:
            best = hole
    return best


def namespaced_extra_key(extra_key: str | None, config) -> str | None:
    """SGLang's ``RadixKey.extra_key`` (``Req.extra_key``: cache salt, LoRA id) with the eviction namespace folded in.

    ``config`` is the request's :class:`sgl_evict.config.EvictionConfig`. Without eviction (fingerprint None) the
    key is unchanged, so uncompressed requests keep sharing SGLang's ordinary namespace; with eviction, two requests
    share cached KV only when their extra keys and their fingerprints (which decide the holes) are equal.
    """
    fingerprint = config.fingerprint()
    if fingerprint is None:
        return extra_key
    return fingerprint if extra_key is None else f"{extra_key}|{fingerprint}"
