"""TOVA: keep the tokens the prompt's last token attends to most."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sgl_evict.observation import LayerObservation
from sgl_evict.policies.base import register
from sgl_evict.policies.window import QueryScoringPolicy


@register
@dataclass
class TOVA(QueryScoringPolicy):
    """TOVA: token omission via attention, scored by the last prompt token's query alone.

    Paper: Oren et al., "Transformers are Multi-State RNNs" (2024); kvpress's ``TOVAPress``. The score of a key
    is the attention the prompt's last query pays it, averaged over each KV head's query heads, not pooled. The
    window of recent tokens stays protected by the selector, as for every policy. kvpress also averages over all
    heads (one score per token); here each KV head keeps its own row, as the other query policies do.
    """

    name = "tova"
    needs = ("window_queries",)
    # the last window query, causal, over the live keys: the prefill's own LSE normalises it
    one_read = True
    pooled = False
    window_queries_used = 1
    pooling_kernel: int = 1

    def score(self, obs: LayerObservation) -> torch.Tensor:
        self.check(obs)
        return self.score_window(obs)
