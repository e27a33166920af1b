"""Page-granular selection + compaction kernels vs their PyTorch references (CPU: interpreter; GPU: compiled)."""


import pytest
import torch

from sgl_evict.kernels.selection import compact_reference, select_pages, select_pages_reference
from sgl_evict.selection import Budget, select_keep

DEVICES = [pytest.param("cuda", marks=pytest.mark.gpu)] if torch.cuda.is_available() else ["cpu"]


def _batch(seq_lens, gen, integer_scores=False):
    max_len = max(seq_lens) + 5  # table wider than every request
    scores = torch.randint(0, 4, (len(seq_lens), max_len), generator=gen).float() if integer_scores else \
        torch.rand(len(seq_lens), max_len, generator=gen)
    for r, n in enumerate(seq_lens):
        scores[r, n:] = float("nan")  # past the end: must be ignored
    table = torch.randperm(len(seq_lens) * max_len, generator=gen)[: len(seq_lens) * max_len]
    return scores, table.view(len(seq_lens), max_len).to(torch.int32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("integer_scores", [False, True])  # integer scores: many ties, broken towards earlier pages
def test_select_pages_matches_reference(device, page_size, integer_scores):
    gen = torch.Generator().manual_seed(page_size * 2 + integer_scores)
    seq_lens = [37, 70, 129, 3]
    scores, table = _batch(seq_lens, gen, integer_scores)
    budget = torch.tensor([10, 33, 64, 1])
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    got = select_pages(scores.to(device), table.to(device), lens.to(device), budget.to(device), page_size,
                       sinks=4, recent=8, block=32)
    want = select_pages_reference(scores, lens, budget, page_size, sinks=4, recent=8)
    assert torch.equal(got.keep_mask.cpu(), want)
    want_table, want_lens = compact_reference(want, table)
    assert torch.equal(got.req_to_token.cpu(), want_table)  # every entry written: kept slots, then -1
    assert torch.equal(got.kept_lens.cpu(), want_lens)
    for r, n in enumerate(seq_lens):  # whole pages only, never past the end
        pages = want[r, :n].split(page_size)
        assert all(bool(p.all()) or not bool(p.any()) for p in pages)
        assert not want[r, n:].any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sinks,recent", [(4, 8), (0, 0), (50, 50)])
def test_page_size_one_equals_select_keep(device, sinks, recent):
    gen = torch.Generator().manual_seed(7 + sinks)
    seq_lens = [61, 90]
    scores, table = _batch(seq_lens, gen, integer_scores=True)
    budget = 20
    got = select_pages(scores.to(device), table.to(device), torch.tensor(seq_lens).to(device),
                       torch.tensor([budget] * 2).to(device), 1, sinks, recent, block=16)
    for r, n in enumerate(seq_lens):
        keep = select_keep(scores[r, :n][None, None], Budget(tokens=budget), sinks, recent, "per_head")
        assert torch.equal(got.keep_mask[r, :n].cpu(), keep.mask(0)[0])


def test_bad_inputs_are_refused():
    table = torch.zeros(1, 8, dtype=torch.int32)
    with pytest.raises(ValueError, match="NaN or inf"):
        select_pages(torch.full((1, 8), float("nan")), table, torch.tensor([8]), torch.tensor([2]))
    with pytest.raises(ValueError, match="exceeds max_len"):
        select_pages(torch.zeros(1, 8), table, torch.tensor([9]), torch.tensor([2]))
    with pytest.raises(ValueError, match="num_reqs, max_len"):
        select_pages(torch.zeros(8), table, torch.tensor([8]), torch.tensor([2]))
