"""Scoring and statistics of the quality suite: exact match, fidelity to the reference, Wilson intervals,
paired comparisons. Pure functions of token ids and counts (no torch)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

#: 95% two-sided normal quantile
Z95 = 1.959963984540054


def exact_match(answers: Sequence[str], text: str) -> bool:
    """Every expected answer appears in ``text`` (RULER's string match, all-or-nothing)."""
    return all(a in text for a in answers)


@dataclass(frozen=True)
class Interval:
    """A proportion ``k / n`` with its 95% Wilson score interval ``[low, high]``."""

    k: int
    n: int
    low: float
    high: float

    @property
    def value(self) -> float:
        return self.k / self.n if self.n else math.nan

    def as_dict(self) -> dict:
        return {"k": self.k, "n": self.n, "value": self.value, "low": self.low, "high": self.high}


def wilson(k: int, n: int, z: float = Z95) -> Interval:
    """Wilson score interval of ``k`` successes in ``n`` trials (``[nan, nan]`` when ``n`` is 0).

    Unlike the normal approximation it stays inside ``[0, 1]`` and is sound at 0 or ``n`` successes."""
    if not 0 <= k <= n:
        raise ValueError(f"wilson: need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return Interval(0, 0, math.nan, math.nan)
    return Interval(k, n, *wilson_bounds(k / n, n, z))


def wilson_bounds(p: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson interval ``(low, high)`` of a proportion ``p`` observed over ``n >= 1`` trials (``p`` may be a
    mean of partial successes)."""
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_p(only_reference: int, only_arm: int) -> float:
    """Two-sided exact McNemar p-value from the discordant pairs: prompts only the reference answered
    (``only_reference``) and prompts only the evicting arm answered (``only_arm``); 1.0 when there are none."""
    n = only_reference + only_arm
    if n == 0:
        return 1.0
    k = min(only_reference, only_arm)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


@dataclass(frozen=True)
class Fidelity:
    """Greedy agreement of an evicting answer with the reference's, position by position.

    Attributes:
        horizon: positions compared (the shorter answer's length, at most the horizon asked for).
        same_inside: positions ``< split`` (laq's lookahead steps) with the same token.
        inside: positions ``< split`` compared.
        same_beyond: positions ``>= split`` with the same token.
        beyond: positions ``>= split`` compared.
        prefix: tokens before the first divergence (``horizon`` when none).
    """

    horizon: int
    same_inside: int
    inside: int
    same_beyond: int
    beyond: int
    prefix: int


def fidelity(answer: Sequence[int], reference: Sequence[int], horizon: int, split: int) -> Fidelity:
    """Compares the first ``horizon`` tokens of ``answer`` with ``reference``, positions ``< split`` and
    ``>= split`` apart (laq scores with its first ``split`` decode steps: agreement there favours it)."""
    if horizon < 1 or split < 0:
        raise ValueError(f"fidelity: horizon must be >= 1 and split >= 0, got {horizon}, {split}")
    n = min(horizon, len(answer), len(reference))
    same = [answer[i] == reference[i] for i in range(n)]
    prefix = same.index(False) if False in same else n
    inside = min(split, n)
    return Fidelity(n, sum(same[:inside]), inside, sum(same[inside:]), n - inside, prefix)
