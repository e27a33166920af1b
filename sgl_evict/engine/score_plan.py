"""Query scoring of a batch of requests from the paged pool: planned once per batch, run once per layer.

As FlashInfer's wrappers do, :class:`ScorePlan` does the per-batch work once (which requests share a kernel launch,
their slot table, lengths and query positions, the re-rotation table) and :meth:`ScorePlan.run` scores one layer of
every request with one :func:`~sgl_evict.kernels.paged_scoring.attention_mass_paged` launch per group of requests
that share a launch's constants (query count, causal or not, re-rotated or not, window LSE or not). Before it, a
prefill batch of ``R`` snapkv requests cost ``R`` launches per layer; now one.

:func:`score_requests` runs a plan over all layers and finishes each request's scores (value weighting, pooling,
GQA reduction, holes zeroed) to ``[num_layers, num_kv_heads, seq_len]``: what the per-request scorers of
:mod:`sgl_evict.engine.keep` return, which are plans of one request.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from sgl_evict.holes import HOLE, is_live
from sgl_evict.kernels.rope_rerotate import RerotatePlan
from sgl_evict.rope import RopeSpec
from sgl_evict.scoring import finish_scores

MassFn = Callable[..., torch.Tensor]
"""``attention_mass_paged``'s signature: (queries, k_buffer, req_to_token, seq_lens, scaling, query_positions), and
its keyword ``row_lse`` when a window LSE is given."""


@dataclass(frozen=True)
class ScoreRequest:
    """One request's scoring inputs.

    Attributes:
        row: ``[seq_len]`` int logical slot row of the keys scored (``HOLE`` at holes).
        queries: layer id -> ``[num_q_heads, n, head_dim]`` post-RoPE observation queries, ``n`` the same in every
            layer.
        causal: True: the queries of the prompt's last ``n`` tokens (positions ``seq_len - n ..``, each sees the
            keys up to its own position); False: queries after the prompt (lookahead steps, soft tokens, dapq's
            re-rotated window), each sees every key.
        pooling_kernel: odd max-pooling width over neighbouring tokens.
        lse: layer id -> ``[num_q_heads, n]`` natural log-sum-exp of each query over the row's live keys (the
            prefill attention's, causal queries only): those layers read their keys once.
        rope: dapq: the window queries are re-rotated by ``n`` positions (to the answer's first ``n`` positions,
            ``seq_len + i``) before scoring, non-causal.
        value_norms: laprox: layer id -> ``[num_q_heads, seq_len]`` weights of each head's attention (projected
            value norms); a GQA group is then summed, not averaged.
        row_of: layered pool: layer id -> ``[seq_len]`` the slots of ``row`` in that layer's buffer; None: ``row``.
    """

    row: torch.Tensor
    queries: Mapping[int, torch.Tensor]
    causal: bool
    pooling_kernel: int = 1
    lse: Mapping[int, torch.Tensor] = field(default_factory=dict)
    rope: RopeSpec | None = None
    value_norms: Callable[[int], torch.Tensor] | None = None
    row_of: Callable[[int], torch.Tensor] | None = None

    def __post_init__(self):
        if self.lse and not self.causal:
            raise ValueError("a window LSE normalises causal window queries: non-causal queries cannot use it")
        if self.lse and self.row_of is not None:
            raise ValueError("the window LSE is over the logical row's keys, not a layer group's")
        if self.rope is not None and self.causal:
            raise ValueError("dapq's re-rotated queries sit after the prompt: they are scored non-causal")

    @property
    def num_queries(self) -> int:
        return next(iter(self.queries.values())).shape[1] if self.queries else 0


@dataclass
class _Launch:
    """Requests of one plan that share a kernel launch per layer; shapes for ``R`` requests, ``n`` queries."""

    members: list[int]  # indices into the plan's requests
    lse: bool  # its requests read their keys once where they have a layer's window LSE
    table: torch.Tensor  # [R, max_len] slot rows, HOLE-padded
    lens: torch.Tensor  # [R] int32
    positions: torch.Tensor | None  # [R, n] query positions (causal), else None
    rerotate: RerotatePlan | None
    layer_tables: dict[int, torch.Tensor] = field(default_factory=dict)  # layered pool: row_of's table per layer


class ScorePlan:
    """The batch's requests grouped into launches, planned once (:meth:`plan`); :meth:`run` per layer.

    Usage::

        plan = ScorePlan.plan(requests)
        for layer in plan.layers:
            masses = plan.run(layer, key_buffer(layer), scaling[layer], attention_mass)  # per request [Hq, seq_len]
    """

    def __init__(self, requests: Sequence[ScoreRequest], launches: list[_Launch]):
        self.requests = list(requests)
        self.launches = launches

    @classmethod
    def plan(cls, requests: Sequence[ScoreRequest]) -> ScorePlan:
        """Groups ``requests`` by what a launch fixes (query count, causal, re-rotation, LSE, layered or not) and
        builds each group's slot table, lengths, query positions and re-rotation table once."""
        groups: dict[tuple, list[int]] = {}
        for index, request in enumerate(requests):
            key = (request.num_queries, request.causal, id(request.rope) if request.rope else None, bool(request.lse),
                   request.row_of is not None)
            groups.setdefault(key, []).append(index)
        launches = []
        for (num_queries, causal, _, lse, _), members in groups.items():
            rows = [requests[i].row for i in members]
            lens = [row.shape[0] for row in rows]
            device = rows[0].device
            table = _padded_table(rows)
            positions = None
            if causal:
                offsets = torch.arange(num_queries, device=device)
                positions = torch.stack([offsets + (n - num_queries) for n in lens])
            rope = requests[members[0]].rope
            rerotate = None
            if rope is not None:
                # query i moves from seq_len - n + i to seq_len + i: a rotation by n, the same for every request
                rerotate = RerotatePlan(rope)
                offsets = torch.arange(num_queries, device=device)
                rerotate.plan(offsets, offsets + num_queries)
            launches.append(_Launch(members, lse, table, torch.tensor(lens, dtype=torch.int32, device=device),
                                    positions, rerotate))
        return cls(requests, launches)

    @property
    def layers(self) -> list[int]:
        """Every layer id any request has queries for, in order."""
        return sorted({layer for request in self.requests for layer in request.queries})

    def run(self, layer: int, keys: torch.Tensor, scaling: float, attention_mass: MassFn,
            check_one_read: Callable[[int, torch.Tensor, torch.Tensor], object] | None = None
            ) -> list[torch.Tensor | None]:
        """Layer ``layer``'s ``[num_q_heads, seq_len]`` mean attention of each request's queries over its keys
        (``keys``: ``[pool_slots, num_kv_heads, head_dim]``, that layer's buffer), in the plan's request order;
        None for a request without queries in that layer. One ``attention_mass`` launch per group (two if only
        some of a one-read group's requests have this layer's LSE). ``check_one_read(layer, one_read,
        two_pass)``: when given, every one-read mass is also computed in two passes and handed to it."""
        out: list[torch.Tensor | None] = [None] * len(self.requests)
        for launch in self.launches:
            present = [i for i in launch.members if layer in self.requests[i].queries]
            if not present:
                continue
            with_lse = [i for i in present if layer in self.requests[i].lse] if launch.lse else []
            without = [i for i in present if i not in with_lse]
            for part, one_read in ((with_lse, True), (without, False)):
                if part:
                    self._run_part(launch, part, one_read, layer, keys, scaling, attention_mass, check_one_read, out)
        return out

    def _run_part(self, launch: _Launch, part: list[int], one_read: bool, layer: int, keys: torch.Tensor,
                  scaling: float, attention_mass: MassFn, check: Callable | None,
                  out: list[torch.Tensor | None]) -> None:
        rows = [launch.members.index(i) for i in part]
        whole = len(rows) == len(launch.members)
        select = None if whole else torch.tensor(rows, device=launch.lens.device)

        def pick(x: torch.Tensor | None) -> torch.Tensor | None:
            return x if x is None or select is None else x.index_select(0, select)

        picked = [self.requests[i].queries[layer] for i in part]
        queries = picked[0].unsqueeze(0) if len(picked) == 1 else torch.stack(picked)  # [R, Hq, n, d]
        if launch.rerotate is not None:
            queries = launch.rerotate.run(queries)
        table = pick(self._table(launch, layer))
        lens, positions = pick(launch.lens), pick(launch.positions)
        if one_read:
            picked = [self.requests[i].lse[layer] for i in part]
            lse = picked[0].unsqueeze(0) if len(picked) == 1 else torch.stack(picked)  # [R, Hq, n]
            mass = attention_mass(queries, keys, table, lens, scaling, positions, row_lse=lse)
            if check is not None:
                two_pass = attention_mass(queries, keys, table, lens, scaling, positions)
                for r, i in enumerate(part):
                    n = self.requests[i].row.shape[0]
                    check(layer, mass[r, :, :n], two_pass[r, :, :n])
        else:
            mass = attention_mass(queries, keys, table, lens, scaling, positions)
        for r, i in enumerate(part):
            out[i] = mass[r, :, : self.requests[i].row.shape[0]]

    def _table(self, launch: _Launch, layer: int) -> torch.Tensor:
        """The launch's ``[R, max_len]`` slot table for ``layer``: the logical rows, or (layered pool) each request's
        slots in that layer's buffer, built once per distinct table."""
        first = self.requests[launch.members[0]]
        if first.row_of is None:
            return launch.table
        if layer not in launch.layer_tables:
            rows = [self.requests[i].row_of(layer) for i in launch.members]
            # layers of one group share their rows (row_of caches per group): share their table too
            for other, table in launch.layer_tables.items():
                if all(self.requests[i].row_of(other) is row for i, row in zip(launch.members, rows)):
                    launch.layer_tables[layer] = table
                    break
            else:
                launch.layer_tables[layer] = _padded_table(rows)
        return launch.layer_tables[layer]


