"""The interface every eviction policy implements, and the registry of policies by name."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from sgl_evict.observation import LayerObservation


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
    POLICIES[cls.name] = cls
    return cls


def make_policy(name: str, **options) -> EvictionPolicy:
    """Builds a policy by name; unknown names and options fail with the valid choices listed."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose from: {', '.join(sorted(POLICIES))}")
    cls = POLICIES[name]
    fields = set(cls.__dataclass_fields__)
    unknown = sorted(set(options) - fields)
    if unknown:
        valid = ", ".join(sorted(fields)) or "none"
        raise ValueError(f"policy {name!r} has no option {', '.join(unknown)}; its options: {valid}")
    return cls(**options)
