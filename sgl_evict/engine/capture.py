"""Post-RoPE queries of each request's last prompt tokens, captured in the attention layers during prefill."""

from __future__ import annotations

import torch


class WindowQueryCapture:
    """Keeps, for the extend batch being run, the queries of the last ``window`` new tokens of every request.

    ``begin`` is called once per forward with the batch's extend lengths; ``record`` by every attention layer.
    Only the new (extended) tokens of a forward are visible, so a request whose last chunk or new turn is
    shorter than ``window`` gets that many queries.

    On FlashInfer the attention backend's hook (``patches/flashinfer_lse.py``) also records, per layer, the natural
    log-sum-exp of those rows' attention (:meth:`record_lse`), which lets the scorer read the keys once
    (:meth:`lse_of`); a layer without it is scored in two passes, ``lse_skipped`` says why.
    """

    def __init__(self, window: int):
        self.window = window
        self.forward_id: int | None = None
        self.num_queries: list[int] = []
        self._rows: torch.Tensor | None = None
        self.queries: dict[int, torch.Tensor] = {}
        self.scaling: dict[int, float] = {}
        self.lse: dict[int, torch.Tensor] = {}
        self.lse_skipped: dict[int, str] = {}
        self.attended_lens: list[int] | None = None
        self._rows_with_prefix: torch.Tensor | None = None

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
        self.lse.clear()
        self.lse_skipped.clear()
        self.attended_lens = None
        self._rows_with_prefix = None

    def end(self) -> None:
        self._rows = None

    @property
    def active(self) -> bool:
        return self._rows is not None

    @property
    def rows(self) -> torch.Tensor:
        """``[num_reqs * window]`` long: the batch's query tokens captured, ``window`` per request in batch order
        (a request with fewer new tokens repeats its first one)."""
        return self._rows

    def rows_with_prefix(self, extend_prefix_lens: list[int]) -> torch.Tensor:
        """``[num_reqs * window]`` bool: the :attr:`rows` whose request attended a prefix (``extend_prefix_lens``:
        the batch's per request). Built once per forward, on the device: every layer of the forward asks."""
        if self._rows_with_prefix is None:
            has_prefix = torch.tensor([n > 0 for n in extend_prefix_lens], device=self._rows.device)
            self._rows_with_prefix = has_prefix.repeat_interleave(self.window)
        return self._rows_with_prefix

    def wants_lse(self, layer_id: int) -> bool:
        """Whether layer ``layer_id``'s window queries were captured in the forward being run."""
        return self.active and layer_id in self.queries

    def record(self, layer_id: int, q: torch.Tensor, num_heads: int, head_dim: int, scaling: float) -> None:
        """Stores layer ``layer_id``'s window queries from ``q``: ``[num_tokens, num_heads * head_dim]``, or any layout
        holding the tokens in order (Gemma 3 passes ``[1, num_tokens, num_heads, head_dim]``, non-contiguous)."""
        picked = q.reshape(-1, num_heads, head_dim).index_select(0, self._rows)
        # [num_reqs * window, heads, dim] -> [num_reqs, heads, window, dim]
        self.queries[layer_id] = picked.view(-1, self.window, num_heads, head_dim).transpose(1, 2)
        self.scaling[layer_id] = scaling

    def record_lse(self, layer_id: int, lse: torch.Tensor, attended_lens: list[int]) -> None:
        """Stores layer ``layer_id``'s ``[num_reqs * window, num_q_heads]`` natural LSE of the :attr:`rows`'
        attention; ``attended_lens``: ``[num_reqs]`` keys each request's attention saw (its compacted length)."""
        self.lse[layer_id] = lse.view(-1, self.window, lse.shape[-1]).transpose(1, 2)
        self.attended_lens = attended_lens

    def skip_lse(self, layer_id: int, reason: str) -> None:
        """Layer ``layer_id``'s attention gave no usable LSE, for ``reason``: it is scored in two passes."""
        self.lse_skipped[layer_id] = reason

    def lse_of(self, req_index: int, live_len: int) -> tuple[dict[int, torch.Tensor], str | None]:
        """Layer id -> ``[num_heads, n]`` natural LSE of the ``req_index``-th request's window rows, for the layers
        that have one, and why some or all layers have none (None when every captured layer has one).

        ``live_len``: the live keys of the request's row the scorer reads. The LSE is the normaliser of the keys
        attention saw, so it is handed out only when that count is the same: the scorer and attention then see the
        same keys (attention's compacted row is the row's live slots, in order, and the window rows are the row's
        last, all live), and the scorer's causal positions are attention's causal mask on that row.
        """
        if not self.lse:
            return {}, next(iter(self.lse_skipped.values()), "no window LSE captured (the attention backend is not "
                                                              "FlashInfer)")
        attended = self.attended_lens[req_index]
        if attended != live_len:
            return {}, f"attention saw {attended} keys, the scorer reads {live_len}"
        n = self.num_queries[req_index]
        found = {layer: lse[req_index, :, self.window - n:] for layer, lse in self.lse.items()}
        missing = sorted(set(self.queries) - set(found))
        reason = None if not missing else f"layers {missing} without LSE ({self.lse_skipped.get(missing[0], '?')})"
        return found, reason

    def queries_of(self, req_index: int) -> dict[int, torch.Tensor]:
        """Layer id -> ``[num_heads, n, head_dim]`` window queries of the batch's ``req_index``-th request."""
        n = self.num_queries[req_index]
        return {layer: q[req_index, :, self.window - n:] for layer, q in self.queries.items()}


