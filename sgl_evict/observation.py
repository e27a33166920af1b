"""What a policy observes of one attention layer of one request after prefill."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sgl_evict.rope import RopeSpec


@dataclass
class LayerObservation:
    """Inputs a policy may score from; which fields must be set is the policy's ``needs``.

    Attributes:
        keys: ``[num_kv_heads, seq_len, head_dim]`` post-RoPE prompt keys; key ``t`` is at position ``t``.
        scaling: attention logit scale of the layer.
        num_q_heads: query heads of the layer (a multiple of ``num_kv_heads``).
        window_queries: ``[num_q_heads, window, head_dim]`` post-RoPE queries of the last ``window``
            prompt tokens (positions ``seq_len - window .. seq_len - 1``).
        lookahead_queries: ``[num_q_heads, steps, head_dim]`` post-RoPE queries of the first decode steps
            after the prompt (positions ``seq_len ..``), decoded on a provisionally compressed cache.
        soft_token_queries: ``[num_q_heads, k, head_dim]`` post-RoPE queries of learned soft tokens
            appended after the prompt.
        values: ``[num_kv_heads, seq_len, head_dim]``.
        o_proj_weight: ``[hidden_size, num_q_heads * head_dim]`` the layer's output projection.
        rope: the layer's RoPE, to move queries to other positions.
        logit_softcap: attention logit soft-cap of the layer, or ``None``.
    """

    keys: torch.Tensor
    scaling: float
    num_q_heads: int
    window_queries: torch.Tensor | None = None
    lookahead_queries: torch.Tensor | None = None
    soft_token_queries: torch.Tensor | None = None
    values: torch.Tensor | None = None
    o_proj_weight: torch.Tensor | None = None
    rope: RopeSpec | None = None
    logit_softcap: float | None = None

    @property
    def seq_len(self) -> int:
        return self.keys.shape[1]

    @property
    def num_kv_heads(self) -> int:
        return self.keys.shape[0]

    def window_positions(self) -> torch.Tensor:
        """``[window]`` positions of ``window_queries`` (the prompt's last tokens)."""
        window = self.window_queries.shape[1]
        return torch.arange(self.seq_len - window, self.seq_len, device=self.keys.device)

    def require(self, *fields: str) -> None:
        """Raises a clear error naming the missing inputs instead of failing deep inside the math."""
        missing = [f for f in fields if getattr(self, f) is None]
        if missing:
            raise ValueError(f"this policy needs {', '.join(missing)} in its LayerObservation")
