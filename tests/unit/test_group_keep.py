"""Per-group keep-sets for the layered pool (sgl_evict/engine/group_keep.py) against the shared selector on random
scores: G = 1 is the engine's uniform keep mask, G = L the harness's per_layer selection (laprox: its global
split), any G the per_layer selection over the group's (layer, head) rows; tensor-parallel partial sums select
the same sets."""

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sgl_evict.config import EvictionConfig
from sgl_evict.engine.group_keep import group_keep_masks, group_scores
from sgl_evict.engine.keep import combined_scores, keep_mask
from sgl_evict.holes import HOLE
from sgl_evict.selection import Budget, protected_mask, select_keep, select_keep_grouped

SINKS, WINDOW = 2, 4


def random_scores(num_layers, num_heads, seq_len, seed):
    # a power spreads the scores so layers differ in scale, as real attention masses do
    return torch.rand(num_layers, num_heads, seq_len, generator=torch.Generator().manual_seed(seed)) ** 3


def config_of(fraction):
    return EvictionConfig(policy="snapkv", budget=Budget(fraction=fraction), window=WINDOW, sinks=SINKS)


def harness_masks(scores, budget, **kwargs):
    """``[layers, seq_len]`` masks of select_keep's per_layer selection (row 0: the heads share it)."""
    kept = select_keep(scores, budget, SINKS, WINDOW, "per_layer", **kwargs)
    return torch.stack([kept.mask(layer)[0] for layer in range(scores.shape[0])])


cases = given(st.sampled_from([1, 2, 4, 6]), st.integers(1, 3), st.integers(12, 80),
              st.sampled_from([0.05, 0.2, 0.5, 1.0]), st.integers(0, 2**16))
SETTINGS = settings(max_examples=40, deadline=None)


@SETTINGS
@cases
def test_one_group_is_the_engines_uniform_keep_mask(num_layers, num_heads, seq_len, fraction, seed):
    scores, config = random_scores(num_layers, num_heads, seq_len, seed), config_of(fraction)
    row = torch.arange(1, seq_len + 1, dtype=torch.int32)
    masks = group_keep_masks(group_scores(scores, 1, False), config, row)
    assert masks.shape == (1, seq_len)
    assert torch.equal(masks[0], keep_mask(combined_scores(scores), config, row))


@SETTINGS
@cases
def test_one_group_per_layer_is_the_harness_per_layer_selection(num_layers, num_heads, seq_len, fraction, seed):
    scores, config = random_scores(num_layers, num_heads, seq_len, seed), config_of(fraction)
    row = torch.arange(1, seq_len + 1, dtype=torch.int32)
    masks = group_keep_masks(group_scores(scores, num_layers, False), config, row)
    assert torch.equal(masks, harness_masks(scores, config.budget))
    # laprox: the global split over layers, unfloored, is the harness's
    masks = group_keep_masks(group_scores(scores, num_layers, True), config, row, global_split=True)
    assert torch.equal(masks, harness_masks(scores, config.budget, global_budget=True))


