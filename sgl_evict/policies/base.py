"""The interface every eviction policy implements, and the registry of policies by name.

A policy is the unit: its class declares what the HF harness and the SGLang engine need to know about it (where
its queries come from, how its scores are transformed, whether they compare across layers, whether it can score
in one read), and the engine asks it instead of comparing names. Names appear only here, in :data:`POLICIES`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from sgl_evict.observation import LayerObservation

#: where a policy's queries come from, which decides what the engine captures or runs before it scores:
#: no queries (scored from token positions)
POSITIONS = "positions"
#: the prompt's last window of queries, each causal at its own position
WINDOW = "window"
#: the window queries re-rotated (RoPE) to the positions the answer will take; they see every prompt key
REROTATED_WINDOW = "rerotated_window"
#: the queries of the first decode steps, decoded on a provisional window-scored cache (``lookahead_steps``)
LOOKAHEAD = "lookahead"
#: queries of learned soft tokens run after the prompt in an extra forward
SOFT_TOKENS = "soft_tokens"
QUERY_SOURCES = (POSITIONS, WINDOW, REROTATED_WINDOW, LOOKAHEAD, SOFT_TOKENS)


@dataclass
class EvictionPolicy(ABC):
    """Scores the prompt tokens of one attention layer; the shared selector keeps the best.

    Subclasses are small dataclasses whose fields are the method's hyper-parameters, with the paper
    cited in the docstring. ``needs`` names the :class:`LayerObservation` fields the policy reads, so an
    engine captures only what the configured policy uses.
    """

    name: ClassVar[str]
    needs: ClassVar[tuple[str, ...]] = ()
    #: False for ``none``: the engine skips capture, scoring and selection entirely.
    compresses: ClassVar[bool] = True
    #: True when scores are comparable across layers, so a model-wide budget split is meaningful.
    comparable_across_layers: ClassVar[bool] = False
    #: one of :data:`QUERY_SOURCES`: what the engine must capture or run to score this policy.
    query_source: ClassVar[str] = POSITIONS
    #: score transform: each query head's attention weighted by ``|| W_o^h v_t ||`` (the engine then reads the
    #: values and the model's output projections).
    value_weighted: ClassVar[bool] = False
    #: the scores are the prefill attention of the window queries over the live keys, so the engine may normalise
    #: with the prefill's log-sum-exp and read the keys once.
    one_read: ClassVar[bool] = False

    @classmethod
    def uses(cls, field: str) -> bool:
        """Whether the policy reads this :class:`LayerObservation` field (``needs``): the engine loads or computes
        only what the policy uses (``rope``, ``o_proj_weight``, ``soft_token_queries``, ...)."""
        return field in cls.needs

    @classmethod
    def scores_at_prefill(cls) -> bool:
        """Whether the keep-set is known when the prefill ends (positions or window queries). Lookahead and
        soft-token policies score later, after decode steps or an extra forward: the engine's per_layer path
        and immediate eviction are built for the former only."""
        return cls.query_source in (POSITIONS, WINDOW, REROTATED_WINDOW)

    def score_positions(self, seq_len: int) -> torch.Tensor:
        """``[seq_len]`` float32 on the CPU: the engine's scores of a ``positions`` policy, one row for all layers and
        heads (the CPU generator keeps a seeded draw the same on every tensor-parallel rank)."""
        raise ValueError(f"policy {self.name!r} is scored from queries, not positions")

    @abstractmethod
    def score(self, obs: LayerObservation) -> torch.Tensor:
        """Importance of each prompt token: ``[num_kv_heads, seq_len]`` float32, higher is kept first."""

    def check(self, obs: LayerObservation) -> None:
        obs.require(*self.needs)


POLICIES: dict[str, type[EvictionPolicy]] = {}


def register(cls: type[EvictionPolicy]) -> type[EvictionPolicy]:
    """Class decorator adding a policy to :data:`POLICIES` under its ``name``."""
    if cls.name in POLICIES:
        raise ValueError(f"policy {cls.name!r} registered twice")
    if cls.query_source not in QUERY_SOURCES:
        raise ValueError(f"policy {cls.name!r}: query_source {cls.query_source!r} is not one of "
                         f"{', '.join(QUERY_SOURCES)}")
    POLICIES[cls.name] = cls
    return cls


def policy_class(name: str) -> type[EvictionPolicy]:
    """The registered class of ``name``; ValueError listing the valid names for any other value."""
    if not isinstance(name, str) or name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose from: {', '.join(sorted(POLICIES))}")
    return POLICIES[name]


def make_policy(name: str, **options) -> EvictionPolicy:
    """Builds a policy by name; unknown names and options fail with the valid choices listed."""
    cls = policy_class(name)
    fields = set(cls.__dataclass_fields__)
    unknown = sorted(set(options) - fields)
    if unknown:
        valid = ", ".join(sorted(fields)) or "none"
        raise ValueError(f"policy {name!r} has no option {', '.join(unknown)}; its options: {valid}")
    return cls(**options)