class DecodeQueryCapture:
    """Post-RoPE queries of chosen requests of a decode forward (laq's lookahead steps), eager or in a CUDA graph.

    Decode forwards mostly replay CUDA graphs, where Python hooks do not run: only the tensor operations recorded
    at capture replay, on the tensors captured then. So the attention hook records, at capture, a gather from the
    layer's packed queries by a static index tensor (``_sel``) into a static per-layer buffer (``_static``), both
    allocated before the graphs are captured (:meth:`allocate`). Before every decode forward, :meth:`begin` writes
    the batch positions of the requests whose queries are wanted into ``_sel``; a replay then gathers them. A
    forward that runs eagerly (no graph for its batch size, or graphs off) records straight from the queries.
    At most ``capacity`` requests per forward can be gathered in a graph; a batch with more must run eagerly
    (:attr:`needs_eager`).
    """

    def __init__(self):
        self.capacity = 0
        self._sel: torch.Tensor | None = None
        self._sel_dirty = False  # _sel holds positions other than 0
        self._static: dict[int, torch.Tensor] = {}
        self._positions: torch.Tensor | None = None
        self._eager: dict[int, torch.Tensor] = {}
        self.count = 0

    def allocate(self, layers: dict[int, tuple[int, int]], capacity: int, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        """Static buffers for graph capture: ``layers`` maps layer id -> ``(num_q_heads, head_dim)``."""
        self.capacity = capacity
        self._sel = torch.zeros(capacity, dtype=torch.long, device=device)
        self._static = {layer: torch.zeros(capacity, heads, dim, dtype=dtype, device=device)
                        for layer, (heads, dim) in layers.items()}

    def begin(self, positions: list[int], device: torch.device | str) -> None:
        """Starts a decode forward whose batch positions ``positions`` are wanted (empty: none)."""
        self.count = len(positions)
        self._eager = {}
        self._positions = torch.tensor(positions, dtype=torch.long, device=device) if positions else None
        # every replay gathers, also for batches that want nothing, so every entry is rewritten (to 0 when nothing
        # is wanted): a stale position from a larger batch would index past a smaller graph's rows
        if self._sel is not None and self.count <= self.capacity and (positions or self._sel_dirty):
            padded = positions + [0] * (self.capacity - self.count)
            self._sel.copy_(torch.tensor(padded, dtype=torch.long))
            self._sel_dirty = bool(positions)

    @property
    def needs_eager(self) -> bool:
        """Whether this forward wants more requests than a graph replay can gather."""
        return self.count > self.capacity

    def record(self, layer_id: int, q: torch.Tensor, num_heads: int, head_dim: int, capturing: bool) -> None:
        """Records layer ``layer_id``'s queries ``q [bs, num_heads * head_dim]`` (or ``[1, bs, num_heads, head_dim]``) of a
        decode forward.

        ``capturing``: this call is being recorded into a CUDA graph (``torch.cuda.is_current_stream_capturing``).
        """
        if capturing:
            out = self._static.get(layer_id)
            if out is not None:
                out.copy_(q.reshape(-1, num_heads, head_dim).index_select(0, self._sel))
        elif self._positions is not None:
            self._eager[layer_id] = q.reshape(-1, num_heads, head_dim).index_select(0, self._positions)

    def take(self) -> dict[int, torch.Tensor]:
        """Layer id -> ``[count, num_q_heads, head_dim]`` queries of the wanted requests, in ``begin``'s order.

        After an eager forward, what it recorded; after a graph replay, copies of the static buffers (the next
        replay overwrites them). Empty when nothing was wanted or nothing was recorded.
        """
        if self.count == 0:
            return {}
        if self._eager:
            taken = self._eager
        elif self.needs_eager:
            taken = {}
        else:
            taken = {layer: out[: self.count].clone() for layer, out in self._static.items()}
        self.count, self._eager, self._positions = 0, {}, None
        return taken
