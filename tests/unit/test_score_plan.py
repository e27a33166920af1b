"""Batch scoring planned once, run per layer (sgl_evict.engine.score_plan): a batch of requests scores in one
kernel launch per layer and group, with each request's scores what it gets scored alone and what the harness's
reference scorer gives; evict_after_prefill and evict_after_lookahead score their batches that way."""

from types import SimpleNamespace

import pytest
import torch

from sgl_evict.config import EvictionConfig
from sgl_evict.engine.capture import WindowQueryCapture
from sgl_evict.engine.evict_batch import evict_after_lookahead, evict_after_prefill
from sgl_evict.engine.lookahead import PendingLookahead
from sgl_evict.engine.runtime import EngineState
from sgl_evict.engine.score_plan import ScorePlan, ScoreRequest, score_requests
from sgl_evict.holes import HOLE
from sgl_evict.kernels.paged_scoring import attention_mass_paged
from sgl_evict.rope import RopeSpec, rerotate
from sgl_evict.scoring import finish_scores
from sgl_evict.selection import Budget

HKV, GROUP, D = 2, 2, 16
HQ = HKV * GROUP
LAYERS = (0, 2)
SCALING = {0: 0.3, 2: 0.2}
ROPE = RopeSpec.from_config({"head_dim": D, "rope_theta": 10000.0, "hidden_size": 64, "num_attention_heads": 4})


class CountingMass:
    """attention_mass_paged, counting its launches and the requests of each."""

    def __init__(self):
        self.launches: list[int] = []

    def __call__(self, queries, *args, **kwargs):
        self.launches.append(queries.shape[0])
        return attention_mass_paged(queries, *args, **kwargs)


def _setup(seed, lens, holes=()):
    gen = torch.Generator().manual_seed(seed)
    slots = torch.randperm(sum(lens) + 20, generator=gen) + 1
    pools = {layer: torch.randn(sum(lens) + 21, HKV, D, generator=gen) for layer in LAYERS}
    rows, start = [], 0
    for n in lens:
        row = slots[start:start + n].to(torch.int32)
        start += n
        rows.append(row)
    for r, t in holes:
        rows[r][t] = HOLE
    return gen, pools, rows


def _queries(gen, n):
    return {layer: torch.randn(HQ, n, D, generator=gen) for layer in LAYERS}


def _reference(request: ScoreRequest, pools) -> torch.Tensor:
    """Dense scores of the request: softmax over its live keys at their logical positions, mean over the queries,
    then the harness's finishing (value weights, pooling, GQA); holes scored 0."""
    live = request.row != HOLE
    seq_len = request.row.shape[0]
    out = []
    for layer in LAYERS:
        keys = pools[layer][request.row.clamp_min(0).long()].transpose(0, 1).repeat_interleave(GROUP, 0)
        q = request.queries[layer]
        n = q.shape[1]
        if request.rope is not None:
            q = rerotate(q, torch.arange(seq_len - n, seq_len), torch.arange(seq_len, seq_len + n), request.rope)
        logits = torch.einsum("hwd,hnd->hwn", q.float(), keys) * SCALING[layer]
        masked = ~live[None, None].expand_as(logits)
        if request.causal:
            masked = masked | (torch.arange(seq_len)[None, None] > torch.arange(seq_len - n, seq_len)[None, :, None])
        probs = logits.masked_fill(masked, float("-inf")).softmax(-1)
        weights = None if request.value_norms is None else request.value_norms(layer)
        out.append(finish_scores(probs.mean(1), HKV, request.pooling_kernel, "max",
                                 "mean" if weights is None else "sum", weights))
    return torch.stack(out) * live.float()


def _lse(request: ScoreRequest, pools) -> dict[int, torch.Tensor]:
    """Each layer's natural LSE of the request's causal queries over its live keys (what FlashInfer returns)."""
    live = request.row != HOLE
    seq_len = request.row.shape[0]
    found = {}
    for layer in LAYERS:
        keys = pools[layer][request.row.clamp_min(0).long()].transpose(0, 1).repeat_interleave(GROUP, 0)
        q = request.queries[layer]
        n = q.shape[1]
        logits = torch.einsum("hwd,hnd->hwn", q, keys) * SCALING[layer]
        masked = (torch.arange(seq_len)[None, None] > torch.arange(seq_len - n, seq_len)[None, :, None]) | ~live
        found[layer] = logits.masked_fill(masked, float("-inf")).logsumexp(-1)
    return found


