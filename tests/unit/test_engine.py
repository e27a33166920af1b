"""Engine-side eviction pieces on CPU: capture, keep-set, holes + freeing, compacted attention view.

The scoring goes through the real paged kernel (Triton interpreter on CPU) and is compared with the harness's
reference policy on the same keys.
"""

from types import SimpleNamespace

import pytest
import torch

from sgl_evict.config import EvictionConfig
from sgl_evict.engine.apply import evict_from_row
from sgl_evict.engine.capture import WindowQueryCapture
from sgl_evict.engine.compact_view import compact_rows, enter_compacted, leave_compacted
from sgl_evict.engine.evict_batch import evict_after_prefill
from sgl_evict.engine.keep import combined_scores, keep_mask, position_scores, window_scores
from sgl_evict.engine.runtime import EngineState
from sgl_evict.holes import HOLE
from sgl_evict.kernels.paged_scoring import attention_mass_paged
from sgl_evict.observation import LayerObservation
from sgl_evict.policies import make_policy
from sgl_evict.selection import Budget, select_keep


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def test_capture_keeps_each_requests_last_window_rows():
    heads, dim, window = 3, 8, 4
    lens = [6, 2, 9]  # the middle request has fewer new tokens than the window
    q = torch.randn(sum(lens), heads * dim, generator=_gen(0))
    capture = WindowQueryCapture(window)
    capture.begin(1, lens, "cpu")
    capture.record(5, q, heads, dim, 0.25)
    capture.end()
    start = 0
    for i, n in enumerate(lens):
        expected = q[start + n - min(n, window): start + n].view(-1, heads, dim).transpose(0, 1)
        got = capture.queries_of(i)[5]
        assert got.shape == (heads, min(n, window), dim)
        assert torch.equal(got, expected)
        start += n
    assert capture.scaling == {5: 0.25}


def test_capture_reads_gemma3s_batched_non_contiguous_queries():
    # SGLang's Gemma 3 passes q as [1, num_tokens, heads, dim], permuted from [1, heads, num_tokens, dim]
    heads, dim, window, lens = 2, 8, 3, [5, 4]
    packed = torch.randn(sum(lens), heads * dim, generator=_gen(4))
    gemma = packed.view(1, sum(lens), heads, dim).permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    assert not gemma.is_contiguous()
    expected, got = WindowQueryCapture(window), WindowQueryCapture(window)
    for capture, q in ((expected, packed), (got, gemma)):
        capture.begin(1, lens, "cpu")
        capture.record(0, q, heads, dim, 1.0)
        capture.end()
    for i in range(len(lens)):
        assert torch.equal(got.queries_of(i)[0], expected.queries_of(i)[0])


def _row_with_holes(seq_len, gen):
    slots = torch.randperm(1000, generator=gen)[:seq_len].to(torch.int32) + 1
    holes = torch.rand(seq_len, generator=gen) < 0.3
    return slots.masked_fill(holes, HOLE)


def test_evict_from_row_frees_only_owned_live_dropped_slots():
    gen = _gen(1)
    row = _row_with_holes(50, gen)
    before = row.clone()
    keep = torch.rand(50, generator=gen) < 0.5
    slots, hidden = evict_from_row(row, keep, owned_from=20)
    live = before != HOLE
    dropped = live & ~keep
    pos = torch.arange(50)
    assert torch.equal(slots, before[dropped & (pos >= 20)].long())
    assert hidden == int((dropped & (pos < 20)).sum())
    assert torch.equal(row, before.masked_fill(dropped, HOLE))  # kept and old holes untouched


def test_evict_from_row_refuses_a_mask_of_another_length():
    with pytest.raises(ValueError, match="does not match"):
        evict_from_row(torch.ones(5, dtype=torch.int32), torch.ones(4, dtype=torch.bool), 0)


