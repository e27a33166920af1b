"""Decode CUDA graphs of the layered Triton backend (sgl_evict/engine/layered_attention.py, design step 5), with
SGLang 0.5.17's real pools, TritonAttnBackend and Triton decode kernel (on CPU under TRITON_INTERPRET=1), and the
test engine of tests/sglang/test_layered_kv_pool.py.

:class:`Graph` is SGLang's decode CUDA-graph runner reduced to what the attention backend sees: static input buffers
padded as SGLang's buffer registry pads them (``req_pool_indices`` 0, ``seq_lens`` the backend's fill value,
``out_cache_loc`` 0), capture (``init_forward_metadata_out_graph(in_capture=True)``, then the recorded body:
``init_forward_metadata_in_graph`` and every layer's ``forward_decode`` on the static batch) and replay preparation
(``init_forward_metadata_out_graph`` on ``build_replay_fb_view``'s fields). On CPU nothing is recorded: a replay runs
the body again on the static batch, which stands for the recorded graph as long as the body reads nothing but the
static buffers and the capture's Python objects; the eager reference therefore runs on a second, identical engine
(the graph engine runs no eager forward after its capture). The GPU test records and replays a real
``torch.cuda.CUDAGraph`` on one engine, eager forwards in between.

What each layer's decode kernel is given (its read list per request, its write locations) is recorded from
``decode_attention_fwd``:
- with random per-group keep-sets, a padded batch: every layer's lists and write locations equal the eager
  backend's, the padding requests read live group-slots or the padding slot (never an empty list), and the outputs
  of the real requests equal the eager outputs;
- after the keep-sets change (more group-slots freed), the same captured graph reads the new lists;
- sliding-window layers (groups of window layers only, mixed groups): the translated window lists and the outputs
  equal the eager backend's.
"""

import os

import pytest
from sglang_guard import sglang_or_skip

with sglang_or_skip("sglang's Triton attention backend"):
    import torch
    from sglang.srt.model_executor.forward_batch_info import ForwardMode
    from test_layered_kv_pool import (
        HEAD_DIM,
        HEADS,
        KV_HEADS,
        LAYERS,
        LONG_PROMPTS,
        WINDOW_LAYERS,
        Engine,
        cpu_runtime,
        qkv,
        window_keep_masks,
    )

from sgl_evict.engine.group_evict import evict_groups

assert cpu_runtime  # the autouse fixture of test_layered_kv_pool, for this module too

MAX_BS = 4  # the graph's batch size: the test batches of 2 and 3 requests are padded to it
PROMPTS = [6, 9, 7]


class Graph:
    """One captured decode graph of ``MAX_BS`` requests over ``engine``'s backend (see the module docstring)."""

    def __init__(self, engine):
        self.engine = engine
        backend = engine.backend
        backend.init_cuda_graph_state(MAX_BS, MAX_BS)
        self.fill = backend.get_cuda_graph_seq_len_fill_value()
        device = engine.device
        self.req_pool_indices = torch.zeros(MAX_BS, dtype=torch.int64, device=device)
        self.seq_lens = torch.full((MAX_BS,), self.fill, dtype=torch.int64, device=device)
        self.seq_lens_cpu = torch.full((MAX_BS,), self.fill, dtype=torch.int64)
        self.out_cache_loc = torch.zeros(MAX_BS, dtype=torch.int64, device=device)
        self.batch = _decode_batch(self.req_pool_indices, self.seq_lens, self.seq_lens_cpu, self.out_cache_loc,
                                   seq_lens_sum=MAX_BS * self.fill)
        backend.init_forward_metadata_out_graph(self.batch, in_capture=True)

    def body(self, q, k, v):
        """What the graph records: ``q [L, MAX_BS, HEADS, D]``, ``k`` / ``v [L, MAX_BS, KV_HEADS, D]`` ->
        ``[L, MAX_BS, HEADS, D]``."""
        backend, layers = self.engine.backend, self.engine.layers
        backend.init_forward_metadata_in_graph(self.batch)
        return torch.stack([backend.forward_decode(q[layer].flatten(1), k[layer], v[layer], layers[layer],
                                                   self.batch)
                            for layer in range(LAYERS)]).view(LAYERS, MAX_BS, HEADS, HEAD_DIM)

    def load(self, batch):
        """SGLang's ``load_batch``: the real batch into the static buffers, the rest padded, then the backend's
        replay preparation."""
        raw = batch.batch_size
        for buffer, values, pad in [(self.req_pool_indices, batch.req_pool_indices, 0),
                                    (self.seq_lens, batch.seq_lens, self.fill),
                                    (self.seq_lens_cpu, batch.seq_lens.cpu(), self.fill),
                                    (self.out_cache_loc, batch.out_cache_loc, 0)]:
            buffer[:raw].copy_(values)
            buffer[raw:].fill_(pad)
        view = _decode_batch(self.req_pool_indices, self.seq_lens, self.seq_lens_cpu, batch.out_cache_loc,
                             seq_lens_sum=batch.seq_lens_sum + (MAX_BS - raw) * self.fill)
        self.engine.backend.init_forward_metadata_out_graph(view)


