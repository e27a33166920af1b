"""The layered KV pool (sgl_evict/engine/layered_kv_pool.py) and SGLang's Triton attention over it
(sgl_evict/engine/layered_attention.py), with SGLang 0.5.17's real MHATokenToKVPool, ReqToTokenPool, allocators,
TritonAttnBackend and its Triton decode / extend kernels, run on CPU under TRITON_INTERPRET=1.

- G = 1 (identity table): the layered pool's buffers and attention outputs equal SGLang's plain pool's, bit for bit;
- G = L, nothing evicted: attention outputs equal the plain pool's, bit for bit (same keys, same order, same
  splits), through a prefill, a decode step and a second-turn extend over the cached prefix;
- per-group keep-sets with holes (tokens every group drops) and tokens only some groups drop: every layer's decode
  and second-turn extend outputs equal a PyTorch reference attention over that layer's keep-set, computed from the
  K/V tensors written, not from the pool;
- sliding-window layers (Gemma 3's shape on the shared pool: layers 0 and 1 read the last ``WINDOW`` entries,
  layers 2 and 3 everything) for G = 1 (groups mixing both kinds), 2 (a group of sliding-window layers only, a
  group of full-attention layers) and 4: nothing evicted, outputs equal SGLang's plain pool's bit for bit; with
  ``layout_keep_masks``' keep-sets (window-only groups keep the prompt's last ``WINDOW + 1`` tokens), every
  full-attention layer equals reference attention over its group's keep-set, every sliding-window layer equals
  SGLang's plain pool without eviction, and the heap frees exactly the dropped group-slots.
"""

import types

import pytest
from sglang_guard import sglang_or_skip

with sglang_or_skip("sglang's Triton attention backend"):
    import sglang.srt.layers.attention.triton_backend as triton_backend
    import torch
    from sglang.srt.configs.model_config import AttentionArch
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    from sgl_evict.engine.layered_attention import LayeredTritonAttnBackend
    from sgl_evict.engine.layered_kv_pool import LayeredMHATokenToKVPool

from sgl_evict.config import EvictionConfig
from sgl_evict.engine.compact_view import compact_rows
from sgl_evict.engine.group_evict import evict_groups
from sgl_evict.engine.group_keep import layout_group_scores, layout_keep_masks
from sgl_evict.engine.layered_allocator import LayeredTokenToKVPoolAllocator
from sgl_evict.layer_groups import GroupLayout
from sgl_evict.selection import Budget

LAYERS, HEADS, KV_HEADS, HEAD_DIM = 4, 4, 2, 16
SCALE = HEAD_DIM ** -0.5
ROWS, CONTEXT = 4, 32  # request rows (and as many shadow rows), max context
SLOTS = 64  # token slots of the plain pool; the layered pool gets SLOTS x G group-slots
WINDOW = 3  # sliding_window_size of the sliding-window layers; every keep-set keeps the prompt's last WINDOW + 1


@pytest.fixture(autouse=True)
def cpu_runtime(monkeypatch):
    """What TritonAttnBackend reads from SGLang's runtime context, which a server publishes: no speculative
    decoding, no parallelism."""
    monkeypatch.setattr(triton_backend, "get_spec", lambda: types.SimpleNamespace(
        speculative_num_draft_tokens=None, speculative_num_steps=None, speculative_eagle_topk=None))
    monkeypatch.setattr(triton_backend, "get_parallel", lambda: types.SimpleNamespace(
        attn_dcp_size=1, attn_dcp_rank=0, attn_tp_size=1))


