"""Tests of the kvpress peer; they import kvpress, so they run in bench/peers/kvpress/.venv (run.sh runs them),
never in the project's suite. Most use a tiny random Gemma 3 (6 layers, full attention at 2 and 5, a 16-token
sliding window) built from a config: nothing is downloaded. Those marked ``real`` load the harness's Gemma 3
270M checkpoint and are skipped when it is absent."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("kvpress")

from bench.peers.kvpress import methods as M  # noqa: E402
from bench.peers.kvpress.adapter import (BoundRotary, full_attention_layers, gemma3_text, kept_per_layer,  # noqa: E402
                                         language_model, record, replay)
from bench.peers.kvpress.metrics import make_reference, score  # noqa: E402
from bench.peers.kvpress.model import DEFAULT_MODEL  # noqa: E402

FULL = "full_attention"
SLIDE = "sliding_attention"
class DigitTokenizer:
    """Decodes token ids as their digits: enough for the metric code on the tiny model's made-up vocabulary."""

    @staticmethod
    def decode(tokens, skip_special_tokens=True):
        return " ".join(str(t) for t in tokens)


PROMPT = 128  # tokens: longer than SnapKVPress's default window (64) and the tiny model's sliding window (16)


def tiny_model():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                              num_attention_heads=4, num_key_value_heads=1, head_dim=32, sliding_window=16,
                              layer_types=[SLIDE, SLIDE, FULL, SLIDE, SLIDE, FULL], query_pre_attn_scalar=32,
                              max_position_embeddings=1024)
    torch.manual_seed(0)
    return Gemma3ForCausalLM(config).eval()


def prompt_ids(n: int = PROMPT) -> torch.Tensor:
    return torch.randint(4, 300, (1, n), generator=torch.Generator().manual_seed(1))


def prefill(model, ids, cm=None):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        if cm is None:
            model.model(input_ids=ids, past_key_values=cache, use_cache=True)
        else:
            with cm:
                model.model(input_ids=ids, past_key_values=cache, use_cache=True)
    return cache


def test_full_attention_layers_of_the_tiny_model():
    assert full_attention_layers(tiny_model()) == [2, 5]


def test_full_attention_layers_of_gemma3_270m_config():
    path = DEFAULT_MODEL / "config.json"
    if not path.is_file():
        pytest.skip("no Gemma 3 270M checkpoint")
    types = json.loads(path.read_text())["layer_types"]
    assert [i for i, t in enumerate(types) if t == FULL] == [5, 11, 17]


def test_bound_rotary_gives_the_layer_types_rope():
    model = tiny_model()
    rotary = language_model(model).rotary_emb
    x, pos = torch.zeros(1, 8, 32), torch.arange(100, 108)[None]
    cos, sin = BoundRotary(rotary, FULL)(x, pos)
    want = rotary(x, pos, layer_type=FULL)
    assert torch.equal(cos, want[0]) and torch.equal(sin, want[1])
    assert not torch.allclose(cos, rotary(x, pos, layer_type=SLIDE)[0])  # theta 1e6 vs 1e4: not the same RoPE
    assert torch.equal(BoundRotary(rotary, FULL).inv_freq, rotary.full_attention_inv_freq)


def test_expected_attention_crashes_out_of_the_box_and_runs_through_the_adapter():
    """kvpress binds the shared rotary module and calls it without a layer type; if kvpress fixes this, this test
    fails and docs/kvpress.md must say so."""
    from kvpress import ExpectedAttentionPress

    model, ids = tiny_model(), prompt_ids()
    with pytest.raises((AttributeError, TypeError)):
        prefill(model, ids, ExpectedAttentionPress(compression_ratio=0.5)(model))
    cache = prefill(model, ids, gemma3_text(ExpectedAttentionPress(compression_ratio=0.5), model))
    assert kept_per_layer(cache, [2, 5]) == [64, 64]


def test_out_of_the_box_cuts_sliding_layers_the_adapter_does_not():
    from kvpress import SnapKVPress

    model, ids = tiny_model(), prompt_ids()
    plain = prefill(model, ids)
    box = prefill(model, ids, SnapKVPress(compression_ratio=0.5, window_size=8)(model))
    ours = prefill(model, ids, gemma3_text(SnapKVPress(compression_ratio=0.5, window_size=8), model))
    sliding = [0, 1, 3, 4]
    assert kept_per_layer(plain, sliding) == [15] * 4  # a sliding layer caches its last window - 1 tokens
    assert kept_per_layer(box, sliding) == [7] * 4  # kvpress on Gemma3ForCausalLM halves them too
    assert kept_per_layer(ours, [2, 5]) == [64, 64] and kept_per_layer(box, [2, 5]) == [64, 64]
    for i in sliding:  # the adapter leaves the sliding layers exactly as without a press
        assert torch.equal(ours.layers[i].keys, plain.layers[i].keys)
        assert torch.equal(ours.layers[i].values, plain.layers[i].values)


