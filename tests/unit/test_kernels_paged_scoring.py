"""Paged scoring kernel vs the PyTorch reference, on random shapes (CPU: Triton interpreter; GPU: compiled)."""


import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sgl_evict.kernels import paged_scoring
from sgl_evict.kernels.paged_scoring import attention_mass_paged, score_paged
from sgl_evict.scoring import attention_probs, score_queries

DEVICES = [pytest.param("cuda", marks=pytest.mark.gpu)] if torch.cuda.is_available() else ["cpu"]
# relative error bounds: keys and queries are rounded to the KV dtype before both computations, so the remaining
# error is the kernel's accumulation order and exp/dot precision
RTOL = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 1e-2}


def _paged_pool(seq_lens, num_kv_heads, head_dim, dtype, device, gen, page_size=1):
    """A shuffled pool holding each request's keys at random pages, and its token->slot table."""
    max_len = max(seq_lens)
    pages_per_req = [-(-n // page_size) for n in seq_lens]
    num_pages = sum(pages_per_req) + 3  # spare pages that belong to nobody
    perm = torch.randperm(num_pages, generator=gen)
    pool = torch.randn(num_pages * page_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    table = torch.zeros(len(seq_lens), max_len, dtype=torch.int32)
    used = 0
    for r, n in enumerate(seq_lens):
        pages = perm[used : used + pages_per_req[r]]
        used += pages_per_req[r]
        slots = (pages[:, None] * page_size + torch.arange(page_size)[None, :]).flatten()[:n]
        table[r, :n] = slots.to(torch.int32)
    return pool.to(device), table.to(device)


def _rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_mass_matches_reference(device, dtype, group, page_size, causal):
    gen = torch.Generator().manual_seed(hash((str(dtype), group, page_size, causal)) % 2**31)
    num_kv_heads, head_dim, num_queries = 2, 32, 5
    seq_lens = [37, 70, 129]  # odd, not multiples of the block
    pool, table = _paged_pool(seq_lens, num_kv_heads, head_dim, dtype, device, gen, page_size)
    q = torch.randn(len(seq_lens), num_kv_heads * group, num_queries, head_dim, generator=gen).to(dtype).to(device)
    qpos = torch.stack([torch.arange(n - num_queries, n) for n in seq_lens]).to(device) if causal else None
    out = attention_mass_paged(q, pool, table, torch.tensor(seq_lens, device=device), 0.2, qpos, block_n=32)
    for r, n in enumerate(seq_lens):
        keys = pool[table[r, :n].long()].transpose(0, 1).float().cpu()  # [kv_heads, n, d]
        ref = attention_probs(q[r].float().cpu(), keys, 0.2, qpos[r].cpu() if causal else None).mean(1)
        assert _rel_err(out[r, :, :n].cpu(), ref) < RTOL[dtype]
        assert torch.all(out[r, :, n:] == 0)  # past the end: written, zero


@pytest.mark.parametrize("device", DEVICES)
def test_every_output_element_written(device):
    gen = torch.Generator().manual_seed(3)
    pool, table = _paged_pool([5, 100], 1, 16, torch.float32, device, gen)
    q = torch.randn(2, 4, 3, 16, generator=gen).to(device)
    out = attention_mass_paged(q, pool, table, torch.tensor([5, 100], device=device), 0.25, block_n=16)
    assert torch.isfinite(out).all()
    assert out[0, :, :5].sum(-1).sub(1).abs().max() < 1e-4  # mean of probability rows sums to 1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pooling_mode,gqa_reduce,laprox", [("max", "mean", False), ("avg", "max", False),
                                                            ("max", "sum", True)])
def test_score_paged_matches_score_queries(device, pooling_mode, gqa_reduce, laprox):
    gen = torch.Generator().manual_seed(11)
    seq_lens = [33, 90]
    pool, table = _paged_pool(seq_lens, 2, 32, torch.float32, device, gen, page_size=16)
    q = torch.randn(2, 8, 6, 32, generator=gen).to(device)
    weights = torch.rand(2, 8, max(seq_lens), generator=gen).to(device) if laprox else None
    qpos = torch.stack([torch.arange(n - 6, n) for n in seq_lens]).to(device)
    got = score_paged(q, pool, table, torch.tensor(seq_lens, device=device), 0.17, qpos, pooling_kernel=5,
                      pooling_mode=pooling_mode, gqa_reduce=gqa_reduce, value_weights=weights)
    for r, n in enumerate(seq_lens):
        keys = pool[table[r, :n].long()].transpose(0, 1).cpu()
        ref = score_queries(q[r].cpu(), keys, 0.17, qpos[r].cpu(), pooling_kernel=5, pooling_mode=pooling_mode,
                            gqa_reduce=gqa_reduce, value_weights=weights[r, :, :n].cpu() if laprox else None)
        assert got[r].shape == (2, n)
        assert _rel_err(got[r].cpu(), ref) < 1e-4


def test_non_power_of_two_group_is_refused():
    with pytest.raises(ValueError, match="power of two"):
        attention_mass_paged(torch.zeros(1, 6, 2, 16), torch.zeros(4, 2, 16), torch.zeros(1, 4, dtype=torch.int32),
                             torch.tensor([4]), 1.0)


# --- holes (evicted tokens: negative req_to_token entries), the grouped schedule and the row_lse single pass ---

try:
    from sgl_evict.holes import HOLE
except ImportError:  # pragma: no cover - defined in sgl_evict/holes.py
    HOLE = -1


def _punch_holes(table, seq_lens, page_size, gen, frac=0.3):
    """Replace a random ``frac`` of each request's pages (whole pages) by HOLE; the first page of request 0 too."""
    table = table.clone()
    for r, n in enumerate(seq_lens):
        pages = -(-n // page_size)
        dead = torch.rand(pages, generator=gen) < frac
        if r == 0:
            dead[0] = True  # a hole at the start (where sinks would be)
        for p in torch.nonzero(dead).flatten().tolist():
            table[r, p * page_size : min(n, (p + 1) * page_size)] = HOLE
    return table


def _reference(q, pool, table, seq_lens, scaling, qpos, given_lse=None):
    """float64 mean attention per query head and the rows' natural log-sum-exp, holes and future keys left out.

    ``given_lse`` (``[num_reqs, num_q_heads, num_queries]``): normalise each row by it instead of its own
    log-sum-exp, as the ``row_lse`` mode does with what it is given.
    Returns ``([num_reqs, num_q_heads, max_len], [num_reqs, num_q_heads, num_queries])``.
    """
    num_reqs, num_q_heads, num_queries, _ = q.shape
    group = num_q_heads // pool.shape[1]
    out = torch.zeros(num_reqs, num_q_heads, table.shape[1], dtype=torch.float64)
    lse = torch.zeros(num_reqs, num_q_heads, num_queries, dtype=torch.float64)
    for r, n in enumerate(seq_lens):
        slots = table[r, :n].long().cpu()
        live = slots >= 0
        keys = pool.cpu().double()[slots.clamp(min=0)].transpose(0, 1).repeat_interleave(group, 0)  # [qh, n, d]
        logits = torch.einsum("hqd,hkd->hqk", q[r].cpu().double(), keys) * scaling
        ok = live[None, None, :].expand_as(logits)
        if qpos is not None:
            ok = ok & (torch.arange(n)[None, :] <= qpos[r].cpu()[:, None])[None]
        logits = logits.masked_fill(~ok, float("-inf"))
        lse[r] = torch.logsumexp(logits, -1)
        norm = lse[r] if given_lse is None else given_lse[r].cpu().double()
        out[r, :, :n] = torch.exp(logits - norm[..., None]).nan_to_num(0.0).mean(1)  # rows with no key: 0
    return out, lse


MODES = {"two_pass": {}, "grouped": {"heads_per_launch": 1, "num_programs": 7}, "forward": {"reverse_pass2": False},
         "transposed": {"transpose_pass2": True}, "lse": "lse"}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("causal", [False, True])
def test_holes_and_modes_match_reference(device, mode, page_size, causal):
    gen = torch.Generator().manual_seed(hash((mode, page_size, causal)) % 2**31)
    num_kv_heads, group, head_dim, num_queries = 2, 4, 32, 5
    seq_lens = [37, 70, 129]
    pool, table = _paged_pool(seq_lens, num_kv_heads, head_dim, torch.float32, device, gen, page_size)
    table = _punch_holes(table.cpu(), seq_lens, page_size, gen).to(device)
    q = torch.randn(len(seq_lens), num_kv_heads * group, num_queries, head_dim, generator=gen).to(device)
    qpos = torch.stack([torch.arange(n - num_queries, n) for n in seq_lens]).to(device) if causal else None
    ref, lse = _reference(q, pool, table, seq_lens, 0.2, qpos)
    opts = {"row_lse": lse.float().to(device)} if MODES[mode] == "lse" else MODES[mode]
    out = attention_mass_paged(q, pool, table, torch.tensor(seq_lens, device=device), 0.2, qpos, block_n=16, **opts)
    out = out.cpu().double()
    assert _rel_err(out, ref) < 1e-4
    assert torch.all(out.transpose(1, 2)[table.cpu() < 0] == 0)  # holes score exactly 0
    for r, n in enumerate(seq_lens):
        assert torch.all(out[r, :, n:] == 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["two_pass", "grouped", "transposed", "lse"])
def test_holes_bf16_long_many_chunks(device, mode):
    """bf16 keys, 30% holes, a thousand (CPU) or thousands (GPU) of tokens in many chunks: many programs meet at the
    atomic ticket, and the last one combines their statistics in several blocks of chunks."""
    gen = torch.Generator().manual_seed(5)
    seq_lens, head_dim, block_n, programs = ([700, 1030], 32, 16, 512) if device == "cpu" else \
        ([3001, 4096], 64, 16, 2048)
    pool, table = _paged_pool(seq_lens, 2, head_dim, torch.bfloat16, device, gen, page_size=16)
    table = _punch_holes(table.cpu(), seq_lens, 16, gen).to(device)
    q = torch.randn(2, 8, 16, head_dim, generator=gen).to(torch.bfloat16).to(device)  # 64 rows per KV head
    ref, lse = _reference(q, pool, table, seq_lens, head_dim**-0.5, None)
    opts = {"row_lse": lse.float().to(device)} if mode == "lse" else MODES[mode]
    out = attention_mass_paged(q, pool, table, torch.tensor(seq_lens, device=device), head_dim**-0.5,
                               block_n=block_n, **{"num_programs": programs, **opts})
    assert _rel_err(out.cpu().double(), ref) < RTOL[torch.bfloat16]
    assert torch.all(out.cpu().transpose(1, 2)[table.cpu() < 0] == 0)


@pytest.mark.parametrize("device", DEVICES)
def test_request_of_holes_only_scores_zero(device):
    gen = torch.Generator().manual_seed(8)
    pool, table = _paged_pool([20, 33], 1, 16, torch.float32, device, gen)
    table[0] = HOLE
    q = torch.randn(2, 2, 3, 16, generator=gen).to(device)
    out = attention_mass_paged(q, pool, table, torch.tensor([20, 33], device=device), 0.25, block_n=16)
    assert torch.all(out[0] == 0)
    assert out[1, :, :33].sum(-1).sub(1).abs().max() < 1e-4


@pytest.mark.parametrize("device", DEVICES)
def test_score_paged_with_holes_and_options(device):
    """score_paged passes kernel options through; holes score 0 before pooling, and match the holes-removed keys."""
    gen = torch.Generator().manual_seed(9)
    seq_lens = [40, 65]
    pool, table = _paged_pool(seq_lens, 2, 32, torch.float32, device, gen)
    table = _punch_holes(table.cpu(), seq_lens, 1, gen).to(device)
    q = torch.randn(2, 4, 4, 32, generator=gen).to(device)
    got = score_paged(q, pool, table, torch.tensor(seq_lens, device=device), 0.2, heads_per_launch=1, block_n=16)
    for r, n in enumerate(seq_lens):
        slots = table[r, :n].cpu()
        keys = pool.cpu()[slots[slots >= 0].long()].transpose(0, 1)
        ref = score_queries(q[r].cpu(), keys, 0.2)  # the live keys alone: same scores, holes dropped
        assert _rel_err(got[r].cpu()[:, slots >= 0], ref) < 1e-4
        assert torch.all(got[r].cpu()[:, slots < 0] == 0)


class _OpsBeforeLaunch(TorchDispatchMode):
    """Records the PyTorch ops a call runs before its first kernel launch, and the kernels it launches."""

    def __init__(self):
        super().__init__()
        self.ops, self.launches = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.launches:
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))

    def watch(self, monkeypatch):
        """Route the module's kernel launches (``kernel[grid](...)``) through this recorder."""
        for name in ("_row_stats", "_accumulate"):
            monkeypatch.setattr(paged_scoring, name, _RecordedKernel(getattr(paged_scoring, name), name, self))


