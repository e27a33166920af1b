"""Selector invariants: exact budgets, protected tokens, deterministic ties, granularities."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sgl_evict.layer_groups import GroupLayout
from sgl_evict.selection import Budget, carry_forward, protected_mask, select_keep, select_keep_grouped


@pytest.mark.parametrize("text,fraction,tokens", [("0.1", 0.1, None), ("10%", 0.1, None), (0.25, 0.25, None),
                                                   ("1.0", 1.0, None), ("1024", None, 1024), (64, None, 64)])
def test_budget_parse(text, fraction, tokens):
    b = Budget.parse(text)
    assert b.fraction == (pytest.approx(fraction) if fraction else None)
    assert b.tokens == tokens


@pytest.mark.parametrize("bad", ["0", "-3", "1.5", "abc", "0.0", "", "150%", True])
def test_budget_parse_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="budget"):
        Budget.parse(bad)


def test_budget_token_count():
    assert Budget(fraction=0.1).num_tokens(2048) == 205
    assert Budget(fraction=1.0).num_tokens(7) == 7
    assert Budget(tokens=100).num_tokens(50) == 50


@settings(max_examples=60, deadline=None)
@given(num_layers=st.integers(1, 3), num_heads=st.integers(1, 3), seq_len=st.integers(1, 80),
       fraction=st.floats(0.01, 1.0), sinks=st.integers(0, 6), recent=st.integers(0, 10),
       granularity=st.sampled_from(["uniform", "per_layer", "per_head"]), seed=st.integers(0, 1000))
def test_budget_exact_and_protected_kept(num_layers, num_heads, seq_len, fraction, sinks, recent, granularity, seed):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(num_layers, num_heads, seq_len, generator=gen)
    budget = Budget(fraction=fraction)
    keep = select_keep(scores, budget, sinks, recent, granularity)
    protected = protected_mask(seq_len, sinks, recent)
    expected = max(budget.num_tokens(seq_len), int(protected.sum()))
    for layer, idx in enumerate(keep.indices):
        assert idx.shape == (num_heads, expected)
        for row in idx:
            assert len(set(row.tolist())) == expected  # no duplicates
            assert torch.all(row[1:] > row[:-1])  # ascending
        assert keep.mask(layer)[:, protected].all()
    if granularity == "uniform":
        assert all(torch.equal(i, keep.indices[0]) for i in keep.indices)


def test_selects_highest_scores_per_head():
    scores = torch.zeros(1, 2, 10)
    scores[0, 0, 5] = scores[0, 0, 6] = 1.0
    scores[0, 1, 2] = scores[0, 1, 3] = 1.0
    keep = select_keep(scores, Budget(tokens=3), sinks=1, recent=0, granularity="per_head")
    assert keep.indices[0].tolist() == [[0, 5, 6], [0, 2, 3]]


def test_ties_break_towards_earlier_tokens():
    keep = select_keep(torch.ones(2, 2, 20), Budget(tokens=5), sinks=0, recent=0, granularity="uniform")
    assert keep.indices[0][0].tolist() == [0, 1, 2, 3, 4]


def test_uniform_normalises_each_layer_so_no_layer_dominates():
    scores = torch.zeros(2, 1, 6)
    scores[0, 0] = torch.tensor([0, 0, 0, 1000.0, 1000.0, 0])  # layer 0: large scale, likes 3 and 4
    scores[1, 0] = torch.tensor([0, 1.0, 0, 0, 0, 0])  # layer 1: small scale, all mass on 1
    keep = select_keep(scores, Budget(tokens=1), sinks=0, recent=0, granularity="uniform")
    # normalised: token 1 gets 0.5 from layer 1, tokens 3 and 4 get 0.25 each
    assert keep.indices[0][0].tolist() == [1]


def test_global_budget_moves_tokens_to_the_layer_with_larger_scores():
    scores = torch.zeros(2, 1, 10)
    scores[0, 0, :] = torch.arange(10.0)  # layer 0 has all the large scores
    scores[1, 0, :] = 0.001 * torch.arange(10.0)
    keep = select_keep(scores, Budget(tokens=3), sinks=1, recent=1, granularity="per_layer", global_budget=True)
    kept = [i.shape[1] for i in keep.indices]
    assert sum(kept) == 6
    assert kept == [4, 2]  # layer 1 keeps only its protected tokens
    assert keep.indices[1][0].tolist() == [0, 9]


def test_min_layer_fraction_gives_every_layer_its_best_tokens_first():
    scores = torch.zeros(2, 1, 10)
    scores[0, 0, :] = torch.arange(10.0)
    scores[1, 0, :] = 0.001 * torch.tensor([0.0, 1, 9, 2, 8, 3, 7, 4, 6, 5])
    keep = select_keep(scores, Budget(tokens=4), sinks=1, recent=1, granularity="per_layer", global_budget=True,
                       min_layer_fraction=0.75)
    kept = [i[0].tolist() for i in keep.indices]
    assert sum(map(len, kept)) == 8
    # layer 1's floor is ceil(0.75 x 4) = 3: its protected 0 and 9, then its best other token, 2
    assert kept[1] == [0, 2, 9]
    assert kept[0] == [0, 6, 7, 8, 9]  # the rest of the total goes to the best remaining pairs


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(1, 3), st.integers(8, 60), st.sampled_from([0.1, 0.3, 0.5, 1.0]),
       st.floats(0.0, 1.0), st.integers(0, 2**16))
def test_min_layer_fraction_floor_and_exact_total(num_layers, num_heads, seq_len, fraction, floor_fraction, seed):
    scores = torch.rand(num_layers, num_heads, seq_len, generator=torch.Generator().manual_seed(seed)) ** 4
    budget, sinks, recent = Budget(fraction=fraction), 2, 3
    keep = select_keep(scores, budget, sinks, recent, "per_layer", global_budget=True,
                       min_layer_fraction=floor_fraction)
    num_keep = max(budget.num_tokens(seq_len), int(protected_mask(seq_len, sinks, recent).sum()))
    floor = max(int(protected_mask(seq_len, sinks, recent).sum()), math.ceil(floor_fraction * num_keep))
    assert keep.total_kept() == num_layers * num_heads * num_keep
    for layer, idx in enumerate(keep.indices):
        assert idx.shape[1] >= min(floor, num_keep)
        # the split ranks a layer's raw scores summed over its heads
        raw = scores[layer].sum(0).view(1, 1, -1)
        best = select_keep(raw, Budget(tokens=floor), sinks, recent, "per_layer").mask(0)[0]
        assert bool(keep.mask(layer)[0][best].all()), "a layer lost one of its floor tokens"
    plain = select_keep(scores, budget, sinks, recent, "per_layer", global_budget=True)
    unfloored = select_keep(scores, budget, sinks, recent, "per_layer", global_budget=True, min_layer_fraction=0.0)
    assert all(torch.equal(a, b) for a, b in zip(plain.indices, unfloored.indices))
    full = select_keep(scores, budget, sinks, recent, "per_layer", global_budget=True, min_layer_fraction=1.0)
    assert all(i.shape[1] == num_keep for i in full.indices)


def test_budget_below_protected_keeps_exactly_protected():
    keep = select_keep(torch.rand(1, 1, 100), Budget(tokens=2), sinks=4, recent=8, granularity="uniform")
    assert keep.indices[0][0].tolist() == list(range(4)) + list(range(92, 100))


@pytest.mark.parametrize("kwargs,match", [
    ({"granularity": "per_token"}, "granularity must be one of"),
    ({"granularity": "uniform", "global_budget": True}, "global_budget"),
    ({"sinks": -1}, "sinks and recent"),
    ({"granularity": "per_layer", "min_layer_fraction": 0.5}, "min_layer_fraction applies"),
    ({"granularity": "per_layer", "global_budget": True, "min_layer_fraction": 1.5}, r"in \[0, 1\]"),
])
def test_bad_arguments_fail_clearly(kwargs, match):
    with pytest.raises(ValueError, match=match):
        select_keep(torch.rand(1, 1, 10), Budget(tokens=3), **kwargs)


def test_nan_scores_are_refused():
    s = torch.rand(1, 1, 10)
    s[0, 0, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        select_keep(s, Budget(tokens=3))


@pytest.mark.parametrize("seed", range(3))
def test_grouped_selection_is_per_layer_with_a_group_per_layer_and_uniform_with_one_group(seed):
    scores = torch.rand(4, 2, 50, generator=torch.Generator().manual_seed(seed))
    budget = Budget(tokens=12)
    for global_budget in (False, True):
        alone = select_keep_grouped(scores, [0, 1, 2, 3], budget, 2, 5, global_budget)
        per_layer = select_keep(scores, budget, 2, 5, "per_layer", global_budget)
        assert all(torch.equal(a, b) for a, b in zip(alone.indices, per_layer.indices))
    together = select_keep_grouped(scores, [0, 0, 0, 0], budget, 2, 5)
    uniform = select_keep(scores, budget, 2, 5, "uniform")
    assert all(torch.equal(a, b) for a, b in zip(together.indices, uniform.indices))


def test_grouped_selection_shares_a_keep_set_per_group_and_splits_the_global_budget_over_groups():
    scores = torch.rand(4, 1, 40, generator=torch.Generator().manual_seed(3))
    scores[2:] *= 10  # the second group's raw scores dominate the global split
    kept = select_keep_grouped(scores, [0, 0, 1, 1], Budget(tokens=10), 2, 4)
    assert torch.equal(kept.indices[0], kept.indices[1]) and torch.equal(kept.indices[2], kept.indices[3])
    assert torch.equal(kept.indices[0], select_keep(scores[:2], Budget(tokens=10), 2, 4, "uniform").indices[0])
    split = select_keep_grouped(scores, [0, 0, 1, 1], Budget(tokens=10), 2, 4, global_budget=True)
    assert split.indices[0].numel() + split.indices[2].numel() == 2 * 10  # G x budget in total
    assert split.indices[2].numel() > split.indices[0].numel() >= 6  # every group keeps its protected tokens
    with pytest.raises(ValueError, match="4 score rows for 3 group labels"):
        select_keep_grouped(scores, [0, 0, 1], Budget(tokens=10))


def test_group_layout_of_gemma3_270m():
    window = frozenset(layer for layer in range(18) if layer % 6 != 5)  # every 6th layer attends globally
    assert GroupLayout(18, 18, window).scored_groups == (5, 11, 17)
    assert len(GroupLayout(18, 18, window).window_only_groups) == 15 and not GroupLayout(18, 18, window).mixed_groups()
    six = GroupLayout(18, 6, window)  # groups of 3 layers: 0-2 sliding only, 3-5 holds layer 5, ...
    assert (six.scored_groups, six.window_only_groups, six.mixed_groups()) == ((1, 3, 5), (0, 2, 4), (1, 3, 5))
    assert [six.group_of(layer) for layer in (0, 5, 6, 17)] == [0, 1, 2, 5]
    assert GroupLayout(18, 1, window).mixed_groups() == (0,)
    assert GroupLayout(4, 2).scored_groups == (0, 1)  # no sliding-window layers: every group is scored
    for args, message in [((18, 4, window), "4 layer groups do not divide 18 layers"),
                          ((4, 2, frozenset(range(4))), "every layer has a sliding window"),
                          ((4, 2, frozenset({4})), "outside 0..3")]:
        with pytest.raises(ValueError, match=message):
            GroupLayout(*args)


def test_carry_forward_raises_each_score_to_the_best_of_the_span_before_it():
    scores = torch.tensor([0.0, 5, 1, 1, 1, 0, 0, 2, 0])
    assert carry_forward(scores, 2).tolist() == [0, 5, 5, 5, 1, 1, 1, 2, 2]
    assert carry_forward(scores, 0) is scores
    live = torch.tensor([1, 1, 1, 0, 1, 1, 1, 1, 1], dtype=torch.bool)  # position 3: a hole keeps its score
    assert carry_forward(scores, 2, live).tolist() == [0, 5, 5, 1, 1, 1, 1, 2, 2]
    batched = carry_forward(torch.stack([scores, scores.flip(0)]).view(2, 1, 9), 2)
    assert batched.shape == (2, 1, 9) and batched[1, 0].tolist() == carry_forward(scores.flip(0), 2).tolist()
    with pytest.raises(ValueError, match="continuation span must be >= 0"):
        carry_forward(scores, -1)


@pytest.mark.parametrize("granularity", ["uniform", "per_layer", "per_head"])
def test_continuation_keeps_the_tokens_after_a_peak_instead_of_scattered_ones(granularity):
    # a fact starts at 10 (what the question matched); its next tokens score low, scattered tokens a little higher
    scores = torch.full((2, 2, 40), 0.01)
    scores[..., 10] = 1.0
    scores[..., [3, 20, 30]] = 0.2
    without = select_keep(scores, Budget(tokens=4), sinks=0, recent=0, granularity=granularity)
    with_span = select_keep(scores, Budget(tokens=4), sinks=0, recent=0, granularity=granularity, continuation=3)
    assert without.indices[0][0].tolist() == [3, 10, 20, 30]
    assert with_span.indices[0][0].tolist() == [10, 11, 12, 13]
    grouped = select_keep_grouped(scores, [0, 0], Budget(tokens=4), sinks=0, recent=0, continuation=3)
    assert grouped.indices[0][0].tolist() == [10, 11, 12, 13]


def test_continuation_with_a_global_budget_carries_raw_scores():
    scores = torch.full((2, 1, 30), 0.01)
    scores[0, 0, 5] = 1.0
    kept = [set(select_keep(scores, Budget(tokens=3), sinks=0, recent=0, granularity="per_layer",
                            global_budget=True, continuation=span).indices[0][0].tolist()) for span in (0, 2)]
    assert 5 in kept[0] and not {6, 7} & kept[0]
    assert {5, 6, 7} <= kept[1]