def test_the_adapter_leaves_the_model_as_it_found_it():
    from kvpress import ExpectedAttentionPress

    model = tiny_model()
    names = set(dict(model.named_modules()))
    attn = language_model(model).layers[5].self_attn
    prefill(model, prompt_ids(), gemma3_text(ExpectedAttentionPress(compression_ratio=0.5), model))
    assert set(dict(model.named_modules())) == names  # no rotary module registered under the layers
    assert "rotary_emb" not in attn.__dict__ and not attn._forward_hooks
    with record(model) as rec:
        prefill(model, prompt_ids())
    assert not attn._forward_hooks and sorted(rec.kwargs) == [2, 5]


@pytest.mark.parametrize("name", list(M.press_factories()))
def test_replay_gives_the_live_hooks_caches(name):
    """The comparison replays a press's hook on recorded inputs; it must equal running the hook live."""
    model, ids = tiny_model(), prompt_ids()
    factory = M.press_factories()[name]
    live = prefill(model, ids, gemma3_text(factory(0.7), model))
    with record(model) as rec:
        cache = prefill(model, ids)
    replay(factory(0.7), model, rec, cache)
    for i in range(6):
        assert torch.equal(cache.layers[i].keys, live.layers[i].keys), (name, i)
        assert torch.equal(cache.layers[i].values, live.layers[i].values), (name, i)
    if name != "PyramidKVPress":  # PyramidKV spreads the budget unevenly over the layers on purpose
        assert kept_per_layer(cache, [2, 5]) == [int(PROMPT * 0.3)] * 2


@pytest.mark.parametrize("length", [97, 1000, 1997, 4070])
def test_press_ratio_keeps_exactly_n(length):
    from kvpress.utils import compute_n_kept

    for n in range(1, length, 7):
        assert compute_n_kept(length, M.press_ratio(n, length)) == n


def test_recover_indices_finds_the_gathered_positions():
    keys = torch.randn(50, 16)
    idx = torch.tensor([0, 3, 9, 49])
    assert torch.equal(M.recover_indices(keys, keys[idx]), idx)
    with pytest.raises(ValueError):
        M.recover_indices(keys, keys[idx] + 1e-3)


def test_matched_snapkv_keeps_what_snapkvpress_keeps():
    """Our snapkv set up as SnapKVPress (window 64, average pooling 5, no sinks, mean over the GQA group, one
    keep-set per layer) against the press, on the tiny model: the keep-sets may differ only at the pooling's edges
    (kvpress pads with zeros and pools the prefix alone; we pool the whole prompt without padding)."""
    from kvpress import SnapKVPress

    from sgl_evict.harness import EvictionHarness

    # the budget must exceed the window: below it kvpress keeps only part of its window, we keep all of it
    model, length, n = tiny_model(), 256, 100
    harness = EvictionHarness(model, window=64, sinks=0)
    with record(model) as rec:
        state = harness.prefill(prompt_ids(length))
    cache = M.press_cache(SnapKVPress(compression_ratio=M.press_ratio(n, length)), model, harness, state, rec)
    policy = M.make_ours("snapkv", pooling_kernel=5, pooling_mode="avg", gqa_reduce="mean")
    _, keep = M.ours_cache(harness, state, policy, n, "per_layer", window=64, sinks=0)
    for j, layer in enumerate(harness.layers):
        theirs = M.recover_indices(state.cache.layers[layer].keys[0, 0], cache.layers[layer].keys[0, 0])
        assert M.overlap(keep.indices[j][0], theirs) >= 0.9, layer


def test_metrics_of_the_full_cache_are_perfect_and_an_empty_one_is_not():
    from sgl_evict.harness import EvictionHarness

    model, ids = tiny_model(), prompt_ids()
    harness = EvictionHarness(model)
    with torch.inference_mode():
        state = harness.prefill(ids)
        ref = make_reference(harness, state.cache, state.last_logits, PROMPT, horizon=16)
        same = score(harness, DigitTokenizer(), ref, state.cache, state.last_logits, (), 4, ())
        assert (same.first_agree, same.top1_1_8, same.top1_9) == (1.0, 1.0, 1.0)
        assert same.kl_1_8 < 1e-9 and same.kl_9 < 1e-9
        keep = M.keep_count(0.1, PROMPT)
        cache, _ = M.ours_cache(harness, state, M.make_ours("streaming"), keep)
        worse = score(harness, DigitTokenizer(), ref, cache, state.last_logits, (), 4, ())
        assert worse.kl_9 > 1e-4  # a tenth of the cache changes the distributions: the metric can see it
