"""The window LSE taken from SGLang 0.5.17's ``FlashInferAttnBackend.forward_extend`` (``patches/flashinfer_lse.py``).

FlashInfer does not run on CPU, so the backend's wrappers are stand-ins computing attention and FlashInfer's base-2
LSE in PyTorch (``forward`` and ``forward_return_lse``, as FlashInfer's prefill wrappers); the backend's own
``forward_extend`` (SGLang's code, all three paths), its ``RadixAttention`` layer and KV pool are SGLang's. Checked:
the hook leaves the attention output bit for bit as SGLang computes it, captures the window rows' natural LSE over
prefix and new keys (equal to a float64 reference), a compressed prefix (holes) is scored in one read with the
scores of two passes, the layers it must not capture for are skipped, and the plugin registers the hook.
The GPU test at the end runs FlashInfer itself.
"""

import math
from types import SimpleNamespace

import pytest
from sglang_guard import sglang_or_skip

with sglang_or_skip():
    import torch
    from sglang.srt.layers.attention import flashinfer_backend
    from sglang.srt.layers.attention.flashinfer_backend import FlashInferAttnBackend, PrefillMetadata
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool


from sgl_evict.config import EvictionConfig
from sgl_evict.engine.keep import window_scores
from sgl_evict.engine.runtime import STATE
from sgl_evict.engine.window_lse import LN2, RecordingWrapper, window_lse
from sgl_evict.holes import HOLE, count_live
from sgl_evict.kernels.paged_scoring import attention_mass_paged
from sgl_evict.patches import flashinfer_lse
from sgl_evict.selection import Budget

HEADS, KV_HEADS, DIM, SCALE, WINDOW, SLOTS = 4, 2, 16, 0.25, 8, 96
#: SGLang's forward_extend as it is in the package (a test module before this one may have applied the hooks)
ORIGINAL = getattr(FlashInferAttnBackend.forward_extend, "__wrapped__", FlashInferAttnBackend.forward_extend)


def attend(q, k, v, seen, scale):
    """Reference attention with FlashInfer's outputs: ``[T, heads, dim]`` in ``q``'s dtype and ``[T, heads]``
    float32 **base-2** LSE. ``seen [T, kv_len]`` bool: which keys each query row sees (none: LSE -inf, output 0)."""
    group = q.shape[1] // k.shape[1]
    k, v = (t.double().repeat_interleave(group, dim=1).transpose(0, 1) for t in (k, v))  # [heads, kv_len, dim]
    logits = (scale * q.double().transpose(0, 1) @ k.transpose(1, 2)).masked_fill(~seen, -math.inf)
    lse = torch.logsumexp(logits, dim=-1)  # [heads, T]
    probs = torch.nan_to_num(torch.exp(logits - lse.unsqueeze(-1)))
    return (probs @ v).transpose(0, 1).to(q.dtype), (lse / LN2).T.float().contiguous()


class FakeRagged:
    """FlashInfer's ragged prefill wrapper as SGLang calls it, over each request's new tokens."""

    _backend = "fa3"  # what FlashInfer's "auto" resolves to on an H100

    def __init__(self, extend_lens):
        self.extend_lens = extend_lens

    def forward_return_lse(self, q, k, v, causal=False, sm_scale=None, logits_soft_cap=None, window_left=-1):
        outs, lses, start = [], [], 0
        for n in self.extend_lens:
            seen = torch.ones(n, n, dtype=torch.bool)
            if causal:
                seen = seen.tril()
            o, lse = attend(q[start:start + n], k[start:start + n], v[start:start + n], seen, sm_scale)
            outs.append(o), lses.append(lse)
            start += n
        return torch.cat(outs), torch.cat(lses)

    def forward(self, *args, **kwargs):
        return self.forward_return_lse(*args, **kwargs)[0]


class FakePaged:
    """FlashInfer's paged prefill wrapper, planned on each request's compacted slots (``kv_slots``), reading the
    pool; causal aligns each request's last query with its last key, as FlashInfer does."""

    _backend = "fa2"  # SGLang's prefill_backend

    def __init__(self, extend_lens, kv_slots):
        self.extend_lens, self.kv_slots = extend_lens, kv_slots

    def forward_return_lse(self, q, kv_cache, causal=False, sm_scale=None, window_left=-1, logits_soft_cap=None,
                           k_scale=None, v_scale=None):
        keys, values = kv_cache
        outs, lses, start = [], [], 0
        for n, slots in zip(self.extend_lens, self.kv_slots):
            seen = torch.ones(n, len(slots), dtype=torch.bool)
            if causal:
                seen = torch.arange(len(slots)).view(1, -1) <= (len(slots) - n + torch.arange(n)).view(-1, 1)
            o, lse = attend(q[start:start + n], keys[slots], values[slots], seen, sm_scale)
            outs.append(o), lses.append(lse)
            start += n
        return torch.cat(outs), torch.cat(lses)

    def forward(self, *args, **kwargs):
        return self.forward_return_lse(*args, **kwargs)[0]