class Engine:
    """A KV pool, its allocator, the request table (rows, then their compacted shadow rows, as the plugin's
    ReqToTokenPool hook builds it) and a Triton backend, as a model runner holds them."""

    def __init__(self, groups=None, window_layers=(), device="cpu"):
        """``window_layers``: layer ids that attend to their last ``WINDOW`` keys only (Gemma 3's sliding-window
        layers, SGLang's ``sliding_window_size``)."""
        self.device = device
        if groups is None:  # SGLang's own pool
            self.pool = MHATokenToKVPool(SLOTS, 1, torch.float32, KV_HEADS, HEAD_DIM, LAYERS, device, False)
            self.allocator = TokenToKVPoolAllocator(SLOTS, torch.float32, device, self.pool, need_sort=False)
            backend_class = triton_backend.TritonAttnBackend
        else:
            self.pool = LayeredMHATokenToKVPool(SLOTS * groups, groups, torch.float32, KV_HEADS, HEAD_DIM, LAYERS,
                                                device)
            self.allocator = LayeredTokenToKVPoolAllocator(SLOTS, SLOTS * groups, groups, torch.float32, device,
                                                           self.pool, need_sort=False)
            backend_class = LayeredTritonAttnBackend
        self.req_to_token_pool = ReqToTokenPool(2 * ROWS, CONTEXT, device, False)
        self.rows = {}  # request row -> [seq_len] logical slots, holes included
        config = types.SimpleNamespace(
            attention_arch=AttentionArch.MHA, get_max_num_attention_heads=lambda: HEADS,
            get_num_kv_heads=lambda tp: KV_HEADS, v_head_dim=HEAD_DIM, swa_v_head_dim=None, context_len=CONTEXT,
            is_encoder_decoder=False, linear_attn_registry_result=None,
            hf_config=types.SimpleNamespace(get_text_config=lambda: None))
        runner = types.SimpleNamespace(
            req_to_token_pool=self.req_to_token_pool, token_to_kv_pool=self.pool,
            token_to_kv_pool_allocator=self.allocator, sliding_window_size=WINDOW if window_layers else None,
            model_config=config, device=device,
            gpu_id=0, is_draft_worker=False, page_size=1,
            server_args=types.SimpleNamespace(triton_attention_num_kv_splits=4, enable_deterministic_inference=False,
                                              triton_attention_split_tile_size=None, chunked_prefill_size=-1))
        self.backend = backend_class(runner)
        self.layers = [RadixAttention(HEADS, HEAD_DIM, SCALE, KV_HEADS, layer_id=layer,
                                      sliding_window_size=WINDOW if layer in window_layers else -1)
                       for layer in range(LAYERS)]

    def extend(self, new_lens, q, k, v):
        """Appends ``new_lens[b]`` tokens to request row ``b`` and runs every layer's ``forward_extend``.

        ``q [L, n, HEADS, HEAD_DIM]``, ``k`` / ``v [L, n, KV_HEADS, HEAD_DIM]`` (n = sum of new_lens, batch-major);
        returns ``[L, n, HEADS, HEAD_DIM]``. The prefix attention reads is the row's compacted (live) part.
        """
        out_cache_loc = self.allocator.alloc(sum(new_lens))
        prefix = []
        start = 0
        for b, n in enumerate(new_lens):
            row = self.rows.get(b, torch.empty(0, dtype=torch.int64, device=self.device))
            prefix.append(int((row != -1).sum()))
            self.rows[b] = torch.cat([row, out_cache_loc[start:start + n]])
            start += n
        bs = len(new_lens)
        seq_lens = self._compact(bs)
        batch = types.SimpleNamespace(
            forward_mode=ForwardMode.EXTEND, batch_size=bs, spec_info=None, out_cache_loc=out_cache_loc,
            req_pool_indices=torch.arange(bs, device=self.device) + ROWS, seq_lens=seq_lens,
            seq_lens_sum=int(seq_lens.sum()), extend_prefix_lens=torch.tensor(prefix, device=self.device),
            extend_prefix_lens_cpu=prefix, extend_seq_lens=torch.tensor(new_lens, device=self.device),
            extend_seq_lens_cpu=list(new_lens))
        self.backend.init_forward_metadata(batch)
        return torch.stack([
            self.backend.forward_extend(q[layer].flatten(1), k[layer], v[layer], self.layers[layer], batch)
            for layer in range(LAYERS)]).view(LAYERS, -1, HEADS, HEAD_DIM)

    def decode(self, q, k, v):
        """One new token per request row; ``q [L, bs, HEADS, HEAD_DIM]``, ``k`` / ``v [L, bs, KV_HEADS,
        HEAD_DIM]`` -> ``[L, bs, HEADS, HEAD_DIM]``."""
        batch = self.decode_batch(q.shape[1])
        self.backend.init_forward_metadata(batch)
        return torch.stack([
            self.backend.forward_decode(q[layer].flatten(1), k[layer], v[layer], self.layers[layer], batch)
            for layer in range(LAYERS)]).view(LAYERS, batch.batch_size, HEADS, HEAD_DIM)

    def decode_batch(self, bs):
        """Appends a new token to request rows ``0 .. bs - 1``: the decode batch (SGLang's ``ForwardBatch`` fields
        that attention reads), pointed at the compacted rows as the plugin's model-runner hook does."""
        out_cache_loc = self.allocator.alloc(bs)
        for b in range(bs):
            self.rows[b] = torch.cat([self.rows[b], out_cache_loc[b:b + 1]])
        seq_lens = self._compact(bs)
        return types.SimpleNamespace(
            forward_mode=ForwardMode.DECODE, batch_size=bs, spec_info=None, out_cache_loc=out_cache_loc,
            req_pool_indices=torch.arange(bs, device=self.device) + ROWS, seq_lens=seq_lens,
            seq_lens_sum=int(seq_lens.sum()))

    def _compact(self, bs):
        """Writes the logical rows, compacts them into their shadow rows (the plugin's compact_view); the kept
        lengths."""
        table = self.req_to_token_pool.req_to_token
        lens = torch.tensor([self.rows[b].numel() for b in range(bs)], device=self.device)
        for b in range(bs):
            table[b, :lens[b]] = self.rows[b].to(table.dtype)
        return compact_rows(table, torch.arange(bs, device=self.device), lens, int(lens.max()), ROWS)