def test_compact_rows_packs_live_slots_in_order_into_shadow_rows():
    gen = _gen(2)
    rows, width, offset = 4, 40, 4
    table = torch.full((2 * rows, width), 7, dtype=torch.int32)  # shadow rows start with junk
    lens = torch.tensor([40, 13, 1, 29])
    for r in range(rows):
        table[r] = _row_with_holes(width, gen)
    idx = torch.tensor([2, 0, 3, 1])
    kept = compact_rows(table, idx, lens, int(lens.max()), offset)
    for b, r in enumerate(idx.tolist()):
        logical = table[r, : lens[b]]
        live = logical[logical != HOLE]
        assert kept[b] == live.numel()
        assert torch.equal(table[r + offset, : live.numel()], live)


def _forward_batch(idx, lens, extend_lens=None):
    mode = SimpleNamespace(is_extend=lambda: extend_lens is not None)
    return SimpleNamespace(
        batch_size=len(idx), forward_mode=mode, req_pool_indices=torch.tensor(idx), seq_lens=torch.tensor(lens),
        seq_lens_cpu=torch.tensor(lens), seq_lens_sum=sum(lens),
        extend_seq_lens=None if extend_lens is None else torch.tensor(extend_lens, dtype=torch.int32),
        extend_seq_lens_cpu=extend_lens,
        extend_prefix_lens=None if extend_lens is None else torch.tensor(lens) - torch.tensor(extend_lens),
        extend_prefix_lens_cpu=None if extend_lens is None else [n - e for n, e in zip(lens, extend_lens)])


@pytest.mark.parametrize("extend", [False, True])
def test_forward_batch_sees_kept_lengths_and_gets_its_logical_fields_back(extend):
    table = torch.zeros(6, 10, dtype=torch.int32)
    table[1, :8] = torch.tensor([5, HOLE, 6, HOLE, HOLE, 7, 8, 9], dtype=torch.int32)
    table[2, :3] = torch.tensor([11, 12, 13], dtype=torch.int32)
    fb = _forward_batch([1, 2], [8, 3], [2, 3] if extend else None)
    logical = dict(vars(fb))
    saved = enter_compacted(fb, table, 3)
    assert fb.req_pool_indices.tolist() == [4, 5]
    assert fb.seq_lens.tolist() == [5, 3] and fb.seq_lens_cpu.tolist() == [5, 3] and fb.seq_lens_sum == 8
    assert table[4, :5].tolist() == [5, 6, 7, 8, 9] and table[5, :3].tolist() == [11, 12, 13]
    if extend:
        assert fb.extend_prefix_lens.tolist() == [3, 0] and fb.extend_prefix_lens_cpu == [3, 0]
    leave_compacted(fb, saved)
    for name, value in logical.items():
        assert getattr(fb, name) is value


def _pool(seq_len, kv_heads, dim, gen):
    slots = torch.randperm(seq_len + 10, generator=gen)[:seq_len] + 1
    pool = torch.randn(seq_len + 11, kv_heads, dim, generator=gen)
    return pool, slots.to(torch.int32)


def test_window_scores_equal_the_harness_snapkv_policy():
    gen = _gen(3)
    seq_len, kv_heads, group, dim, window = 45, 2, 2, 16, 6
    pools, queries, scaling = {}, {}, {0: 0.3, 1: 0.2}
    pool0, row = _pool(seq_len, kv_heads, dim, gen)
    pools[0], pools[1] = pool0, torch.randn_like(pool0)
    for layer in (0, 1):
        queries[layer] = torch.randn(kv_heads * group, window, dim, generator=gen)
    got = window_scores(queries, scaling, pools.__getitem__, row, 5, attention_mass_paged)
    policy = make_policy("snapkv", pooling_kernel=5)
    for layer in (0, 1):
        keys = pools[layer][row.long()].transpose(0, 1)
        obs = LayerObservation(keys=keys, scaling=scaling[layer], num_q_heads=kv_heads * group,
                               window_queries=queries[layer])
        assert torch.allclose(got[layer], policy.score(obs), rtol=1e-4, atol=1e-6)