class _RecordedKernel:
    def __init__(self, kernel, name, recorder):
        self.kernel, self.name, self.recorder = kernel, name, recorder

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.recorder.launches.append(self.name)
            return self.kernel[grid](*args, **kwargs)
        return launch


def _lse_layout(lse, layout):
    """The reference's ``[num_reqs, num_q_heads, num_queries]`` LSE in the dtype and memory layout of ``layout``."""
    if layout == "float32":
        return lse.float()
    if layout == "bfloat16":
        return lse.to(torch.bfloat16)
    if layout == "float64_heads_last":  # [num_reqs, num_queries, num_q_heads] storage, seen through a permute
        return lse.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "float16_every_other":  # a strided slice of a wider buffer
        wide = torch.full((*lse.shape[:2], 2 * lse.shape[2]), float("nan"), dtype=torch.float16, device=lse.device)
        wide[:, :, ::2] = lse.half()
        return wide[:, :, ::2]
    raise ValueError(layout)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout,group", [("float32", 4), ("bfloat16", 1), ("float64_heads_last", 4),
                                          ("float16_every_other", 2)])
@pytest.mark.parametrize("causal", [False, True])
def test_row_lse_read_in_kernel_any_dtype_and_layout(device, layout, group, causal):
    """The single pass reads row_lse as given (any float dtype, strides), pads the query rows of a head up to the
    tile (5 queries in 8 or 16 rows), and scores holes, a request made only of holes (lse = -inf) and positions past
    the end 0."""
    gen = torch.Generator().manual_seed(hash((layout, causal)) % 2**31)
    num_kv_heads, head_dim, num_queries = 2, 32, 5
    seq_lens = [37, 20, 70]
    pool, table = _paged_pool(seq_lens, num_kv_heads, head_dim, torch.float32, device, gen, page_size=16)
    table = _punch_holes(table.cpu(), seq_lens, 16, gen)
    table[1, :20] = HOLE
    table = table.to(device)
    q = torch.randn(len(seq_lens), num_kv_heads * group, num_queries, head_dim, generator=gen).to(device)
    qpos = torch.stack([torch.arange(n - num_queries, n) for n in seq_lens]).to(device) if causal else None
    _, lse = _reference(q, pool, table, seq_lens, 0.2, qpos)
    given = _lse_layout(lse.to(device), layout)  # built on the device: a copy there would drop the strides
    assert torch.isneginf(given[1]).all()
    ref, _ = _reference(q, pool, table, seq_lens, 0.2, qpos, given_lse=given)  # normalised by the rounded LSE
    out = attention_mass_paged(q, pool, table, torch.tensor(seq_lens, device=device), 0.2, qpos, block_n=16,
                               row_lse=given, transpose_pass2=layout == "bfloat16").cpu().double()
    assert _rel_err(out, ref) < 1e-4
    assert torch.all(out.transpose(1, 2)[table.cpu() < 0] == 0)
    for r, n in enumerate(seq_lens):
        assert torch.all(out[r, :, n:] == 0)


