"""Per-layer eviction after prefill (``--kv-evict-granularity per_layer``) on SGLang 0.5.17's real classes under our
layered pool: :func:`sgl_evict.engine.evict_batch.evict_after_prefill` with a ``LayeredTokenToKVPoolAllocator``
scores each layer through its own group-slots, keeps per group what ``group_keep_masks`` keeps (laprox with its
global split), frees exactly the dropped group-slots, turns tokens no group keeps into holes, and leaves the
uniform path as it was (G = 1 keeps the uniform keep-set). With sliding-window layers (Gemma 3's shape: only
full-attention layers are scored), a group of sliding-window layers only keeps the prompt's tail, the others keep
what the HF harness's ``per_layer`` selection over the same layer groups keeps (``select_keep_grouped``)."""

from types import SimpleNamespace

import pytest
from sglang_guard import sglang_or_skip

with sglang_or_skip():
    import torch

    from sgl_evict.engine.layered_allocator import LayeredTokenToKVPoolAllocator
    from sgl_evict.engine.layered_kv_pool import LayeredMHATokenToKVPool

from sgl_evict.config import EvictionConfig
from sgl_evict.engine.evict_batch import evict_after_prefill
from sgl_evict.engine.group_keep import group_keep_masks, group_scores
from sgl_evict.engine.keep import laprox_scores, position_scores, window_scores
from sgl_evict.engine.laprox import projected_norms
from sgl_evict.engine.runtime import EngineState
from sgl_evict.holes import HOLE
from sgl_evict.kernels.paged_scoring import attention_mass_paged
from sgl_evict.layer_groups import GroupLayout
from sgl_evict.selection import Budget, select_keep_grouped

LAYERS, KV_HEADS, GROUP, DIM, WINDOW = 4, 2, 2, 16, 4
SEQ, PREFIX = 40, 6  # prompt length; the first PREFIX tokens are a matched prefix the radix tree owns
SCALING = {layer: 0.25 for layer in range(LAYERS)}


def _setup(groups, policy, seed=0, window_layers=frozenset()):
    """A layered pool with one request's prompt written (random K/V per layer), its row, window queries of the
    full-attention layers (not of ``window_layers``, as the capture skips sliding-window layers), and the K/V as
    written (the reference reads them, not the pool)."""
    gen = torch.Generator().manual_seed(seed)
    pool = LayeredMHATokenToKVPool(96 * groups, groups, torch.float32, KV_HEADS, DIM, LAYERS, "cpu")
    allocator = LayeredTokenToKVPoolAllocator(96, 96 * groups, groups, torch.float32, "cpu", pool, need_sort=False)
    allocator.alloc(5)  # slots of someone else, so the request's slots are not 1..SEQ
    prefix = allocator.alloc(PREFIX)
    own = allocator.alloc(SEQ - PREFIX)
    row_slots = torch.cat([prefix, own])
    k = torch.randn(LAYERS, SEQ, KV_HEADS, DIM, generator=gen)
    v = torch.randn(LAYERS, SEQ, KV_HEADS, DIM, generator=gen)
    for layer in range(LAYERS):
        pool.set_kv_buffer(SimpleNamespace(layer_id=layer), row_slots, k[layer], v[layer])
    table = torch.zeros(2, 64, dtype=torch.int32)
    table[1, :SEQ] = row_slots.to(torch.int32)
    state = EngineState()
    state.configure(EvictionConfig(policy=policy, budget=Budget(tokens=10), window=WINDOW, sinks=2,
                                   pooling_kernel=3, granularity="per_layer", layer_groups=groups))
    state.forward_id = 3
    state.capture.begin(3, [SEQ], "cpu")
    for layer in sorted(set(range(LAYERS)) - window_layers):
        state.capture.record(layer, torch.randn(SEQ, KV_HEADS * GROUP * DIM, generator=gen), KV_HEADS * GROUP, DIM,
                             SCALING[layer])
    state.capture.end()
    if policy == "laprox":
        state.value_norm_factors = {layer: torch.randn(KV_HEADS * GROUP, DIM, DIM, generator=gen)
                                    for layer in range(LAYERS)}
    return pool, allocator, table, state, k, v


def _batch(protected):
    req = SimpleNamespace(rid="r", req_pool_idx=1, cache_protected_len=protected, inflight_middle_chunks=0,
                          is_retracted=False, finished=lambda: False,
                          sampling_params=SimpleNamespace(custom_params=None))
    return SimpleNamespace(reqs=[req], decoding_reqs=None, seq_lens_cpu=torch.tensor([SEQ]))