def test_dapq_window_scores_equal_the_harness_dapq_policy():
    from sgl_evict.rope import RopeSpec

    gen = _gen(7)
    seq_len, kv_heads, group, dim, window = 50, 2, 2, 16, 5
    pool, row = _pool(seq_len, kv_heads, dim, gen)
    q = {3: torch.randn(kv_heads * group, window, dim, generator=gen)}
    rope = RopeSpec.from_config({"head_dim": dim, "rope_theta": 10000.0, "hidden_size": 64,
                                 "num_attention_heads": 4})
    got = window_scores(q, {3: 0.25}, lambda _: pool, row, 7, attention_mass_paged, rope)[0]
    keys = pool[row.long()].transpose(0, 1)
    obs = LayerObservation(keys=keys, scaling=0.25, num_q_heads=kv_heads * group, window_queries=q[3], rope=rope)
    assert torch.allclose(got, make_policy("dapq").score(obs), rtol=1e-4, atol=1e-6)


def test_window_scores_ignore_holes():
    gen = _gen(4)
    seq_len, kv_heads, dim, window = 40, 2, 16, 4
    pool, row = _pool(seq_len, kv_heads, dim, gen)
    q = {0: torch.randn(kv_heads, window, dim, generator=gen)}
    holed = row.clone()
    holed[[3, 4, 5, 17]] = HOLE
    got = window_scores(q, {0: 0.3}, lambda _: pool, holed, 1, attention_mass_paged)[0]
    live = holed != HOLE
    keys = pool[holed[live].long()].transpose(0, 1)
    obs = LayerObservation(keys=keys, scaling=0.3, num_q_heads=kv_heads, window_queries=q[0])
    # the window queries keep their logical positions; with no pooling only causality depends on them
    ref = make_policy("snapkv", pooling_kernel=1).score(obs)
    assert torch.all(got[:, ~live] == 0)
    assert torch.allclose(got[:, live], ref, rtol=1e-4, atol=1e-6)


def test_keep_mask_equals_uniform_select_keep():
    scores = torch.rand(3, 2, 60, generator=_gen(5))
    config = EvictionConfig(policy="snapkv", budget=Budget.parse("0.2"), window=5, sinks=2)
    expected = select_keep(scores, config.budget, 2, 5, "uniform").mask(0)[0]
    assert torch.equal(keep_mask(combined_scores(scores), config, torch.ones(60, dtype=torch.int32)), expected)


def test_keep_mask_carries_scores_forward_as_select_keep_does_and_never_onto_holes():
    scores = torch.rand(3, 2, 60, generator=_gen(6))
    scores[..., 20] = 5.0
    config = EvictionConfig(policy="laprox", budget=Budget.parse("0.2"), window=5, sinks=2, continuation=4)
    expected = select_keep(scores, config.budget, 2, 5, "uniform", continuation=4).mask(0)[0]
    live_row = torch.arange(1, 61, dtype=torch.int32)
    assert torch.equal(keep_mask(combined_scores(scores), config, live_row), expected)
    assert expected[20:25].all()
    holed = live_row.clone()
    holed[21:23] = HOLE  # evicted earlier: zero scores, and they must not take 20's
    keep = keep_mask(combined_scores(scores * (holed != HOLE)), config, holed)
    assert not keep[21:23].any() and keep[20] and keep[23:25].all()
    off = EvictionConfig(policy="laprox", budget=Budget.parse("0.2"), window=5, sinks=2)
    assert torch.equal(keep_mask(combined_scores(scores), off, live_row),
                       select_keep(scores, config.budget, 2, 5, "uniform").mask(0)[0])


def test_page_granular_keep_mask_keeps_whole_pages_within_the_budget():
    page, seq_len = 4, 61  # the last page is partial
    combined = torch.rand(seq_len, generator=_gen(8))
    row = torch.arange(1, seq_len + 1, dtype=torch.int32)
    config = EvictionConfig(policy="snapkv", budget=Budget(tokens=14), window=3, sinks=2)
    keep = keep_mask(combined, config, row, page)
    pages = torch.nn.functional.pad(keep, (0, -seq_len % page)).view(-1, page)
    whole = pages.all(1) | ~pages.any(1)
    assert whole[:-1].all() and (keep[-(seq_len % page):].all() or not keep[-(seq_len % page):].any())
    assert keep[:2].all() and keep[-3:].all()  # sinks and window
    # 14 tokens round up to 4 pages; the sink page and the two pages holding the window are among them
    assert int(pages[:-1].all(1).sum()) + int(keep[-(seq_len % page):].any()) == 4


