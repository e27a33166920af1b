"""Per-group translation of logical slot ids (sgl_evict/engine/group_kv_indices.py) against a per-request,
per-group Python loop over the table."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sgl_evict.engine.group_kv_indices import group_kv_indices, translate_kv_indices
from sgl_evict.holes import HOLE


def random_table(num_groups, size_logical, seed):
    """``[G, size_logical + 2]`` int32: distinct group-slots, about a third dropped (0), last entry -1."""
    gen = torch.Generator().manual_seed(seed)
    table = (torch.randperm(num_groups * (size_logical + 1), generator=gen) + 1).view(num_groups, -1).to(torch.int32)
    table[torch.rand(table.shape, generator=gen) < 0.35] = 0
    table[:, 0] = 0  # the padding slot maps to nothing
    return torch.cat([table, torch.full((num_groups, 1), HOLE, dtype=torch.int32)], dim=1)


def test_translate_is_the_table_row_in_the_callers_dtype():
    table = random_table(3, 10, seed=0)
    loc = torch.tensor([4, 1, 9, 4], dtype=torch.int64)
    for group in range(3):
        out = translate_kv_indices(table, group, loc)
        assert out.dtype == torch.int64 and out.tolist() == [int(table[group, s]) for s in loc]
    assert translate_kv_indices(table, 1, torch.tensor([HOLE], dtype=torch.int32)).tolist() == [HOLE]


@settings(max_examples=60, deadline=None)
@given(num_groups=st.integers(1, 4), lens=st.lists(st.integers(0, 12), min_size=1, max_size=4),
       spare=st.integers(0, 5), seed=st.integers(0, 2**16))
def test_group_lists_are_the_live_group_slots_of_each_request_in_order(num_groups, lens, spare, seed):
    size_logical = 20
    table = random_table(num_groups, size_logical, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    kv_indptr = torch.zeros(len(lens) + 1, dtype=torch.int32)
    kv_indptr[1:] = torch.cumsum(torch.tensor(lens), 0)
    # SGLang's read list: logical slots, possibly over-allocated past kv_indptr[bs]; a stray hole is skipped too
    kv_indices = torch.randint(1, size_logical + 1, (sum(lens) + spare,), generator=gen)
    if sum(lens):
        kv_indices[0] = HOLE

    group_indptr, group_indices = group_kv_indices(table, kv_indptr, kv_indices)

    assert group_indptr.shape == (num_groups, len(lens) + 1) and group_indptr.dtype == torch.int32
    assert group_indices.dtype == torch.int64
    flat = []
    for group in range(num_groups):
        assert int(group_indptr[group, 0]) == len(flat)  # the group's base offset in the flat buffer
        for b in range(len(lens)):
            logical = kv_indices[kv_indptr[b]:kv_indptr[b + 1]].tolist()
            expected = [int(table[group, s]) for s in logical if int(table[group, s]) > 0]
            got = group_indices[group_indptr[group, b]:group_indptr[group, b + 1]].tolist()
            assert got == expected
            flat += expected
    assert group_indices.tolist() == flat
