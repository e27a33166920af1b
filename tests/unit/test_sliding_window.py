"""Models with sliding-window layers (Gemma 3): every keep-set keeps the last ``sliding_window`` prompt tokens.

SGLang's sliding-window attention reads the last ``window`` entries of a request's (compacted) row. With that tail
protected, the compacted row ends with exactly the logical row's last tokens, so sliding-window layers see what
they see without eviction; the HF harness reproduces the server's keep-set with ``protected_recent``.
"""

from types import SimpleNamespace

import pytest
import torch

from sgl_evict.config import EvictionConfig
from sgl_evict.engine.compact_view import compact_rows
from sgl_evict.engine.evict_batch import evict_after_prefill
from sgl_evict.engine.keep import keep_mask
from sgl_evict.engine.runtime import EngineState
from sgl_evict.holes import HOLE, whole_tail_prefix
from sgl_evict.kernels.paged_scoring import attention_mass_paged
from sgl_evict.selection import Budget

WINDOW = 24  # a model's sliding window (Gemma 3 270M: 512)


def _req(rid, pool_idx):
    return SimpleNamespace(rid=rid, req_pool_idx=pool_idx, cache_protected_len=0, inflight_middle_chunks=0,
                           is_retracted=False, finished=lambda: False,
                           sampling_params=SimpleNamespace(custom_params=None))


def _evicting_state(policy, budget, protected_recent, lens, kv_heads=1, dim=16, seed=0):
    """An EngineState after one extend forward of prompts ``lens`` whose window queries were captured."""
    state = EngineState()
    state.configure(EvictionConfig(policy=policy, budget=budget, window=4, sinks=2))
    state.protected_recent = protected_recent
    state.forward_id = 1
    state.capture.begin(1, lens, "cpu")
    q = torch.randn(sum(lens), 4 * dim, generator=torch.Generator().manual_seed(seed))
    state.capture.record(5, q, 4, dim, dim ** -0.5)  # layer 5: a full-attention layer among sliding ones
    state.capture.end()
    return state


def _evict(policy, budget, protected_recent, lens=(100, 70), seed=0):
    """Runs eviction on fresh rows of ``lens``; returns (table, logical rows before eviction)."""
    gen = torch.Generator().manual_seed(seed)
    pool = torch.randn(400, 1, 16, generator=gen)
    table = torch.zeros(2 * len(lens) + 2, 128, dtype=torch.int32)
    slots = torch.randperm(399, generator=gen) + 1
    start = 0
    for r, n in enumerate(lens):
        table[r + 1, :n] = slots[start:start + n]
        start += n
    before = table.clone()
    state = _evicting_state(policy, budget, protected_recent, list(lens), seed=seed)
    batch = SimpleNamespace(reqs=[_req(f"r{r}", r + 1) for r in range(len(lens))], decoding_reqs=None,
                            seq_lens_cpu=torch.tensor(lens))
    evict_after_prefill(batch, state, table, lambda _: pool, lambda _: None, attention_mass_paged)
    return table, before


@pytest.mark.parametrize("policy", ["snapkv", "streaming", "random"])
def test_eviction_keeps_the_sliding_window_tail_within_the_budget(policy):
    lens = (100, 70)
    table, before = _evict(policy, Budget(tokens=40), WINDOW, lens)
    for r, n in enumerate(lens):
        row = table[r + 1, :n]
        assert row[-WINDOW:].ne(HOLE).all() and torch.equal(row[-WINDOW:], before[r + 1, n - WINDOW:n])
        assert int(row.ne(HOLE).sum()) == 40  # the tail counts within the budget
        assert row[:2].ne(HOLE).all()  # sinks


def test_without_a_sliding_window_only_the_observation_window_is_protected():
    # the same eviction with protected_recent 0 drops tokens inside the last WINDOW: the protection is what keeps them
    table, _ = _evict("streaming", Budget(tokens=10), 0, (100,))
    assert table[1, 100 - WINDOW:100].eq(HOLE).any()


def test_a_tail_above_the_budget_is_kept_whole():
    """At short prompts the protected tail exceeds the budget: the request keeps sinks + window."""
    table, _ = _evict("snapkv", Budget(fraction=0.05), WINDOW, (60,))
    row = table[1, :60]
    assert int(row.ne(HOLE).sum()) == 2 + WINDOW and row[-WINDOW:].ne(HOLE).all()