def test_streaming_keeps_sinks_and_latest_live_tokens():
    row = torch.arange(1, 31, dtype=torch.int32)
    row[25] = HOLE
    config = EvictionConfig(policy="streaming", budget=Budget(tokens=10), window=3, sinks=2)
    keep = keep_mask(combined_scores(position_scores("streaming", row)), config, row)
    # the old hole at 25 scores 0, so the budget goes to live tokens
    assert keep.nonzero().flatten().tolist() == [0, 1, 21, 22, 23, 24, 26, 27, 28, 29]


def _batch_for_eviction(reqs, seq_lens):
    return SimpleNamespace(reqs=reqs, decoding_reqs=None, seq_lens_cpu=torch.tensor(seq_lens))


def _req(rid, pool_idx, protected=0, inflight=0, custom=None):
    return SimpleNamespace(rid=rid, req_pool_idx=pool_idx, cache_protected_len=protected,
                           inflight_middle_chunks=inflight, is_retracted=False, finished=lambda: False,
                           sampling_params=SimpleNamespace(custom_params=custom))


def test_evict_after_prefill_keeps_the_budget_and_frees_owned_slots():
    gen = _gen(6)
    kv_heads, dim, window = 2, 16, 4
    lens = [50, 30, 20]
    pool = torch.randn(200, kv_heads, dim, generator=gen)
    table = torch.zeros(4, 64, dtype=torch.int32)
    perm = torch.randperm(199, generator=gen) + 1
    table[1, :50], table[2, :30], table[3, :20] = perm[:50], perm[50:80], perm[80:100]
    before = table.clone()
    state = EngineState()
    state.configure(EvictionConfig(policy="snapkv", budget=Budget(tokens=12), window=window, sinks=2))
    state.forward_id = 7
    state.capture.begin(7, [50, 30, 20], "cpu")
    q = torch.randn(100, kv_heads * dim, generator=gen)
    state.capture.record(0, q, kv_heads, dim, 0.25)
    state.capture.end()
    reqs = [_req("a", 1, protected=10), _req("b", 2, inflight=1),  # b: a middle chunk, not done
            _req("c", 3, custom={"kv_evict": {"policy": "none"}})]  # c: turned off by the request
    freed = []
    n = evict_after_prefill(_batch_for_eviction(reqs, lens), state, table, lambda _: pool, freed.append,
                            attention_mass_paged)
    row = table[1, :50]
    assert int((row != HOLE).sum()) == 12
    dropped = (row == HOLE)
    assert torch.equal(freed[0], before[1, :50][dropped & (torch.arange(50) >= 10)].long())
    assert n == freed[0].numel() == state.freed_slots
    assert state.hidden_tokens == int(dropped[:10].sum())
    assert torch.equal(table[2:], before[2:])  # the others untouched
    assert row[:2].ne(HOLE).all() and row[-window:].ne(HOLE).all()  # sinks and window kept


def test_evict_after_prefill_ignores_queries_of_another_forward():
    state = EngineState()
    state.configure(EvictionConfig(policy="snapkv", budget=Budget(tokens=2)))
    state.capture.begin(1, [10], "cpu")
    state.forward_id = 2  # a later forward ran: these queries are not this batch's
    table = torch.arange(1, 11, dtype=torch.int32).view(1, 10)
    assert evict_after_prefill(_batch_for_eviction([_req("a", 0)], [10]), state, table, None, None,
                               attention_mass_paged) == 0
    assert (table != HOLE).all()


