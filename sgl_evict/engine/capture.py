"""Post-RoPE queries of each request's last prompt tokens, captured in the attention layers during prefill."""

from __future__ import annotations

import torch


class WindowQueryCapture:
    """Keeps, for the extend batch being run, the queries of the last ``window`` new tokens of every request.

    ``begin`` is called once per forward with the batch's extend lengths; ``record`` by every attention layer.
    Only the new (extended) tokens of a forward are visible, so a request whose last chunk or new turn is
    shorter than ``window`` gets that many queries.
    """

    def __init__(self, window: int):
        self.window = window
        self.forward_id: int | None = None
        self.num_queries: list[int] = []
        self._rows: torch.Tensor | None = None
        self.queries: dict[int, torch.Tensor] = {}
        self.scaling: dict[int, float] = {}

    def begin(self, forward_id: int, extend_seq_lens: list[int], device: torch.device | str) -> None:
        """Starts a forward whose requests extend by ``extend_seq_lens`` tokens (packed in that order)."""
        self.forward_id = forward_id
        self.num_queries = [min(self.window, n) for n in extend_seq_lens]
        rows, offset = [], 0
        for n, w in zip(extend_seq_lens, self.num_queries):
            # a request with fewer than `window` new tokens repeats its first captured row; those padding rows
            # are dropped again by `queries_of` (num_queries says how many are real)
            rows.extend([offset + n - w + max(0, j - (self.window - w)) for j in range(self.window)])
            offset += n
        self._rows = torch.tensor(rows, dtype=torch.long, device=device)
        self.queries.clear()
        self.scaling.clear()

    def end(self) -> None:
        self._rows = None

    @property
    def active(self) -> bool:
        return self._rows is not None

    def record(self, layer_id: int, q: torch.Tensor, num_heads: int, head_dim: int, scaling: float) -> None:
        """Stores layer ``layer_id``'s window queries from its packed ``q [num_tokens, num_heads * head_dim]``."""
        picked = q.reshape(q.shape[0], num_heads, head_dim).index_select(0, self._rows)
        # [num_reqs * window, heads, dim] -> [num_reqs, heads, window, dim]
        self.queries[layer_id] = picked.view(-1, self.window, num_heads, head_dim).transpose(1, 2)
        self.scaling[layer_id] = scaling

    def queries_of(self, req_index: int) -> dict[int, torch.Tensor]:
        """Layer id -> ``[num_heads, n, head_dim]`` window queries of the batch's ``req_index``-th request."""
        n = self.num_queries[req_index]
        return {layer: q[req_index, :, self.window - n:] for layer, q in self.queries.items()}