@pytest.mark.parametrize("device", DEVICES)
def test_row_lse_mode_is_one_launch_and_no_torch_op(device, monkeypatch):
    """With row_lse, the call allocates its output and launches pass 2 once: no PyTorch kernel (cast, copy, fill)
    runs before it, so the call is one kernel in a CUDA graph. int64 lengths and strided int64 positions are read as
    they are."""
    gen = torch.Generator().manual_seed(12)
    seq_lens = [30, 45]
    pool, table = _paged_pool(seq_lens, 2, 16, torch.float32, device, gen)
    q = torch.randn(2, 8, 3, 16, generator=gen).to(device)
    qpos = torch.stack([torch.arange(n - 3, n) for n in seq_lens]).t().contiguous().t().to(device)  # not contiguous
    lengths = torch.tensor(seq_lens, dtype=torch.int64, device=device)
    _, lse = _reference(q, pool, table, seq_lens, 0.25, qpos)
    row_lse = lse.to(device, torch.bfloat16).transpose(1, 2).contiguous().transpose(1, 2)
    recorder = _OpsBeforeLaunch()
    recorder.watch(monkeypatch)
    with recorder:
        out = attention_mass_paged(q, pool, table, lengths, 0.25, qpos, block_n=16, row_lse=row_lse)
    assert recorder.launches == ["_accumulate"]
    assert recorder.ops == ["aten.empty.memory_format"]  # the output
    ref, _ = _reference(q, pool, table, seq_lens, 0.25, qpos, given_lse=row_lse)
    assert _rel_err(out.cpu().double(), ref) < 1e-4


