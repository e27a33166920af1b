"""laprox inside the engine on CPU: output projections found in a module tree, value norms from the pool, keep-set.

SGLang's objects are faked (as in test_engine.py); the scoring goes through the real paged kernel (Triton
interpreter on CPU) and the keep-set is compared with the harness's OutputAwareProxy stacked and selected the way
``EvictionHarness._select`` does, on the same keys, values, queries and W_o.
"""

from types import SimpleNamespace

import pytest
import torch

from sgl_evict.config import EvictionConfig
from sgl_evict.engine import laprox as engine_laprox
from sgl_evict.engine.evict_batch import evict_after_prefill
from sgl_evict.engine.keep import combined_scores, keep_mask, laprox_scores
from sgl_evict.engine.laprox import find_output_projections, model_norm_factors, norm_factors, projected_norms
from sgl_evict.engine.runtime import EngineState
from sgl_evict.holes import HOLE
from sgl_evict.kernels.paged_scoring import attention_mass_paged
from sgl_evict.observation import LayerObservation
from sgl_evict.policies import make_policy
from sgl_evict.scoring import projected_value_norms
from sgl_evict.selection import Budget, select_keep

KV_HEADS, GROUP, DIM, HIDDEN, WINDOW, SINKS, POOLING = 2, 2, 16, 48, 6, 2, 5
Q_HEADS = KV_HEADS * GROUP
LAYERS = (0, 1, 2)
SCALING = {0: 0.3, 1: 0.2, 2: 0.25}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ---- finding the output projections ----------------------------------------------------------------------------

class FakeRadixAttention(torch.nn.Module):
    """SGLang's RadixAttention as far as the discovery reads it."""

    def __init__(self, layer_id, heads=Q_HEADS, v_head_dim=DIM, sliding_window_size=-1):
        super().__init__()
        self.layer_id, self.tp_q_head_num, self.v_head_dim = layer_id, heads, v_head_dim
        self.sliding_window_size = sliding_window_size


class FakeAttention(torch.nn.Module):
    """A Llama-style attention module: ``attn`` and its sibling ``o_proj``."""

    def __init__(self, layer_id, o_proj=None, **attn_options):
        super().__init__()
        self.attn = FakeRadixAttention(layer_id, **attn_options)
        self.o_proj = o_proj if o_proj is not None else torch.nn.Linear(Q_HEADS * DIM, HIDDEN, bias=False)


def _model(*attentions):
    return torch.nn.ModuleDict({"layers": torch.nn.ModuleList(
        [torch.nn.ModuleDict({"self_attn": a}) for a in attentions])})


def test_output_projections_are_found_by_layer_id_skipping_sliding_window_layers():
    attentions = [FakeAttention(0), FakeAttention(1, sliding_window_size=128), FakeAttention(2)]
    found = find_output_projections(_model(*attentions), FakeRadixAttention)
    assert sorted(found) == [0, 2]
    assert found[2][0] is attentions[2].o_proj.weight and found[2][1] == Q_HEADS


def test_an_attention_module_without_o_proj_is_named_in_the_error():
    attention = FakeAttention(0)
    del attention.o_proj
    with pytest.raises(ValueError, match=r"layers.0.self_attn has no 'o_proj' beside its 'attn'"):
        find_output_projections(_model(attention), FakeRadixAttention)


def test_an_attention_layer_outside_the_llama_layout_is_named_in_the_error():
    odd = torch.nn.Module()
    odd.attn_mqa = FakeRadixAttention(1)  # e.g. an MLA module: its RadixAttention is not called attn
    odd.o_proj = torch.nn.Linear(Q_HEADS * DIM, HIDDEN, bias=False)
    with pytest.raises(ValueError, match=r"attention layers \[1\] are not the child 'attn' of a module with an "
                                         r"'o_proj'"):
        find_output_projections(_model(FakeAttention(0), odd), FakeRadixAttention)


@pytest.mark.parametrize("o_proj, message", [
    (torch.nn.Linear(Q_HEADS * DIM + 1, HIDDEN, bias=False),
     r"layers.0.self_attn.o_proj.weight has shape \(48, 65\), expected \[hidden, 64\]"),
    (SimpleNamespace(weight=torch.zeros(HIDDEN, Q_HEADS * DIM, dtype=torch.int8)),
     r"layers.0.self_attn.o_proj.weight is Tensor of torch.int8, not a plain 16/32-bit float matrix"),
    (torch.nn.Identity(), r"layers.0.self_attn.o_proj has no weight tensor"),
])
def test_an_unreadable_output_projection_is_named_in_the_error(o_proj, message):
    attention = FakeAttention(0)
    if isinstance(o_proj, torch.nn.Module):
        attention.o_proj = o_proj
    else:
        del attention.o_proj
        attention.o_proj = o_proj  # a plain attribute: a quantised layer's int8 weight
    with pytest.raises(ValueError, match=message):
        find_output_projections(_model(attention), FakeRadixAttention)