def _padded_table(rows: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[R, max_len]`` the rows one under another, ``HOLE`` past each row's end (a single row: a view of it)."""
    if len(rows) == 1:
        return rows[0].view(1, -1)
    width = max(row.shape[0] for row in rows)
    table = torch.full((len(rows), width), HOLE, dtype=rows[0].dtype, device=rows[0].device)
    for r, row in enumerate(rows):
        table[r, : row.shape[0]] = row
    return table


def score_requests(requests: Sequence[ScoreRequest], scaling: Mapping[int, float],
                   key_buffer: Callable[[int], torch.Tensor], attention_mass: MassFn,
                   check_one_read: Callable[[int, torch.Tensor, torch.Tensor], object] | None = None
                   ) -> list[torch.Tensor]:
    """Each request's ``[num_layers, num_kv_heads, seq_len]`` float32 scores (layers in order), zero at holes.

    Per layer one :meth:`ScorePlan.run` (one launch per group of requests), then per request its mass times its
    ``value_norms`` (laprox), max-pooled with its ``pooling_kernel``, reduced over each GQA group (summed with
    value norms, as the harness's laprox does, else averaged).
    """
    plan = ScorePlan.plan(requests)
    per_request: list[list[torch.Tensor]] = [[] for _ in requests]
    for layer in plan.layers:
        keys = key_buffer(layer)
        masses = plan.run(layer, keys, scaling[layer], attention_mass, check_one_read)
        for request, mass, scores in zip(requests, masses, per_request):
            if mass is None:
                continue
            weights = None if request.value_norms is None else request.value_norms(layer)
            scores.append(finish_scores(mass, keys.shape[1], request.pooling_kernel, "max",
                                        "mean" if weights is None else "sum", weights))
    finished = []
    for request, scores in zip(requests, per_request):
        stacked = torch.stack(scores)
        # pooling spreads a neighbour's score onto a hole; a hole has no KV to keep
        finished.append(stacked * is_live(request.row).to(stacked.dtype))
    return finished