def test_bad_options_are_refused():
    args = (torch.zeros(1, 4, 2, 16), torch.zeros(4, 2, 16), torch.zeros(1, 4, dtype=torch.int32), torch.tensor([4]),
            1.0)
    with pytest.raises(ValueError, match="heads_per_launch"):
        attention_mass_paged(*args, heads_per_launch=3)
    with pytest.raises(ValueError, match="row_lse"):
        attention_mass_paged(*args, row_lse=torch.zeros(1, 4, 3))
    with pytest.raises(ValueError, match="row_lse must be a float tensor"):
        attention_mass_paged(*args, row_lse=torch.zeros(1, 4, 2, dtype=torch.int32))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("one_read", [False, True])
def test_fp8_keys_with_their_scale_match_the_reference_on_the_dequantised_keys(device, fp8, one_read):
    """An FP8 KV pool (SGLang stores ``k / k_scale``): the kernel widens the keys to the queries' bfloat16 and folds
    ``key_scale`` into the logit scale; the reference scores the dequantised keys ``stored * k_scale``."""
    gen = torch.Generator().manual_seed(41)
    num_kv_heads, group, head_dim, num_queries, key_scale = 2, 2, 32, 4, 0.37
    seq_lens = [45, 90]
    pool, table = _paged_pool(seq_lens, num_kv_heads, head_dim, torch.float32, device, gen)
    stored = (pool / key_scale).to(fp8)
    q = torch.randn(len(seq_lens), num_kv_heads * group, num_queries, head_dim, generator=gen)
    q = q.to(torch.bfloat16).to(device)
    qpos = torch.stack([torch.arange(n - num_queries, n) for n in seq_lens]).to(device)
    lse = None
    if one_read:
        lse = torch.stack([
            (torch.einsum("hqd,hnd->hqn", q[r].float().cpu(),
                          (stored[table[r, :n].long()].float() * key_scale).transpose(0, 1).cpu()
                          .repeat_interleave(group, 0)) * 0.2)
            .masked_fill(torch.arange(n)[None, None] > qpos[r].cpu()[None, :, None], float("-inf")).logsumexp(-1)
            for r, n in enumerate(seq_lens)]).to(device)
    out = attention_mass_paged(q, stored, table, torch.tensor(seq_lens, device=device), 0.2, qpos, block_n=32,
                               key_scale=key_scale, row_lse=lse)
    for r, n in enumerate(seq_lens):
        keys = (stored[table[r, :n].long()].float() * key_scale).transpose(0, 1).cpu()
        ref = attention_probs(q[r].float().cpu(), keys, 0.2, qpos[r].cpu()).mean(1)
        assert _rel_err(out[r, :, :n].cpu(), ref) < RTOL[torch.bfloat16]
    # the scale matters: without it the same keys score otherwise
    unscaled = attention_mass_paged(q, stored, table, torch.tensor(seq_lens, device=device), 0.2, qpos, block_n=32)
    assert _rel_err(unscaled[0, :, :45].cpu(), out[0, :, :45].cpu()) > 10 * RTOL[torch.bfloat16]