# ---- norms ------------------------------------------------------------------------------------------------------

def _pool(slots, gen, dtype=torch.float32):
    return torch.randn(slots, KV_HEADS, DIM, generator=gen).to(dtype)


def _row(seq_len, gen, holes=()):
    row = (torch.randperm(seq_len + 20, generator=gen)[:seq_len] + 1).to(torch.int32)
    row[list(holes)] = HOLE
    return row


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_factored_norms_equal_the_reference_projected_value_norms(dtype, monkeypatch):
    gen = _gen(1)
    seq_len = 37
    monkeypatch.setattr(engine_laprox, "CHUNK_ELEMENTS", 10 * Q_HEADS * DIM)  # 4 chunks, the last one short
    pool = _pool(seq_len + 21, gen, dtype)
    weight = (torch.randn(HIDDEN, Q_HEADS * DIM, generator=gen) * 0.1).to(dtype)
    row = _row(seq_len, gen, holes=(3, 4, 30))
    got = projected_norms(pool, row, norm_factors(weight, Q_HEADS))
    live = row != HOLE
    values = pool[row[live].long()].transpose(0, 1)  # [kv_heads, live tokens, d]
    assert torch.all(got[:, ~live] == 0)
    assert torch.allclose(got[:, live], projected_value_norms(values, weight, Q_HEADS), rtol=1e-4, atol=1e-6)


# ---- keep-set vs the harness ------------------------------------------------------------------------------------

class Problem:
    """One request's prompt in a per-layer paged pool (holes from an earlier eviction optional), its window
    queries and each layer's W_o."""

    def __init__(self, seq_len=70, holes=(), seed=3):
        gen = _gen(seed)
        self.row = _row(seq_len, gen, holes)
        slots = seq_len + 21
        self.keys = {layer: _pool(slots, gen) for layer in LAYERS}
        self.values = {layer: _pool(slots, gen) for layer in LAYERS}
        self.queries = {layer: torch.randn(Q_HEADS, WINDOW, DIM, generator=gen) for layer in LAYERS}
        self.o_proj = {layer: torch.randn(HIDDEN, Q_HEADS * DIM, generator=gen) * 0.1 for layer in LAYERS}
        self.factors = model_norm_factors({layer: (w, Q_HEADS) for layer, w in self.o_proj.items()})

    def engine_scores(self, pooling=POOLING):
        return laprox_scores(self.queries, SCALING, self.keys.__getitem__, self.row, pooling, attention_mass_paged,
                             lambda layer: projected_norms(self.values[layer], self.row, self.factors[layer]))

    def harness_scores(self, pooling=POOLING):
        """``EvictionHarness._select``'s stack of OutputAwareProxy scores over the live tokens (the harness's
        cache holds no holes: a hole's token was never there)."""
        live = self.row != HOLE
        slots = self.row[live].long()
        policy = make_policy("laprox", pooling_kernel=pooling)
        per_layer = []
        for layer in LAYERS:
            obs = LayerObservation(keys=self.keys[layer][slots].transpose(0, 1), scaling=SCALING[layer],
                                   num_q_heads=Q_HEADS, window_queries=self.queries[layer],
                                   values=self.values[layer][slots].transpose(0, 1), o_proj_weight=self.o_proj[layer])
            per_layer.append(policy.score(obs))
        return torch.stack(per_layer), live


def test_laprox_scores_equal_the_harness_policy():
    problem = Problem()
    expected, _ = problem.harness_scores()
    assert torch.allclose(problem.engine_scores(), expected, rtol=1e-4, atol=1e-6)


def test_laprox_scores_are_zero_at_holes_and_the_harness_policys_elsewhere_without_pooling():
    # holes move the harness's tokens closer together; only without pooling do live tokens' scores stay the same
    problem = Problem(holes=(5, 6, 7, 40))
    got = problem.engine_scores(pooling=1)
    expected, live = problem.harness_scores(pooling=1)
    assert torch.all(got[:, :, ~live] == 0)
    # window queries keep their logical positions; with no pooling only causality depends on them
    assert torch.allclose(got[:, :, live], expected, rtol=1e-4, atol=1e-6)


def _harness_keep(problem, budget):
    expected, _ = problem.harness_scores()
    return select_keep(expected, budget, SINKS, WINDOW, "uniform").mask(0)[0]


