"""TOVA in the HF harness and `sgl-evict eval`'s policy list."""

import pytest
import torch

pytest.importorskip("transformers")

from tiny_models import tiny_llama

from sgl_evict import Budget, make_policy
from sgl_evict.eval.runner import EvalConfig
from sgl_evict.harness import EvictionHarness


def test_harness_runs_tova_and_keeps_the_budget():
    ids = torch.randint(0, 200, (1, 61), generator=torch.Generator().manual_seed(1))
    harness = EvictionHarness(tiny_llama(), window=8, sinks=2)
    state = harness.prefill(ids)
    full = harness.generate(state, make_policy("none"), Budget(fraction=1.0), max_new_tokens=6).tokens
    assert harness.generate(state, make_policy("tova"), Budget(fraction=1.0), max_new_tokens=6).tokens == full
    keep = harness.select(state, make_policy("tova"), Budget(fraction=0.25), "uniform")
    assert all(int(i.shape[1]) == 16 for i in keep.indices)  # ceil(0.25 * 61)


def test_eval_accepts_tova_and_runs_it_by_default():
    assert "tova" in EvalConfig().policies
    EvalConfig(policies=["tova"]).validate()