def test_evict_after_prefill_skips_prompts_the_protected_tokens_cover():
    state = EngineState()
    state.configure(EvictionConfig(policy="streaming", budget=Budget(tokens=2), window=8, sinks=4))
    state.capture.begin(3, [10], "cpu")
    state.forward_id = 3
    table = torch.arange(1, 11, dtype=torch.int32).view(1, 10)
    freed = []
    assert evict_after_prefill(_batch_for_eviction([_req("a", 0)], [10]), state, table, None, freed.append,
                               attention_mass_paged) == 0
    assert freed == [] and (table != HOLE).all()


def test_request_config_refuses_what_the_server_cannot_do():
    from sgl_evict.engine.runtime import request_config

    server = EvictionConfig(policy="snapkv", budget=Budget.parse("0.1"))
    assert request_config(server, {"kv_evict": {"budget": 0.5}}).budget == Budget.parse("0.5")
    assert not request_config(server, {"kv_evict": {"policy": "none"}}).enabled
    assert request_config(server, None) is server
    assert request_config(server, {"kv_evict": {"policy": "laq"}}).policy == "laq"
    assert request_config(server, {"kv_evict": {"policy": "laprox"}}).policy == "laprox"
    with pytest.raises(ValueError, match="policy: 'judgeq' needs a server started with --kv-evict-soft-tokens"):
        request_config(server, {"kv_evict": {"policy": "judgeq"}})
    with pytest.raises(ValueError, match="soft_tokens: set by the server"):
        request_config(server, {"kv_evict": {"policy": "judgeq", "soft_tokens": __file__}})
    with pytest.raises(ValueError, match="started without --kv-evict-policy"):
        request_config(EvictionConfig(), {"kv_evict": {"policy": "snapkv", "budget": 0.1}})
    with pytest.raises(ValueError, match="budget: invalid budget"):
        request_config(server, {"kv_evict": {"budget": "lots"}})


def test_dapq_without_the_models_rope_keeps_the_full_cache():
    state = EngineState()
    state.configure(EvictionConfig(policy="dapq", budget=Budget(tokens=2), window=2, sinks=1))
    state.capture.begin(5, [10], "cpu")
    state.forward_id = 5  # rope stays None: the model's RoPE could not be read at start
    table = torch.arange(1, 11, dtype=torch.int32).view(1, 10)
    assert evict_after_prefill(_batch_for_eviction([_req("a", 0)], [10]), state, table, None, None,
                               attention_mass_paged) == 0
    assert (table != HOLE).all()


def test_history_keep_keeps_the_cached_prefix_as_it_is_and_compresses_the_new_tokens():
    seq_len, prefix = 80, 50
    row = torch.arange(1, seq_len + 1, dtype=torch.int32)
    row[[3, 10, 11, 30]] = HOLE  # the radix cache's holes from the first turn
    combined = torch.rand(seq_len, generator=_gen(21)) * is_live_float(row)
    config = EvictionConfig(policy="snapkv", budget=Budget.parse("0.2"), window=5, sinks=2, history="keep")
    keep = keep_mask(combined, config, row, prefix=prefix)
    # the prefix keeps exactly its live tokens: no hole comes back, no cached token is hidden
    assert torch.equal(keep[:prefix], row[:prefix] != HOLE)
    # the 30 new tokens are a prompt of their own: ceil(0.2 x 30) = 6 of them, the last 5 among them
    suffix = EvictionConfig(policy="snapkv", budget=Budget.parse("0.2"), window=5, sinks=0)
    assert torch.equal(keep[prefix:], keep_mask(combined[prefix:], suffix, row[prefix:]))
    assert int(keep[prefix:].sum()) == 6 and keep[-5:].all()


def test_history_rescore_scores_the_whole_history_to_its_full_length():
    seq_len = 80
    row = torch.arange(1, seq_len + 1, dtype=torch.int32)
    combined = torch.rand(seq_len, generator=_gen(22))
    rescore = EvictionConfig(policy="snapkv", budget=Budget.parse("0.2"), window=5, sinks=2)
    keep = keep_mask(combined, rescore, row, prefix=50)
    assert torch.equal(keep, keep_mask(combined, rescore, row)) and int(keep.sum()) == 16
    # the prefix is rescored: some of its tokens are dropped although the cache holds them
    assert int(keep[:50].sum()) < 50