def test_a_batch_scores_each_request_as_alone_and_as_the_reference_in_one_launch_per_layer_and_group():
    lens = [45, 70, 33, 58, 40, 66]
    gen, pools, rows = _setup(11, lens, holes=[(1, 3), (1, 4), (3, 20)])
    norms = {layer: torch.rand(HQ, lens[4], generator=gen) + 0.5 for layer in LAYERS}
    requests = [
        ScoreRequest(rows[0], _queries(gen, 6), causal=True, pooling_kernel=5),  # snapkv
        ScoreRequest(rows[1], _queries(gen, 6), causal=True, pooling_kernel=5),  # snapkv, holes
        ScoreRequest(rows[2], _queries(gen, 4), causal=True, pooling_kernel=1),  # a shorter window: its own launch
        ScoreRequest(rows[3], _queries(gen, 3), causal=False, pooling_kernel=3),  # lookahead steps
        ScoreRequest(rows[4], _queries(gen, 6), causal=True, pooling_kernel=5, value_norms=norms.__getitem__),
        ScoreRequest(rows[5], _queries(gen, 6), causal=False, pooling_kernel=7, rope=ROPE),  # dapq
    ]
    mass = CountingMass()
    batched = score_requests(requests, SCALING, pools.__getitem__, mass)
    # four launches per layer: the window-6 causal group (snapkv x2, laprox), window 4, lookahead, dapq
    assert mass.launches == [3, 1, 1, 1] * len(LAYERS)
    for request, got in zip(requests, batched):
        alone = score_requests([request], SCALING, pools.__getitem__, attention_mass_paged)[0]
        assert got.shape == (len(LAYERS), HKV, request.row.shape[0])
        assert torch.allclose(got, alone, rtol=1e-5, atol=1e-7)
        assert torch.allclose(got, _reference(request, pools), rtol=1e-4, atol=1e-6)


def test_one_read_requests_share_a_launch_and_a_request_without_a_layers_lse_runs_in_two_passes():
    lens = [50, 64, 41]
    gen, pools, rows = _setup(12, lens, holes=[(2, 7)])
    plain = [ScoreRequest(row, _queries(gen, 5), causal=True, pooling_kernel=3) for row in rows]
    with_lse = [ScoreRequest(r.row, r.queries, causal=True, pooling_kernel=3, lse=_lse(r, pools)) for r in plain]
    # the last request has the LSE of layer 0 only (a layer whose attention returned none): layer 2 in two passes
    with_lse[2] = ScoreRequest(rows[2], plain[2].queries, causal=True, pooling_kernel=3,
                               lse={0: with_lse[2].lse[0]})
    mass = CountingMass()
    one_read = score_requests(with_lse, SCALING, pools.__getitem__, mass)
    assert mass.launches == [3, 2, 1]  # layer 0: all three one read; layer 2: two one read, one in two passes
    two_pass = score_requests(plain, SCALING, pools.__getitem__, attention_mass_paged)
    for got, expected in zip(one_read, two_pass):
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-6)


def test_one_read_check_compares_every_request_with_two_passes():
    gen, pools, rows = _setup(13, [40, 52])
    requests = [ScoreRequest(row, _queries(gen, 4), causal=True) for row in rows]
    requests = [ScoreRequest(r.row, r.queries, causal=True, lse=_lse(r, pools)) for r in requests]
    seen = []
    score_requests(requests, SCALING, pools.__getitem__, attention_mass_paged,
                   lambda layer, a, b: seen.append((layer, a.shape[-1], float((a - b).abs().max()))))
    assert [(layer, n) for layer, n, _ in seen] == [(0, 40), (0, 52), (2, 40), (2, 52)]
    assert max(diff for *_, diff in seen) < 1e-5


def test_layered_rows_are_read_per_layer_and_shared_by_the_layers_of_a_group():
    lens = [30, 44]
    gen, pools, rows = _setup(14, lens)
    # layer 0 reads other slots than layer 2 (two groups); each request's layer-2 slots drop two tokens
    other = {0: [row.flip(0).contiguous() for row in rows], 2: [row.clone() for row in rows]}
    for row in other[2]:
        row[[5, 9]] = HOLE
    requests = [ScoreRequest(row, _queries(gen, 4), causal=True, row_of=(lambda layer, r=r: other[layer][r]))
                for r, row in enumerate(rows)]
    got = score_requests(requests, SCALING, pools.__getitem__, attention_mass_paged)
    for r, request in enumerate(requests):
        for i, layer in enumerate(LAYERS):
            alone = ScoreRequest(other[layer][r], {layer: request.queries[layer]}, causal=True)
            expected = score_requests([alone], SCALING, pools.__getitem__, attention_mass_paged)[0][0]
            # the logical row has no holes: only the layer's own holes score 0
            assert torch.allclose(got[r][i], expected, rtol=1e-5, atol=1e-7)
    plan = ScorePlan.plan(requests)
    assert plan._table(plan.launches[0], 0) is not plan._table(plan.launches[0], 2)


