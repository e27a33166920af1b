"""The methods compared: our policies through the harness, kvpress's presses through the adapter, at one budget.

A budget is a token count ``n`` of the compressed span (the whole prompt in our default mode, the context in the
question-agnostic mode): ours get ``Budget(tokens=n)``; a press gets ``compression_ratio = 1 - (n + 0.5) / L``, for
which kvpress's ``int(L * (1 - ratio))`` is exactly ``n`` (``1 - kept`` would drop a token to float rounding).
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager

import torch

from bench.peers.kvpress.adapter import Recording, replay
from sgl_evict import Budget, make_policy

#: our policies, as `sgl-evict eval` runs them (window 32, 4 sinks, uniform keep-set, protected_recent 0)
OURS = ("snapkv", "laq", "dapq", "laprox", "streaming")
OUR_WINDOW, OUR_SINKS = 32, 4

#: our policy -> the kvpress press nearest to it (for the goal's "each seed policy >= its nearest press")
NEAREST = {"snapkv": "SnapKVPress(w32,k7)", "laq": "ExpectedAttentionPress", "dapq": "ExpectedAttentionPress",
           "laprox": "CriticalKVPress(SnapKV)", "streaming": "StreamingLLMPress", "judgeq": "ExpectedAttentionPress"}


def keep_count(kept: float, length: int) -> int:
    """Tokens a ``kept`` fraction of ``length`` keeps: ``ceil(kept * length)``, as our ``Budget`` counts."""
    return Budget(fraction=kept).num_tokens(length)


def press_ratio(n: int, length: int) -> float:
    """The ``compression_ratio`` for which kvpress keeps exactly ``n`` of ``length`` tokens."""
    return 1.0 - (n + 0.5) / length


def press_factories() -> dict:
    """Name -> ``ratio -> press`` for every press of the main comparison (imports kvpress)."""
    from kvpress import (CriticalKVPress, ExpectedAttentionPress, KeyDiffPress, KnormPress, PyramidKVPress,
                         SnapKVPress, StreamingLLMPress, TOVAPress)

    return {
        "SnapKVPress(w64,k5)": lambda r: SnapKVPress(compression_ratio=r),  # kvpress's defaults
        "SnapKVPress(w32,k7)": lambda r: SnapKVPress(compression_ratio=r, window_size=OUR_WINDOW, kernel_size=7),
        "ExpectedAttentionPress": lambda r: ExpectedAttentionPress(compression_ratio=r),
        "TOVAPress": lambda r: TOVAPress(compression_ratio=r),
        "KnormPress": lambda r: KnormPress(compression_ratio=r),
        "KeyDiffPress": lambda r: KeyDiffPress(compression_ratio=r),
        "StreamingLLMPress": lambda r: StreamingLLMPress(compression_ratio=r),
        "PyramidKVPress": lambda r: PyramidKVPress(compression_ratio=r),
        "CriticalKVPress(SnapKV)": lambda r: CriticalKVPress(SnapKVPress(compression_ratio=r)),
    }


@contextmanager
def settings(harness, state, window: int, sinks: int):
    """The harness and a view of ``state`` as if prefilled with ``window`` observation queries and ``sinks`` sinks
    (the prefill captured at least ``window``: the view keeps the last ``window`` of them)."""
    saved = harness.window, harness.sinks
    harness.window, harness.sinks = window, sinks
    view = dataclasses.replace(state, window_queries={k: q[:, -window:] for k, q in state.window_queries.items()})
    try:
        yield view
    finally:
        harness.window, harness.sinks = saved


def ours_cache(harness, state, policy, n: int, granularity: str = "uniform", window: int = OUR_WINDOW,
               sinks: int = OUR_SINKS):
    """``(compressed copy of state's cache, KeepSet)`` for our ``policy`` keeping ``n`` tokens."""
    with settings(harness, state, window, sinks) as view:
        keep = harness.select(view, policy, Budget(tokens=n), granularity)
    return harness._compressed_cache(state, keep), keep


def press_cache(press, model, harness, state, rec: Recording):
    """A copy of ``state``'s cache compressed by ``press`` replayed on the recorded layers."""
    cache = harness._shallow_copy(state.cache)
    replay(press, model, rec, cache)
    return cache


def make_ours(name: str, soft_tokens: str | None = None, **options):
    return make_policy(name, **({"soft_tokens_path": soft_tokens} if name == "judgeq" else {}), **options)


def recover_indices(full_keys: torch.Tensor, kept_keys: torch.Tensor) -> torch.Tensor:
    """Which positions a press kept: ``full_keys [L, d]``, ``kept_keys [n, d]`` (gathered copies) -> ``[n]``
    positions, ascending. Raises if a kept key is not an exact copy of one position's key."""
    idx = torch.cdist(kept_keys.float(), full_keys.float()).argmin(dim=1)
    if not torch.equal(full_keys[idx], kept_keys):  # the nearest key must be the very same vector
        raise ValueError("a kept key matches no position exactly")
    return idx.sort().values


def overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """``|a & b| / max(|a|, |b|)`` of two index sets."""
    sa, sb = set(a.tolist()), set(b.tolist())
    return len(sa & sb) / max(len(sa), len(sb), 1)