def test_prompts_the_tail_covers_are_not_evicted():
    table, before = _evict("snapkv", Budget(tokens=2), WINDOW, (WINDOW + 2,))
    assert torch.equal(table, before)


@pytest.mark.parametrize("page_size", [1, 4])
def test_keep_mask_protects_the_tail_page_granular_too(page_size):
    seq_len = 61
    combined = torch.rand(seq_len, generator=torch.Generator().manual_seed(3))
    combined[-WINDOW:] = 0  # the scores alone would drop the tail
    row = torch.arange(1, seq_len + 1, dtype=torch.int32)
    config = EvictionConfig(policy="snapkv", budget=Budget(tokens=8), window=3, sinks=2)
    assert not keep_mask(combined, config, row, page_size)[-WINDOW:].all()
    assert keep_mask(combined, config, row, page_size, WINDOW)[-WINDOW:].all()


def _sliding_view(table, pool_idx, seq_len, window, shadow_offset):
    """What SGLang's sliding-window attention reads: the last ``window`` entries of the compacted row (FlashInfer's
    ``kv_start_idx = seq_len - min(seq_len, window)``, Triton's ``window_kv_start_idx``)."""
    kept = compact_rows(table, torch.tensor([pool_idx]), torch.tensor([seq_len]), seq_len, shadow_offset)
    k = int(kept[0])
    return table[pool_idx + shadow_offset, max(0, k - window):k]


@pytest.mark.parametrize("decoded", [0, 1, 7, WINDOW + 3])
def test_a_compacted_rows_tail_is_the_logical_rows_last_window(decoded):
    """After eviction and ``decoded`` decode tokens (never evicted), the sliding window of the compacted row equals
    the logical one, for every policy; without the protected tail it does not."""
    prompt = 100
    for protected in (WINDOW, 0):
        table, _ = _evict("snapkv", Budget(tokens=10), protected, (prompt,))
        table[1, prompt:prompt + decoded] = torch.arange(500, 500 + decoded, dtype=torch.int32)
        n = prompt + decoded
        same = torch.equal(_sliding_view(table, 1, n, WINDOW, shadow_offset=2), table[1, n - WINDOW:n])
        # unprotected, the view differs while the window still reaches into the evicted prompt
        assert same == (protected > 0 or decoded >= WINDOW)


@pytest.mark.parametrize("policy", ["snapkv", "streaming", "random"])
def test_harness_protected_recent_keeps_the_sliding_window(policy):
    pytest.importorskip("transformers")
    from tiny_models import tiny_gemma3

    from sgl_evict import make_policy
    from sgl_evict.harness import EvictionHarness

    model = tiny_gemma3()
    ids = torch.randint(0, 200, (1, 80), generator=torch.Generator().manual_seed(1))
    budget = Budget(tokens=12)
    plain = EvictionHarness(model, window=4, sinks=2)
    state = plain.prefill(ids)
    assert not plain.select(state, make_policy(policy), budget, "uniform").mask(0)[0][-16:].all()
    harness = EvictionHarness(model, window=4, sinks=2, protected_recent=16)
    keep = harness.select(harness.prefill(ids), make_policy(policy), budget, "uniform")
    for i in range(len(harness.layers)):
        mask = keep.mask(i)[0]
        assert mask[-16:].all() and mask[:2].all() and int(mask.sum()) == 2 + 16  # tail above the budget
    with pytest.raises(ValueError, match="protected_recent"):
        EvictionHarness(model, protected_recent=-1)


def test_whole_tail_prefix_ends_before_the_last_hole_run_its_tail_clears():
    row = torch.arange(1, 41)
    assert whole_tail_prefix(row, 8) == 40
    row[[5, 20, 21, 22]] = HOLE
    assert whole_tail_prefix(row, 8) == 40  # the last hole (22) lies before 40 - 8
    assert whole_tail_prefix(row[:30], 8) == 20  # 22 is within 8 of 30: end at the run 20..22 (5 is 15 back)
    assert whole_tail_prefix(row[:30], 15) == 5  # too close to 5 as well: end before the first hole
    assert whole_tail_prefix(row[:4], 8) == 4