def qkv(n, seed):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(LAYERS, n, HEADS, HEAD_DIM, generator=gen),
            torch.randn(LAYERS, n, KV_HEADS, HEAD_DIM, generator=gen),
            torch.randn(LAYERS, n, KV_HEADS, HEAD_DIM, generator=gen))


def reference_attention(q, k, v, causal_from):
    """``q [m, HEADS, D]`` over ``k`` / ``v [n, KV_HEADS, D]``; query i sees keys ``< causal_from + i + 1``."""
    k = k.repeat_interleave(HEADS // KV_HEADS, dim=1)
    v = v.repeat_interleave(HEADS // KV_HEADS, dim=1)
    scores = torch.einsum("mhd,nhd->hmn", q, k) * SCALE
    visible = torch.arange(k.shape[0]).view(1, -1) < causal_from + torch.arange(q.shape[0]).view(-1, 1) + 1
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("hmn,nhd->mhd", scores.softmax(-1), v)


PROMPTS = [6, 9]


def run_turns(engine, evict=None, prompts=PROMPTS):
    """Prefill of ``prompts``, optional per-group eviction ``evict(engine)``, one decode step, a second-turn extend
    of 3 tokens per request: the three outputs."""
    prefill = engine.extend(prompts, *qkv(sum(prompts), seed=1))
    if evict is not None:
        evict(engine)
    decode = engine.decode(*qkv(len(prompts), seed=2))
    second = engine.extend([3] * len(prompts), *qkv(3 * len(prompts), seed=3))
    return prefill, decode, second


def test_g1_identity_map_writes_and_reads_as_sglangs_pool():
    plain, layered = Engine(), Engine(groups=1)
    outputs_plain = run_turns(plain)
    outputs_layered = run_turns(layered)
    logical = torch.cat(list(layered.rows.values()))
    assert torch.equal(layered.allocator.group_map[0, logical], logical.to(torch.int32))  # the identity table
    for layer in range(LAYERS):
        assert torch.equal(layered.pool.get_key_buffer(layer), plain.pool.get_key_buffer(layer))
        assert torch.equal(layered.pool.get_value_buffer(layer), plain.pool.get_value_buffer(layer))
    for got, expected in zip(outputs_layered, outputs_plain):
        assert torch.equal(got, expected)


def test_g_equals_l_without_eviction_is_sglangs_pool_bit_for_bit():
    plain, layered = Engine(), Engine(groups=LAYERS)
    outputs_plain = run_turns(plain)
    outputs_layered = run_turns(layered)
    group_slots = layered.allocator.group_map[:, 1:1 + sum(PROMPTS)]
    assert len(set(group_slots.flatten().tolist())) == LAYERS * sum(PROMPTS)  # every layer its own group-slots
    for got, expected in zip(outputs_layered, outputs_plain):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("groups", [2, LAYERS])
def test_per_group_keep_sets_with_holes_match_reference_attention(groups):
    # keep[b][g, t]: request 0 drops token 2 in every group (a hole) and token 4 in group 0 only; request 1 keeps
    # a different set per group, tokens 1 and 7 in none
    keeps = [torch.ones(groups, PROMPTS[0], dtype=torch.bool), torch.ones(groups, PROMPTS[1], dtype=torch.bool)]
    keeps[0][:, 2] = False
    keeps[0][0, 4] = False
    keeps[1][:, [1, 7]] = False
    for g in range(groups):
        keeps[1][g, 2 + g] = False

    def evict(engine):
        for b, keep in enumerate(keeps):
            engine.rows[b] = evict_groups(engine.allocator, engine.rows[b], keep, owned_from=0).row

    engine = Engine(groups=groups)
    freed_before = engine.allocator.heap_available_size()
    prefill, decode, second = run_turns(engine, evict)
    dropped = sum(int((~keep).sum()) for keep in keeps)
    # group-slots: the prompts, 2 decode tokens and 6 second-turn tokens in every group, less what eviction freed
    assert engine.allocator.heap_available_size() == freed_before - groups * (sum(PROMPTS) + 2 + 6) + dropped
    assert [int((row == -1).sum()) for row in engine.rows.values()] == [1, 2]

    # the reference sees what was written: prompt K/V where the layer's group keeps them, then every later token
    _, k1, v1 = qkv(sum(PROMPTS), seed=1)
    q2, k2, v2 = qkv(len(PROMPTS), seed=2)
    q3, k3, v3 = qkv(3 * len(PROMPTS), seed=3)
    starts = [0, PROMPTS[0]]
    for layer in range(LAYERS):
        group = layer // (LAYERS // groups)
        for b, keep in enumerate(keeps):
            prompt = slice(starts[b], starts[b] + PROMPTS[b])
            _assert_attends_to_kept(layer, b, prompt, keep[group], (k1, v1), (q2, k2, v2), (q3, k3, v3),
                                    decode, second)


WINDOW_LAYERS = frozenset({0, 1})  # layers 2 and 3 attend to everything
LONG_PROMPTS = [12, 15]  # long enough that the sliding-window layers' groups drop most of each prompt


@pytest.mark.parametrize("groups", [1, 2, LAYERS])
def test_sliding_window_layers_without_eviction_are_sglangs_pool_bit_for_bit(groups):
    plain = Engine(window_layers=WINDOW_LAYERS)
    layered = Engine(groups=groups, window_layers=WINDOW_LAYERS)
    for got, expected in zip(run_turns(layered, prompts=LONG_PROMPTS), run_turns(plain, prompts=LONG_PROMPTS)):
        assert torch.equal(got, expected)


def window_keep_masks(groups):
    """Per request ``[groups, prompt]`` keep masks as the server selects them for a model whose layers 0 and 1 have
    sliding windows: snapkv-like random scores of layers 2 and 3, 7 tokens kept (sinks 1 and the last WINDOW + 1
    among them), window-only groups keep that tail."""
    layout = GroupLayout(LAYERS, groups, WINDOW_LAYERS)
    config = EvictionConfig(policy="snapkv", budget=Budget(tokens=7), window=1, sinks=1, pooling_kernel=1,
                            granularity="per_layer", layer_groups=groups)
    gen = torch.Generator().manual_seed(7)
    keeps = []
    for n in LONG_PROMPTS:
        scores = torch.rand(2, KV_HEADS, n, generator=gen)
        grouped = layout_group_scores(scores, [2, 3], layout, comparable_across_layers=False)
        keeps.append(layout_keep_masks(grouped, layout, config, torch.arange(n), protected_recent=WINDOW + 1))
    return keeps


@pytest.mark.parametrize("groups", [1, 2, LAYERS])
def test_sliding_window_groups_keep_their_window_and_full_attention_layers_their_keep_set(groups):
    keeps = window_keep_masks(groups)
    tail = [torch.arange(n) >= n - (WINDOW + 1) for n in LONG_PROMPTS]
    for keep, n, last in zip(keeps, LONG_PROMPTS, tail):
        assert keep.all(0)[last].all()  # every group keeps the tail the sliding-window layers read
        for group in GroupLayout(LAYERS, groups, WINDOW_LAYERS).window_only_groups:
            assert torch.equal(keep[group], last)  # and a group of sliding-window layers only that tail
        assert int(keep[-1].sum()) == 7 < n  # the full-attention layers' groups keep the budget

    def evict(engine):
        for b, keep in enumerate(keeps):
            engine.rows[b] = evict_groups(engine.allocator, engine.rows[b], keep, owned_from=0).row

    plain = run_turns(Engine(window_layers=WINDOW_LAYERS), prompts=LONG_PROMPTS)
    engine = Engine(groups=groups, window_layers=WINDOW_LAYERS)
    free_before = engine.allocator.heap_available_size()
    prefill, decode, second = run_turns(engine, evict, prompts=LONG_PROMPTS)
    dropped = sum(int((~keep).sum()) for keep in keeps)
    tokens = sum(LONG_PROMPTS) + 2 + 6  # prompts, a decode token and 3 second-turn tokens per request
    assert engine.allocator.heap_available_size() == free_before - groups * tokens + dropped
    if groups == 2:  # the window-only group holds each prompt's tail, the other the full layers' keep-set
        assert dropped == sum(n - (WINDOW + 1) + n - 7 for n in LONG_PROMPTS)
    if groups == LAYERS:  # layers 2 and 3 select their own keep-sets from their own scores
        assert any(not torch.equal(keep[2], keep[3]) for keep in keeps)

    _, k1, v1 = qkv(sum(LONG_PROMPTS), seed=1)
    q2, k2, v2 = qkv(len(LONG_PROMPTS), seed=2)
    q3, k3, v3 = qkv(3 * len(LONG_PROMPTS), seed=3)
    starts = [0, LONG_PROMPTS[0]]
    for layer in range(LAYERS):
        if layer in WINDOW_LAYERS:  # the window reads exactly what it would without eviction
            torch.testing.assert_close(decode[layer], plain[1][layer], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(second[layer], plain[2][layer], rtol=1e-6, atol=1e-6)
            continue
        group = layer // (LAYERS // groups)
        for b, keep in enumerate(keeps):
            prompt = slice(starts[b], starts[b] + LONG_PROMPTS[b])
            _assert_attends_to_kept(layer, b, prompt, keep[group], (k1, v1), (q2, k2, v2), (q3, k3, v3),
                                    decode, second)


def test_layered_pool_sizes_and_shares_buffers_by_group():
    pool = LayeredMHATokenToKVPool(12, 2, torch.float32, KV_HEADS, HEAD_DIM, LAYERS, "cpu")
    assert [pool.group_of_layer(layer) for layer in range(LAYERS)] == [0, 0, 1, 1]
    assert pool.get_key_buffer(0).shape == (13, KV_HEADS, HEAD_DIM) and pool.get_key_buffer(0).is_contiguous()
    # layer j of every group views the same heap tensor; the heap holds L / G layers of 12 group-slots + padding
    assert pool.get_key_buffer(0).data_ptr() == pool.get_key_buffer(2).data_ptr()
    assert pool.get_key_buffer(0).data_ptr() != pool.get_key_buffer(1).data_ptr()
    assert pool.get_kv_size_bytes() == (2 * 13 * KV_HEADS * HEAD_DIM * 4,) * 2
    with pytest.raises(ValueError):
        LayeredMHATokenToKVPool(12, 3, torch.float32, KV_HEADS, HEAD_DIM, LAYERS, "cpu")


def _assert_attends_to_kept(layer, b, prompt, kept, prefill, step, turn2, decode, second):
    """Request ``b``'s decode step and its 3-token second turn, in ``layer``, equal reference attention over the
    prompt's ``kept`` keys (``prefill``: the prompt's ``(k, v)`` ``[layers, tokens, heads, dim]``) followed by the
    decode token's (``step``: its ``(q, k, v)``) and, for the second turn, its own (``turn2``)."""
    (k1, v1), (q2, k2, v2), (q3, k3, v3) = prefill, step, turn2
    keys = torch.cat([k1[layer, prompt][kept], k2[layer, b:b + 1]])
    values = torch.cat([v1[layer, prompt][kept], v2[layer, b:b + 1]])
    expected = reference_attention(q2[layer, b:b + 1], keys, values, causal_from=keys.shape[0] - 1)
    torch.testing.assert_close(decode[layer, b:b + 1], expected, rtol=1e-5, atol=1e-5)
    turn = slice(3 * b, 3 * b + 3)
    keys = torch.cat([keys, k3[layer, turn]])
    values = torch.cat([values, v3[layer, turn]])
    expected = reference_attention(q3[layer, turn], keys, values, causal_from=keys.shape[0] - 3)
    torch.testing.assert_close(second[layer, turn], expected, rtol=1e-5, atol=1e-5)