@pytest.mark.parametrize("bad", [
    dict(causal=False, lse={0: torch.zeros(HQ, 4)}),  # an LSE normalises causal window queries only
    dict(causal=True, rope=ROPE),  # re-rotated queries sit after the prompt
    dict(causal=True, lse={0: torch.zeros(HQ, 4)}, row_of=lambda layer: None),
])
def test_score_request_refuses_inputs_that_would_score_wrongly(bad):
    with pytest.raises(ValueError):
        ScoreRequest(torch.arange(10, dtype=torch.int32), {0: torch.zeros(HQ, 4, D)}, **bad)


# ---------------------------------------------------------------------------------------------- in the engine


def _req(rid, pool_idx):
    return SimpleNamespace(rid=rid, req_pool_idx=pool_idx, cache_protected_len=0, inflight_middle_chunks=0,
                           is_retracted=False, finished=lambda: False,
                           sampling_params=SimpleNamespace(custom_params=None))


def _engine_batch(seed, lens, policy="snapkv", window=4):
    gen, pools, rows = _setup(seed, lens)
    table = torch.zeros(len(lens) + 1, max(lens) + 8, dtype=torch.int32)
    for r, row in enumerate(rows):
        table[r + 1, : lens[r]] = row
    state = EngineState()
    state.configure(EvictionConfig(policy=policy, budget=Budget(tokens=12), window=window, sinks=2))
    state.forward_id = 3
    state.capture = WindowQueryCapture(window)
    state.capture.begin(3, lens, "cpu")
    for layer in LAYERS:
        state.capture.record(layer, torch.randn(sum(lens), HQ * D, generator=gen), HQ, D, SCALING[layer])
    state.capture.end()
    batch = SimpleNamespace(reqs=[_req(f"r{r}", r + 1) for r in range(len(lens))], decoding_reqs=None,
                            seq_lens_cpu=torch.tensor(lens))
    return batch, state, table, pools


def test_evict_after_prefill_scores_the_batch_in_one_launch_per_layer_as_request_by_request():
    lens = [40, 56, 33, 61]
    batch, state, table, pools = _engine_batch(21, lens)
    mass = CountingMass()
    evict_after_prefill(batch, state, table, pools.__getitem__, lambda slots: None, mass)
    assert mass.launches == [len(lens)] * len(LAYERS)  # one launch per layer for the whole batch
    batched = table.clone()
    # the same requests, one batch each: the same keep-sets
    for r in range(len(lens)):
        single, state, table, pools = _engine_batch(21, lens)
        single.reqs = [single.reqs[r]]
        single.seq_lens_cpu = single.seq_lens_cpu[r:r + 1]
        state.capture.num_queries = [state.capture.num_queries[r]]
        state.capture.queries = {layer: q[r:r + 1] for layer, q in state.capture.queries.items()}
        evict_after_prefill(single, state, table, pools.__getitem__, lambda slots: None, attention_mass_paged)
        assert torch.equal(table[r + 1], batched[r + 1])
        assert int((table[r + 1, : lens[r]] != HOLE).sum()) == 12


def test_evict_after_lookahead_scores_every_ready_request_in_one_plan():
    lens = [40, 52, 47]
    gen, pools, rows = _setup(31, lens)
    table = torch.zeros(len(lens) + 1, 64, dtype=torch.int32)
    state = EngineState()
    state.configure(EvictionConfig(policy="laq", budget=Budget(tokens=10), window=4, sinks=2, lookahead_steps=2))
    reqs = []
    for r, row in enumerate(rows):
        table[r + 1, : lens[r]] = row
        req = _req(f"r{r}", r + 1)
        reqs.append(req)
        steps = [({layer: torch.randn(1, HQ, D, generator=gen) for layer in LAYERS}, 0) for _ in range(2)]
        state.pending[req.rid] = PendingLookahead(req, lens[r], _queries(gen, 4), torch.ones(lens[r], dtype=bool),
                                                  SCALING, decoded=2, processed=1, steps=steps)
    mass = CountingMass()
    freed = []
    evict_after_lookahead(SimpleNamespace(reqs=reqs), state, table, pools.__getitem__, freed.append, mass)
    # per layer: the three window groups in one launch, the three lookahead groups in another
    assert mass.launches == [3, 3] * len(LAYERS)
    assert not state.pending and len(freed) == 3
    for r in range(len(lens)):
        assert int((table[r + 1, : lens[r]] != HOLE).sum()) == 10