def _decode_batch(req_pool_indices, seq_lens, seq_lens_cpu, out_cache_loc, seq_lens_sum):
    import types

    return types.SimpleNamespace(
        forward_mode=ForwardMode.DECODE, batch_size=req_pool_indices.shape[0], spec_info=None, encoder_lens=None,
        req_pool_indices=req_pool_indices, seq_lens=seq_lens, seq_lens_cpu=seq_lens_cpu, seq_lens_sum=seq_lens_sum,
        out_cache_loc=out_cache_loc)


def record_kernel_inputs(backend) -> list:
    """Wraps the backend's decode kernel: per call (one per layer, in order), each request's read list and the
    write locations of the layer's store, as lists."""
    calls = []
    kernel = backend.decode_attention_fwd

    def recording(q, k_buffer, v_buffer, o, kv_indptr, kv_indices, *args, **kwargs):
        ends = kv_indptr.tolist()
        calls.append(([kv_indices[ends[b]:ends[b + 1]].tolist() for b in range(len(ends) - 1)],
                      backend.forward_metadata.out_cache_loc_full_physical.tolist()))
        return kernel(q, k_buffer, v_buffer, o, kv_indptr, kv_indices, *args, **kwargs)

    backend.decode_attention_fwd = recording
    return calls


def random_keeps(prompts, groups, seed):
    """Per request a random ``[groups, n]`` keep mask; request 0 drops its first token in group 0 only, the entry a
    padding request reads (row 0, length 1), so padding meets a group with nothing live."""
    gen = torch.Generator().manual_seed(seed)
    keeps = [torch.rand(groups, n, generator=gen) < 0.6 for n in prompts]
    keeps[0][:, 0] = True
    keeps[0][0, 0] = False
    return keeps