def _reference_keep(state, k, v, groups):
    """``[G, SEQ]`` what group_keep_masks keeps from scores over the K/V as written (pool never read)."""
    keys = {layer: torch.cat([torch.zeros(1, KV_HEADS, DIM), k[layer]]) for layer in range(LAYERS)}
    values = {layer: torch.cat([torch.zeros(1, KV_HEADS, DIM), v[layer]]) for layer in range(LAYERS)}
    row = torch.arange(1, SEQ + 1, dtype=torch.int32)
    config = state.config
    queries = state.capture.queries_of(0)
    if config.policy == "snapkv":
        scores = window_scores(queries, SCALING, keys.__getitem__, row, config.pooling_kernel, attention_mass_paged)
    elif config.policy == "laprox":
        factors = state.value_norm_factors
        scores = laprox_scores(queries, SCALING, keys.__getitem__, row, config.pooling_kernel, attention_mass_paged,
                               lambda layer: projected_norms(values[layer], row, factors[layer]))
    else:
        scores = position_scores(config.policy, row).expand(groups, -1, -1)
    laprox = config.policy == "laprox"
    return group_keep_masks(group_scores(scores, groups, laprox), config, row, 1, 0, global_split=laprox)


@pytest.mark.parametrize("groups, policy", [(2, "snapkv"), (4, "snapkv"), (4, "laprox"), (2, "streaming")])
def test_per_layer_eviction_keeps_group_keep_masks_and_frees_exactly_the_dropped_group_slots(groups, policy):
    pool, allocator, table, state, k, v = _setup(groups, policy)
    before = table[1, :SEQ].clone()
    heap_free, logical_free = allocator.heap_available_size(), allocator.logical.available_size()
    expected = _reference_keep(state, k, v, groups)
    if policy == "laprox":  # the global split: groups keep different numbers of tokens, 10 x G pairs in all
        assert int(expected.sum()) == 10 * groups
    else:
        assert (expected.sum(1) == 10).all()
    assert (expected.any(0) != expected.all(0)).any() or policy == "streaming"  # some tokens only some groups keep

    freed = evict_after_prefill(_batch(PREFIX), state, table, pool.get_key_buffer, allocator.free,
                                attention_mass_paged, value_buffer=pool.get_value_buffer, layered=allocator)

    owned = torch.arange(SEQ) >= PREFIX
    # per-group keep-sets: the request's own tokens live in exactly the groups that keep them
    live = allocator.group_map[:, before.long()] > 0
    assert torch.equal(live[:, owned], expected[:, owned])
    assert live[:, ~owned].all()  # the tree's prefix: nothing freed
    dropped = int((~expected[:, owned]).sum())
    assert freed == dropped == state.freed_group_slots
    none_keeps = ~expected.any(0)
    assert allocator.heap_available_size() == heap_free + dropped
    assert allocator.logical.available_size() == logical_free + int((none_keeps & owned).sum())
    assert state.freed_slots == int((none_keeps & owned).sum())
    # the row: holes exactly where no group keeps the token (prefix tokens only hidden)
    row = table[1, :SEQ]
    assert torch.equal(row == HOLE, none_keeps)
    assert torch.equal(row[~none_keeps], before[~none_keeps])
    assert state.hidden_tokens == int((none_keeps & ~owned).sum())
    # what each group still holds is the K/V written at prefill
    for layer in range(LAYERS):
        group = pool.group_of_layer(layer)
        kept = expected[group] & owned
        slots = allocator.group_map[group, before.long()[kept]].long()
        assert torch.equal(pool.get_key_buffer(layer)[slots], k[layer][kept])


