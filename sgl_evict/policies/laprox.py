"""Output-aware scoring: attention times what the token writes through the output projection."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sgl_evict.observation import LayerObservation
from sgl_evict.policies.base import register
from sgl_evict.policies.window import QueryScoringPolicy
from sgl_evict.scoring import projected_value_norms


@register
@dataclass
class OutputAwareProxy(QueryScoringPolicy):
    """LAProx: layer-attention-output proxy.

    Attention alone says where a head looks, not how much that changes the layer's output. The score
    of token ``t`` for query head ``h`` is its mean window attention times ``|| W_o^h v_t ||``, the norm
    of what the token adds to the residual stream through that head; a KV head sums its group. The
    result is in residual-stream units, comparable across heads and layers, which makes a
    model-wide budget split (``per_layer`` with ``global_budget``) meaningful.
    """

    name = "laprox"
    needs = ("window_queries", "values", "o_proj_weight")
    comparable_across_layers = True
    value_weighted = True
    one_read = True
    gqa_reduce: str = "sum"

    def score(self, obs: LayerObservation) -> torch.Tensor:
        self.check(obs)
        weights = projected_value_norms(obs.values, obs.o_proj_weight, obs.num_q_heads)
        return self._score(obs, obs.window_queries, obs.window_positions(), value_weights=weights)