def drop_one_more(keeps):
    """``keeps`` with one more token dropped per request and group (the middle of the kept ones)."""
    more = [keep.clone() for keep in keeps]
    for keep in more:
        for group in range(keep.shape[0]):
            kept = keep[group].nonzero().flatten()
            keep[group, kept[len(kept) // 2]] = False
    return more


def evict(engine, keeps):
    """Per-group eviction of each request's first ``keep.shape[1]`` positions (later ones kept)."""
    for b, keep in enumerate(keeps):
        row = engine.rows[b]
        full = torch.ones(keep.shape[0], row.numel(), dtype=torch.bool)
        full[:, :keep.shape[1]] = keep
        engine.rows[b] = evict_groups(engine.allocator, row, full.to(engine.device), owned_from=0).row


def eager_step(engine, bs, seed):
    """An eager decode step of requests ``0 .. bs - 1``: the batch, the kernel inputs recorded, the outputs."""
    q, k, v = (t.to(engine.device) for t in qkv(bs, seed))
    calls = record_kernel_inputs(engine.backend)
    return engine.decode(q, k, v), calls


def graph_step(engine, graph, bs, seed):
    """The same decode step replayed through ``graph`` (the body run again on CPU)."""
    q, k, v = (_padded(t.to(engine.device)) for t in qkv(bs, seed))
    graph.load(engine.decode_batch(bs))
    calls = record_kernel_inputs(engine.backend)
    return graph.body(q, k, v), calls


def _padded(t):
    """``[L, bs, ...]`` -> ``[L, MAX_BS, ...]``, zeros for the padding requests."""
    out = torch.zeros(t.shape[0], MAX_BS, *t.shape[2:], dtype=t.dtype, device=t.device)
    out[:, :t.shape[1]] = t
    return out


def prepared_engines(groups, prompts, keeps, window_layers=()):
    """An eager engine and a captured graph over an identical second engine, both after the same prefill and
    eviction (the allocators are deterministic: the same slots on both)."""
    engines = []
    for _ in range(2):
        engine = Engine(groups=groups, window_layers=window_layers)
        engine.extend(prompts, *qkv(sum(prompts), seed=1))
        evict(engine, keeps)
        engines.append(engine)
    eager, graphed = engines
    return eager, graphed, Graph(graphed)


def assert_replay_equals_eager(eager, graphed, graph, bs, seed):
    """One decode step on both engines: every layer's kernel inputs and the outputs of the real requests equal;
    the padding requests read a non-empty list of group-slots and their outputs are finite. The graph's kernel
    inputs per layer."""
    expected, eager_calls = eager_step(eager, bs, seed)
    got, graph_calls = graph_step(graphed, graph, bs, seed)
    assert len(graph_calls) == len(eager_calls) == LAYERS
    group_map = graphed.allocator.group_map
    for (lists, locs), (eager_lists, eager_locs) in zip(graph_calls, eager_calls):
        assert lists[:bs] == eager_lists
        assert locs[:bs] == eager_locs and locs[bs:] == [0] * (MAX_BS - bs)  # padding tokens write slot 0
        assert all(padding and min(padding) >= 0 for padding in lists[bs:])  # 0: the padding slot
    assert torch.equal(got[:, :bs], expected)
    assert torch.isfinite(got).all()
    return graph_calls


@pytest.mark.parametrize("groups", [2, LAYERS])
@pytest.mark.parametrize("bs", [2, 3])
def test_replayed_group_metadata_and_outputs_equal_eager(groups, bs):
    keeps = random_keeps(PROMPTS, groups, seed=groups)
    eager, graphed, graph = prepared_engines(groups, PROMPTS, keeps)
    calls = assert_replay_equals_eager(eager, graphed, graph, bs, seed=2)
    # the groups read their own keep-sets; a padding request met a group with nothing live: the padding slot
    assert len({str(lists[:bs]) for lists, _ in calls}) == groups
    assert [0] in [lists[bs] for lists, _ in calls]


@pytest.mark.parametrize("groups", [2, LAYERS])
def test_replay_after_the_keep_sets_change_reads_the_new_lists(groups):
    prompts = PROMPTS[:2]
    keeps = random_keeps(prompts, groups, seed=5)
    eager, graphed, graph = prepared_engines(groups, prompts, keeps)
    before = assert_replay_equals_eager(eager, graphed, graph, 2, seed=2)
    # every group drops one more prompt token per request: the captured graph must read the new lists
    more = drop_one_more(keeps)
    evict(eager, more)
    evict(graphed, more)
    after = assert_replay_equals_eager(eager, graphed, graph, 2, seed=3)
    for (lists_before, _), (lists_after, _) in zip(before, after):
        # each request's list lost the dropped token and gained the new decode token
        assert [len(a) for a in lists_after[:2]] == [len(b) for b in lists_before[:2]]
        assert lists_after[:2] != lists_before[:2]


@pytest.mark.parametrize("groups", [1, 2, LAYERS])
def test_replayed_sliding_window_layers_equal_eager(groups):
    keeps = window_keep_masks(groups)
    eager, graphed, graph = prepared_engines(groups, LONG_PROMPTS, keeps, window_layers=WINDOW_LAYERS)
    for step in range(2):
        assert_replay_equals_eager(eager, graphed, graph, len(LONG_PROMPTS), seed=2 + step)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="needs a CUDA GPU and compiled Triton kernels (the interpreter runs kernels on the host)")
def test_cuda_graph_of_forward_decode_replays_eager_outputs():
    groups = 2
    prompts = PROMPTS[:2]
    engine = Engine(groups=groups, device="cuda")
    engine.extend(prompts, *(t.cuda() for t in qkv(sum(prompts), seed=1)))
    keeps = random_keeps(prompts, groups, seed=7)
    evict(engine, keeps)
    graph = Graph(engine)
    q = torch.zeros(LAYERS, MAX_BS, HEADS, HEAD_DIM, device="cuda")
    k = torch.zeros(LAYERS, MAX_BS, KV_HEADS, HEAD_DIM, device="cuda")
    v = torch.zeros_like(k)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (Triton compiles) off the capture, as torch's CUDA-graph docs do
        graph.body(q, k, v)
    torch.cuda.current_stream().wait_stream(side)
    cuda_graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(cuda_graph):
        out = graph.body(q, k, v)
    bs = len(prompts)
    for step in range(3):
        if step == 2:  # the keep-sets change between replays
            evict(engine, drop_one_more(keeps))
        step_q, step_k, step_v = (t.cuda() for t in qkv(bs, seed=10 + step))
        batch = engine.decode_batch(bs)
        graph.load(batch)
        for static, value in [(q, step_q), (k, step_k), (v, step_v)]:
            static[:, :bs].copy_(value)
        cuda_graph.replay()
        got = out[:, :bs].clone()
        # the eager step over the same batch, on the same engine: it writes the same K/V at the same group-slots
        engine.backend.init_forward_metadata(batch)
        expected = torch.stack([engine.backend.forward_decode(step_q[layer].flatten(1), step_k[layer],
                                                              step_v[layer], engine.layers[layer], batch)
                                for layer in range(LAYERS)]).view(LAYERS, bs, HEADS, HEAD_DIM)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