def test_one_group_keeps_the_uniform_keep_set():
    """G = 1 through the layered path punches the holes the uniform path punches (on SGLang's plain tensors)."""
    pool, allocator, table, state, k, _ = _setup(1, "snapkv", seed=4)
    before = table[1, :SEQ].clone()
    evict_after_prefill(_batch(0), state, table, pool.get_key_buffer, allocator.free, attention_mass_paged,
                        layered=allocator)
    uniform_state = EngineState()
    uniform_state.configure(EvictionConfig(policy="snapkv", budget=Budget(tokens=10), window=WINDOW, sinks=2,
                                           pooling_kernel=3))
    uniform_state.forward_id, uniform_state.capture = state.forward_id, state.capture
    keys = {layer: torch.cat([torch.zeros(1, KV_HEADS, DIM), k[layer]]) for layer in range(LAYERS)}
    plain = torch.zeros(2, 64, dtype=torch.int32)
    plain[1, :SEQ] = torch.arange(1, SEQ + 1)
    freed = []
    evict_after_prefill(_batch(0), uniform_state, plain, keys.__getitem__, freed.append, attention_mass_paged)
    assert torch.equal(table[1, :SEQ] == HOLE, plain[1, :SEQ] == HOLE)
    assert int((table[1, :SEQ] == HOLE).sum()) == SEQ - 10 == freed[0].numel()
    assert torch.equal(freed[0], torch.arange(1, SEQ + 1)[plain[1, :SEQ] == HOLE].long())
    assert allocator.group_slots_of(before) == 10


TAIL = 6  # the sliding-window tail every keep-set keeps (Gemma 3: 512); budget 10 > sinks 2 + TAIL


@pytest.mark.parametrize("groups, policy", [(1, "snapkv"), (2, "snapkv"), (4, "snapkv"), (4, "laprox"),
                                            (2, "streaming")])
def test_sliding_window_groups_keep_the_tail_and_scored_groups_the_harness_keep_set(groups, policy):
    # layers 0 and 2 slide: G = 4 has two window-only groups, G = 2 and G = 1 mix both kinds in every group
    window_layers = frozenset({0, 2})
    pool, allocator, table, state, k, v = _setup(groups, policy, seed=5, window_layers=window_layers)
    state.protected_recent, state.window_layers = TAIL, window_layers
    layout = GroupLayout(LAYERS, groups, window_layers)
    before = table[1, :SEQ].clone()
    heap_free = allocator.heap_available_size()

    # the harness's rule on the same scores: per_layer over the full-attention layers 1 and 3, grouped as the pool
    keys = {layer: torch.cat([torch.zeros(1, KV_HEADS, DIM), k[layer]]) for layer in range(LAYERS)}
    values = {layer: torch.cat([torch.zeros(1, KV_HEADS, DIM), v[layer]]) for layer in range(LAYERS)}
    row = torch.arange(1, SEQ + 1, dtype=torch.int32)
    queries, config = state.capture.queries_of(0), state.config
    assert sorted(queries) == [1, 3]
    if policy == "snapkv":
        scores = window_scores(queries, SCALING, keys.__getitem__, row, config.pooling_kernel, attention_mass_paged)
    elif policy == "laprox":
        factors = state.value_norm_factors
        scores = laprox_scores(queries, SCALING, keys.__getitem__, row, config.pooling_kernel, attention_mass_paged,
                               lambda layer: projected_norms(values[layer], row, factors[layer]))
    else:
        scores = position_scores(policy, row).expand(2, -1, -1)
    harness = select_keep_grouped(scores, [layout.group_of(1), layout.group_of(3)], config.budget, config.sinks,
                                  max(config.window, TAIL), global_budget=policy == "laprox")
    tail = torch.arange(SEQ) >= SEQ - TAIL
    expected = tail.expand(groups, SEQ).clone()
    for i, layer in enumerate([1, 3]):
        expected[layout.group_of(layer)] = harness.mask(i)[0]

    freed = evict_after_prefill(_batch(0), state, table, pool.get_key_buffer, allocator.free, attention_mass_paged,
                                value_buffer=pool.get_value_buffer, layered=allocator)

    live = allocator.group_map[:, before.long()] > 0
    assert torch.equal(live, expected)
    assert live[:, tail].all()  # every group keeps what the sliding-window layers read
    for group in layout.window_only_groups:
        assert torch.equal(live[group], tail)
    # memory: the window-only groups hold the tail, the scored groups the budget each (laprox: in total over them)
    scored = len(layout.scored_groups)
    assert int(live.sum()) == TAIL * len(layout.window_only_groups) + scored * 10
    chosen = ~tail & (torch.arange(SEQ) >= 2)  # neither sinks nor tail: what the scores chose
    assert live[list(layout.scored_groups)][:, chosen].any()
    assert freed == groups * SEQ - int(live.sum()) and allocator.heap_available_size() == heap_free + freed
    assert torch.equal(table[1, :SEQ] == HOLE, ~expected.any(0))