@SETTINGS
@cases
def test_a_group_selects_over_its_layers_rows_as_per_layer_does(num_layers, num_heads, seq_len, fraction, seed):
    scores, config = random_scores(num_layers, num_heads, seq_len, seed), config_of(fraction)
    row = torch.arange(1, seq_len + 1, dtype=torch.int32)
    for groups in [g for g in (1, 2, 3, num_layers) if num_layers % g == 0]:
        masks = group_keep_masks(group_scores(scores, groups, False), config, row)
        # per_layer normalises each row and averages a layer's heads: a group's layers are its "heads" here
        folded = scores.reshape(groups, num_layers // groups * num_heads, seq_len)
        assert torch.equal(masks, harness_masks(folded, config.budget))
        num_keep = max(config.budget.num_tokens(seq_len), int(protected_mask(seq_len, SINKS, WINDOW).sum()))
        assert masks.sum(1).tolist() == [num_keep] * groups


@SETTINGS
@given(st.sampled_from([(2, 2), (4, 2), (6, 3), (4, 4)]), st.integers(20, 80), st.sampled_from([0.1, 0.3]),
       st.floats(0.0, 1.0), st.integers(0, 2**16))
def test_global_split_gives_each_group_its_floor_and_the_exact_total(layers_groups, seq_len, fraction, floor_fraction,
                                                                      seed):
    num_layers, groups = layers_groups
    scores, config = random_scores(num_layers, 2, seq_len, seed), config_of(fraction)
    row = torch.arange(1, seq_len + 1, dtype=torch.int32)
    combined = group_scores(scores, groups, True)
    masks = group_keep_masks(combined, config, row, global_split=True, min_group_fraction=floor_fraction)
    protected = protected_mask(seq_len, SINKS, WINDOW)
    num_keep = max(config.budget.num_tokens(seq_len), int(protected.sum()))
    floor = max(int(protected.sum()), math.ceil(floor_fraction * num_keep))
    assert int(masks.sum()) == groups * num_keep
    assert masks[:, protected].all()
    for g in range(groups):
        best = harness_masks(combined[g].view(1, 1, -1), Budget(tokens=floor))[0]
        assert masks[g][best].all(), "a group lost one of its floor tokens"
    # group scores are sums over the group's layers: the split ranks those sums
    assert torch.equal(combined, scores.view(groups, -1, seq_len).sum(1))


@pytest.mark.parametrize("comparable", [False, True])
def test_tensor_parallel_partial_sums_select_the_same_sets(comparable):
    num_layers, num_heads, seq_len, groups = 4, 4, 64, 2
    scores = random_scores(num_layers, num_heads, seq_len, 3)
    config, row = config_of(0.2), torch.arange(1, seq_len + 1, dtype=torch.int32)
    whole = group_scores(scores, groups, comparable)
    # two ranks, each holding half the KV heads; the all-reduce is a sum
    reduced = sum(group_scores(scores[:, rank * 2:(rank + 1) * 2], groups, comparable) for rank in range(2))
    assert torch.allclose(reduced, whole, rtol=1e-5, atol=1e-7)
    kwargs = dict(global_split=True, min_group_fraction=0.25) if comparable else {}
    assert torch.equal(group_keep_masks(reduced, config, row, **kwargs), group_keep_masks(whole, config, row, **kwargs))


def test_page_granular_groups_keep_whole_pages_each_under_its_own_scores():
    page, seq_len = 4, 64
    scores = random_scores(4, 2, seq_len, 9)
    config, row = config_of(0.25), torch.arange(1, seq_len + 1, dtype=torch.int32)
    combined = group_scores(scores, 2, False)
    masks = group_keep_masks(combined, config, row, page)
    pages = masks.view(2, -1, page)
    assert (pages.all(2) | ~pages.any(2)).all(), "a group kept part of a page"
    assert pages.all(2).sum(1).tolist() == [4, 4]  # 16 tokens in pages of 4
    assert not torch.equal(masks[0], masks[1])  # the groups chose by their own scores
    for g in range(2):
        assert torch.equal(masks[g], keep_mask(combined[g], config, row, page))


def test_bad_groupings_are_refused():
    scores = random_scores(4, 1, 20, 0)
    row = torch.arange(1, 21, dtype=torch.int32)
    with pytest.raises(ValueError, match="do not divide"):
        group_scores(scores, 3, False)
    with pytest.raises(ValueError, match="global split only"):
        group_keep_masks(group_scores(scores, 2, False), config_of(0.2), row, min_group_fraction=0.5)
    with pytest.raises(ValueError, match="token-granular"):
        group_keep_masks(group_scores(scores, 2, True), config_of(0.2), row, page_size=4, global_split=True)


@pytest.mark.parametrize("global_split", [False, True])
def test_groups_carry_scores_forward_as_the_harness_does_and_never_onto_holes(global_split):
    scores = random_scores(4, 2, 60, 11)
    scores[0, :, 20] = scores[2, :, 20] = 5.0
    config = dataclasses.replace(config_of(0.2), policy="laprox", continuation=4)
    row = torch.arange(1, 61, dtype=torch.int32)
    combined = group_scores(scores, 2, global_split)
    masks = group_keep_masks(combined, config, row, global_split=global_split)
    expected = select_keep_grouped(scores, [0, 0, 1, 1], config.budget, SINKS, WINDOW, global_split,
                                   continuation=4)
    assert torch.equal(masks, torch.stack([expected.mask(0)[0], expected.mask(2)[0]]))
    assert masks[:, 20:25].all()
    row[21:23] = HOLE
    holed = group_keep_masks(combined * (row != HOLE), config, row, global_split=global_split)
    assert not holed[:, 21:23].any() and holed[:, 23:25].all()