def test_history_keep_spends_a_token_budget_on_what_the_prefix_leaves():
    row = torch.arange(1, 101, dtype=torch.int32)
    row[5:45] = HOLE  # 20 live tokens in the 60-token prefix
    config = EvictionConfig(policy="snapkv", budget=Budget(tokens=30), window=4, sinks=2, history="keep")
    keep = keep_mask(torch.rand(100, generator=_gen(23)), config, row, prefix=60)
    assert int(keep[:60].sum()) == 20 and int(keep[60:].sum()) == 10


def test_history_keep_on_pages_keeps_the_prefix_pages_and_selects_whole_new_pages():
    page, seq_len, prefix = 4, 64, 32
    row = torch.arange(1, seq_len + 1, dtype=torch.int32)
    row[8:16] = HOLE  # two whole hole pages in the prefix
    config = EvictionConfig(policy="snapkv", budget=Budget.parse("0.25"), window=3, sinks=2, history="keep")
    keep = keep_mask(torch.rand(seq_len, generator=_gen(24)), config, row, page, prefix=prefix)
    assert torch.equal(keep[:prefix], row[:prefix] != HOLE)
    pages = keep[prefix:].view(-1, page)
    assert (pages.all(1) | ~pages.any(1)).all() and int(pages.all(1).sum()) == 2  # ceil(0.25 x 32) = 8 tokens


def test_history_is_part_of_the_namespace_and_checked():
    rescore = EvictionConfig(policy="snapkv", budget=Budget.parse("0.1"))
    keep = rescore.override({"kv_evict": {"history": "keep"}})
    assert keep.history == "keep" and keep.fingerprint() != rescore.fingerprint()
    with pytest.raises(ValueError, match="history: 'all' is not one of rescore, keep"):
        rescore.override({"kv_evict": {"history": "all"}})
    with pytest.raises(ValueError, match="history: 'keep' is not built for granularity per_layer"):
        EvictionConfig(policy="snapkv", budget=Budget.parse("0.1"), granularity="per_layer", history="keep")


def test_evict_after_prefill_keeps_a_later_turns_cached_prefix_under_history_keep():
    gen = _gen(25)
    kv_heads, dim, window, seq_len, prefix = 2, 16, 4, 60, 40
    pool = torch.randn(100, kv_heads, dim, generator=gen)
    table = torch.zeros(2, 64, dtype=torch.int32)
    table[1, :seq_len] = torch.randperm(99, generator=gen)[:seq_len] + 1
    table[1, 5:15] = HOLE  # the first turn's holes, as the radix cache holds them
    before = table.clone()
    for history, hidden in (("keep", 0), ("rescore", None)):
        table.copy_(before)
        state = EngineState()
        state.configure(EvictionConfig(policy="snapkv", budget=Budget.parse("0.25"), window=window, sinks=2,
                                       history=history))
        state.forward_id = 3
        state.capture.begin(3, [seq_len], "cpu")
        state.capture.record(0, torch.randn(seq_len, kv_heads * dim, generator=gen), kv_heads, dim, 0.25)
        state.capture.end()
        freed = []
        evict_after_prefill(_batch_for_eviction([_req("a", 1, protected=prefix)], [seq_len]), state, table,
                            lambda _: pool, freed.append, attention_mass_paged)
        row = table[1, :seq_len]
        if hidden == 0:
            # the cached prefix stays as cached; the 20 new tokens keep ceil(0.25 x 20) = 5
            assert torch.equal(row[:prefix], before[1, :prefix]) and state.hidden_tokens == 0
            assert int((row[prefix:] != HOLE).sum()) == 5
        else:  # rescored to ceil(0.25 x 60) = 15 over the whole history: cached tokens are hidden, not freed
            assert int((row != HOLE).sum()) == 15 and state.hidden_tokens > 0
        assert torch.equal(freed[0], before[1, prefix:seq_len][row[prefix:] == HOLE].long())


def is_live_float(row: torch.Tensor) -> torch.Tensor:
    return (row != HOLE).float()
