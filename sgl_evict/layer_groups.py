"""Layer groups of issue 9's layered KV pool (``--kv-evict-granularity per_layer``): which layers a group holds, and
so what its keep-set must serve (docs/design.md, "Per-layer budgets: a layered KV pool", "Sliding-window layers").

Pure Python, shared by the server's selection (:mod:`sgl_evict.engine.group_keep`) and the HF harness
(``EvictionHarness(layer_groups=G)``), so both group a model's layers the same way.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GroupLayout:
    """G groups of ``L / G`` consecutive layers (the layered pool's grouping); group ``g`` holds layers
    ``g L / G .. (g + 1) L / G - 1``.

    A group holding a full-attention layer is **scored**: it keeps what the policy selects from its full-attention
    layers' scores, which always includes the prompt's last ``protected_recent`` tokens, so sliding-window layers
    sharing the group read exactly what they would unevicted. A group of sliding-window layers only is
    **window-only**: it keeps the prompt's last ``protected_recent`` tokens and nothing else, because those layers
    never read further back (every later token extends the window forward, and evicted prompt tokens never return).

    Attributes:
        num_layers: L, the model's layers.
        num_groups: G; must divide L.
        window_layers: ids of the sliding-window layers (empty for full-attention models).
    """

    num_layers: int
    num_groups: int
    window_layers: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        if self.num_groups < 1 or self.num_layers % self.num_groups:
            raise ValueError(f"{self.num_groups} layer groups do not divide {self.num_layers} layers")
        if any(not 0 <= layer < self.num_layers for layer in self.window_layers):
            raise ValueError(f"sliding-window layers {sorted(self.window_layers)} outside 0..{self.num_layers - 1}")
        if not self.scored_groups:
            raise ValueError("every layer has a sliding window: nothing to select per layer")

    def group_of(self, layer: int) -> int:
        """The group of layer ``layer``."""
        return layer // (self.num_layers // self.num_groups)

    @property
    def scored_groups(self) -> tuple[int, ...]:
        """Groups holding at least one full-attention layer, ascending."""
        full = set(range(self.num_layers)) - self.window_layers
        return tuple(sorted({self.group_of(layer) for layer in full}))

    @property
    def window_only_groups(self) -> tuple[int, ...]:
        """Groups of sliding-window layers only, ascending."""
        return tuple(g for g in range(self.num_groups) if g not in self.scored_groups)

    def mixed_groups(self) -> tuple[int, ...]:
        """Scored groups that also hold sliding-window layers: correct (the keep-set contains the window) but those
        layers hold the full-attention layers' keep-set, more than the window they read."""
        return tuple(g for g in self.scored_groups if any(self.group_of(layer) == g for layer in self.window_layers))