def test_keep_set_equals_the_harness_laprox_keep_set():
    problem = Problem(seq_len=90, seed=4)
    config = EvictionConfig(policy="laprox", budget=Budget(tokens=20), window=WINDOW, sinks=SINKS,
                            pooling_kernel=POOLING)
    keep = keep_mask(combined_scores(problem.engine_scores()), config, problem.row)
    assert int(keep.sum()) == 20
    assert torch.equal(keep, _harness_keep(problem, config.budget))
    # and the value weighting matters: snapkv's keep-set on the same problem is another one
    snapkv = make_policy("snapkv", pooling_kernel=POOLING)
    slots = problem.row.long()
    attention_only = torch.stack([snapkv.score(LayerObservation(
        keys=problem.keys[layer][slots].transpose(0, 1), scaling=SCALING[layer], num_q_heads=Q_HEADS,
        window_queries=problem.queries[layer])) for layer in LAYERS])
    assert not torch.equal(keep, select_keep(attention_only, config.budget, SINKS, WINDOW, "uniform").mask(0)[0])


def test_page_granular_keep_set_is_the_page_selection_of_the_harness_scores():
    # the harness has no pages: the same page selector (kernels/selection.py) over its combined scores
    page = 16
    problem = Problem(seq_len=90, seed=5)
    config = EvictionConfig(policy="laprox", budget=Budget(tokens=50), window=WINDOW, sinks=SINKS,
                            pooling_kernel=POOLING, page_granular=True)
    got = keep_mask(combined_scores(problem.engine_scores()), config, problem.row, page)
    expected, live = problem.harness_scores()
    harness_combined = torch.zeros(90).masked_scatter(live, combined_scores(expected))
    assert torch.equal(got, keep_mask(harness_combined, config, problem.row, page))
    # 50 tokens round up to 4 pages: the sinks' page, the last (partial, 10 tokens) holding the window, 2 chosen
    assert got[:page].all() and got[-10:].all() and int(got.sum()) == 3 * page + 10


# ---- evict_after_prefill ----------------------------------------------------------------------------------------

def _req(rid, pool_idx, custom=None):
    return SimpleNamespace(rid=rid, req_pool_idx=pool_idx, cache_protected_len=0, inflight_middle_chunks=0,
                           is_retracted=False, finished=lambda: False,
                           sampling_params=SimpleNamespace(custom_params=custom))


def _prefill(problem, state, custom=None, value_buffer="pool"):
    seq_len = problem.row.shape[0]
    table = torch.zeros(2, seq_len, dtype=torch.int32)
    table[1] = problem.row
    state.forward_id = 1
    state.capture.begin(1, [seq_len], "cpu")
    for layer in LAYERS:  # the prompt's packed queries, the window's at the end
        packed = torch.zeros(seq_len, Q_HEADS, DIM)
        packed[-WINDOW:] = problem.queries[layer].transpose(0, 1)
        state.capture.record(layer, packed.view(seq_len, -1), Q_HEADS, DIM, SCALING[layer])
    state.capture.end()
    batch = SimpleNamespace(reqs=[_req("a", 1, custom)], decoding_reqs=None, seq_lens_cpu=torch.tensor([seq_len]))
    freed = []
    evict_after_prefill(batch, state, table, problem.keys.__getitem__, freed.append, attention_mass_paged,
                        value_buffer=problem.values.__getitem__ if value_buffer == "pool" else value_buffer)
    return table[1]


@pytest.mark.parametrize("server_policy, custom", [
    ("laprox", None), ("snapkv", {"kv_evict": {"policy": "laprox"}}),  # the server's policy, a request's override
])
def test_evict_after_prefill_runs_laprox_and_keeps_the_harness_keep_set(server_policy, custom):
    problem = Problem(seq_len=80, seed=6)
    state = EngineState()
    state.configure(EvictionConfig(policy=server_policy, budget=Budget(tokens=18), window=WINDOW, sinks=SINKS,
                                   pooling_kernel=POOLING))
    state.value_norm_factors = problem.factors
    row = _prefill(problem, state, custom)
    assert torch.equal(row != HOLE, _harness_keep(problem, Budget(tokens=18)))


def test_laprox_without_the_models_output_projections_keeps_the_full_cache(caplog):
    problem = Problem(seq_len=40, seed=7)
    state = EngineState()
    state.configure(EvictionConfig(policy="laprox", budget=Budget(tokens=10), window=WINDOW, sinks=SINKS))
    before = problem.row.clone()  # value_norm_factors stay None: the layout could not be read at start
    with caplog.at_level("WARNING", logger="sgl_evict"):
        row = _prefill(problem, state)
    assert torch.equal(row, before)
    assert "output projections could not be read at start: its cache is kept in full" in caplog.text