def torch_merge_state(v_a, s_a, v_b, s_b):
    """FlashInfer's ``merge_state`` (base-2 LSE), for SGLang's ``_safe_merge_state`` on CPU."""
    s = torch.logaddexp2(s_a, s_b)
    return (v_a * torch.exp2(s_a - s).unsqueeze(-1) + v_b * torch.exp2(s_b - s).unsqueeze(-1)).to(v_a.dtype), s


@pytest.fixture
def state():
    saved = STATE.config
    STATE.configure(EvictionConfig(policy="snapkv", budget=Budget(fraction=0.1), window=WINDOW))
    yield STATE
    STATE.configure(saved)


class Batch:
    """Two requests of one extend forward on SGLang's pool: ``a`` has a matched prefix of 20 logical tokens with 6
    holes (14 live) and 12 new tokens, ``b`` 6 new tokens (fewer than the window), with or without a prefix of its
    own. Attributes mirror what the backend reads of its ``ForwardBatch`` after the plugin compacted it."""

    def __init__(self, path, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.pool = MHATokenToKVPool(SLOTS, 1, torch.float32, KV_HEADS, DIM, 1, "cpu", False)
        self.pool.k_buffer[0].copy_(torch.randn(SLOTS + 1, KV_HEADS, DIM, generator=gen))
        self.pool.v_buffer[0].copy_(torch.randn(SLOTS + 1, KV_HEADS, DIM, generator=gen))
        slots = (torch.randperm(SLOTS - 1, generator=gen) + 1).tolist()
        prefix_a = torch.tensor(slots[:20], dtype=torch.int32)
        prefix_a[2:14:2] = HOLE
        prefix_b = torch.tensor(slots[20:25] if path == "paged" else [], dtype=torch.int32)
        self.extend_lens = [12, 6]
        self.new_slots = torch.tensor(slots[40:58], dtype=torch.int64)
        self.rows = [torch.cat([prefix_a, self.new_slots[:12].int()]), torch.cat([prefix_b, self.new_slots[12:].int()])]
        if path == "ragged":  # no request has a prefix: the ragged wrapper alone
            self.rows[0] = self.new_slots[:12].int()
        prefixes = [row[:len(row) - n] for row, n in zip(self.rows, self.extend_lens)]
        compacted = [row[row != HOLE].long() for row in self.rows]
        self.q = torch.randn(sum(self.extend_lens), HEADS * DIM, generator=gen)
        # RadixAttention.forward hands the backend k and v as [tokens, kv_heads, head_dim]
        self.k = torch.randn(sum(self.extend_lens), KV_HEADS, DIM, generator=gen)
        self.v = torch.randn(sum(self.extend_lens), KV_HEADS, DIM, generator=gen)
        self.forward_batch = SimpleNamespace(
            out_cache_loc=self.new_slots, encoder_out_cache_loc=None, spec_info=None,
            extend_prefix_lens_cpu=[count_live(p) for p in prefixes],
            seq_lens_cpu=torch.tensor([len(c) for c in compacted]))
        use_ragged = path != "paged"
        paged_slots = compacted if not use_ragged else [c[:len(c) - n] for c, n in zip(compacted, self.extend_lens)]
        self.backend = FlashInferAttnBackend.__new__(FlashInferAttnBackend)
        self.backend.num_wrappers = 1
        self.backend.token_to_kv_pool = self.pool
        self.backend.prefill_uses_dequant_workspace = False
        self.backend.is_dllm_model = False
        self.backend.kv_cache_quant_method = SimpleNamespace(needs_global_scale=lambda: False)
        self.backend.prefill_wrapper_ragged = FakeRagged(self.extend_lens)
        self.backend.forward_metadata = PrefillMetadata(
            prefill_wrappers=[FakePaged(self.extend_lens, paged_slots)], use_ragged=use_ragged,
            extend_no_prefix=path == "ragged")

    def run(self, forward_extend, layer):
        return forward_extend(self.backend, self.q.clone(), self.k.clone(), self.v.clone(), layer, self.forward_batch)

    def reference_lse(self, layer_scale=SCALE):
        """``[num_reqs, heads, window]`` natural LSE of each request's window rows over its live keys (float64),
        from the pool after the forward wrote the new keys; rows of a request with fewer new tokens repeat its first
        (the capture's layout)."""
        keys = self.pool.k_buffer[0]
        q = self.q.view(-1, HEADS, DIM)
        out, start = [], 0
        for row, n in zip(self.rows, self.extend_lens):
            live = row[row != HOLE].long()
            seen = torch.arange(len(live)).view(1, -1) <= (len(live) - n + torch.arange(n)).view(-1, 1)
            _, lse2 = attend(q[start:start + n], keys[live], keys[live], seen, layer_scale)
            w = min(WINDOW, n)
            picked = lse2[n - w:][[max(0, j - (WINDOW - w)) for j in range(WINDOW)]]
            out.append(picked.T.double() * LN2)
            start += n
        return torch.stack(out)


def _layer(**kw):
    return RadixAttention(HEADS, DIM, SCALE, KV_HEADS, layer_id=0, **kw)


def _capture(state, batch, layer):
    state.capture.begin(1, batch.extend_lens, "cpu")
    state.capture.record(layer.layer_id, batch.q, HEADS, DIM, layer.scaling)
    return state.capture


def _hooked(backend, q, k, v, layer, forward_batch):
    return flashinfer_lse.forward_extend_around(ORIGINAL, backend, q, k, v, layer, forward_batch)


@pytest.mark.parametrize("path", ["paged", "ragged", "ragged+prefix"])
def test_the_hook_keeps_sglangs_output_and_captures_the_window_rows_natural_lse(state, monkeypatch, path):
    monkeypatch.setattr(flashinfer_backend, "_safe_merge_state", torch_merge_state, raising=False)
    layer = _layer()
    plain = Batch(path)
    expected = plain.run(ORIGINAL, layer)  # SGLang alone
    batch = Batch(path)
    capture = _capture(state, batch, layer)
    got = batch.run(_hooked, layer)
    assert torch.equal(got, expected)  # bit for bit
    assert torch.equal(batch.pool.k_buffer[0], plain.pool.k_buffer[0])  # the new keys written as SGLang writes them
    assert capture.lse_skipped == {}
    torch.testing.assert_close(capture.lse[0].double(), batch.reference_lse(), rtol=1e-5, atol=1e-5)
    assert capture.attended_lens == batch.forward_batch.seq_lens_cpu.tolist()
    # the backend's wrappers are its own again
    assert isinstance(batch.backend.prefill_wrapper_ragged, FakeRagged)
    assert isinstance(batch.backend.forward_metadata.prefill_wrappers[0], FakePaged)


def test_without_the_hook_nothing_is_captured(state):
    layer = _layer()
    batch = Batch("paged")
    capture = _capture(state, batch, layer)
    batch.run(ORIGINAL, layer)
    assert capture.lse == {} and capture.lse_of(0, 26)[0] == {}


def test_a_compressed_prefix_is_scored_in_one_read_as_in_two_passes(state):
    """Attention saw request ``a``'s compacted row; the scorer reads its logical row, holes included, with the
    window queries causal at their logical positions: the LSE must be the normaliser of exactly those keys."""
    layer = _layer()
    batch = Batch("paged")
    capture = _capture(state, batch, layer)
    batch.run(_hooked, layer)
    capture.end()
    keys = batch.pool.k_buffer[0]
    for i, row in enumerate(batch.rows):
        row_lse, why = capture.lse_of(i, count_live(row))
        assert why is None and set(row_lse) == {0}
        args = (capture.queries_of(i), capture.scaling, lambda _: keys, row, 7, attention_mass_paged)
        two = window_scores(*args)
        one = window_scores(*args, row_lse=row_lse)
        torch.testing.assert_close(one, two, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("layer_kw, backend_change, reason", [
    ({"logit_cap": 30.0}, None, "logit soft-capping"),
    ({"sliding_window_size": 4}, None, "sliding-window layer"),
    ({"is_cross_attention": True}, None, "not causal self-attention"),
    ({}, "dequant", "dequantised KV workspace"),
    ({}, "dtype", "the pool stores torch.bfloat16"),
])
def test_layers_whose_attention_is_not_the_scorers_get_no_lse(state, layer_kw, backend_change, reason):
    layer = _layer(**layer_kw)
    batch = Batch("ragged+prefix")
    if backend_change == "dequant":
        batch.backend.prefill_uses_dequant_workspace = True
    if backend_change == "dtype":
        batch.pool.dtype = torch.bfloat16
    capture = _capture(state, batch, layer)
    ran = []
    # SGLang's own call (a stand-in: these layers' paths need what the stand-in backend lacks) runs unchanged
    flashinfer_lse.forward_extend_around(lambda *args: ran.append(args), batch.backend, batch.q, batch.k, batch.v,
                                         layer, batch.forward_batch)
    assert len(ran) == 1 and ran[0][0] is batch.backend
    assert capture.lse == {} and reason in capture.lse_skipped[0]


def test_a_scale_other_than_the_scorers_gets_no_lse(state, monkeypatch):
    monkeypatch.setattr(flashinfer_backend, "_safe_merge_state", torch_merge_state, raising=False)
    layer = _layer()
    batch = Batch("ragged+prefix")
    capture = _capture(state, batch, layer)
    capture.scaling[0] = 0.5  # what the scorer would use; FlashInfer is called with the layer's 0.25
    batch.run(_hooked, layer)
    assert capture.lse == {} and "attention scale 0.25 differs from the scorer's 0.5" in capture.lse_skipped[0]


def test_the_plugin_registers_the_hook_on_sglangs_backend(state, monkeypatch):
    from sglang.srt.plugins import load_plugins
    from sglang.srt.plugins.hook_registry import HookRegistry

    load_plugins()
    assert f"{flashinfer_lse.BACKEND}.forward_extend" in HookRegistry._patched
    layer = _layer()
    batch = Batch("paged")
    capture = _capture(state, batch, layer)
    batch.run(FlashInferAttnBackend.forward_extend, layer)  # SGLang's method as the server calls it
    assert set(capture.lse) == {0}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("with_prefix", [False, True])
def test_on_gpu_flashinfers_lse_is_base_2_and_return_lse_leaves_the_output_bit_for_bit(with_prefix):
    """Real FlashInfer prefill wrappers, planned as SGLang plans them (bf16, GQA 4:2, head_dim 128, two requests):
    ``forward`` equals ``forward_return_lse``'s output bit for bit, and :func:`window_lse` of the recorded calls
    (merged over the prefix on the ragged+prefix path) equals the natural LSE of a float64 reference."""
    flashinfer = pytest.importorskip("flashinfer")
    dev, dim, heads, kv_heads, scale = "cuda", 128, 8, 4, 128 ** -0.5
    gen = torch.Generator(device=dev).manual_seed(0)
    # every request has a prefix on the ragged+prefix path: with [500, 0] (a request of no pages, last page
    # length 1) FlashInfer's paged prefill hit an illegal address on the H100 (2026-11-24), in this test's own
    # wrapper calls, before any sgl-evict code ran
    new, prefix = [300, 40], ([500, 60] if with_prefix else [0, 0])
    q = torch.randn(sum(new), heads, dim, generator=gen, device=dev, dtype=torch.bfloat16)
    k = torch.randn(sum(new), kv_heads, dim, generator=gen, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    pk = torch.randn(sum(prefix) + 1, 1, kv_heads, dim, generator=gen, device=dev, dtype=torch.bfloat16)
    pv = torch.randn_like(pk)
    workspace = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
    qo = torch.tensor([0, new[0], sum(new)], dtype=torch.int32, device=dev)
    ragged = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(workspace, "NHD")
    ragged.plan(qo, qo, heads, kv_heads, dim, q_data_type=torch.bfloat16)
    calls = []
    o_plain = ragged.forward(q, k, v, causal=True, sm_scale=scale)
    o_rec = RecordingWrapper(ragged, "ragged", calls).forward(q, k, v, causal=True, sm_scale=scale)
    assert torch.equal(o_plain, o_rec)
    path = "ragged"
    if with_prefix:
        kv_indptr = torch.tensor([0, prefix[0], sum(prefix)], dtype=torch.int32, device=dev)
        indices = torch.arange(sum(prefix), dtype=torch.int32, device=dev)
        last = torch.ones(2, dtype=torch.int32, device=dev)
        paged = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD")
        paged.plan(qo, kv_indptr, indices, last, heads, kv_heads, dim, 1, q_data_type=torch.bfloat16)
        o2, s2 = paged.forward_return_lse(q, (pk, pv), causal=False, sm_scale=scale)
        o_rec2, _ = RecordingWrapper(paged, "paged", calls).forward_return_lse(q, (pk, pv), causal=False,
                                                                             sm_scale=scale)
        assert torch.equal(o2, o_rec2)
        path = "ragged+prefix"
    rows = torch.cat([torch.arange(new[0] - 16, new[0]), torch.arange(sum(new) - 16, sum(new))]).to(dev)
    has_prefix = torch.tensor([p > 0 for p in prefix], device=dev).repeat_interleave(16)
    lse, why = window_lse(calls, path, rows, has_prefix, scale)
    assert why is None
    expected, start = [], 0
    for n, p, base in zip(new, prefix, [0, prefix[0]]):
        keys = torch.cat([pk[base:base + p, 0], k[start:start + n]]).double()
        logits = scale * q[start + n - 16:start + n].double().transpose(0, 1) @ \
            keys.repeat_interleave(heads // kv_heads, dim=1).permute(1, 2, 0)
        seen = torch.arange(p + n, device=dev).view(1, -1) <= (p + n - 16 + torch.arange(16, device=dev)).view(-1, 1)
        expected.append(torch.logsumexp(logits.masked_fill(~seen, -math.inf), dim=-1).T)
        start += n
    torch.testing.assert_close(lse.double(), torch.cat(expected), rtol=0, atol=2e-2)
