"""Each policy's math on hand-checkable cases, and the registry's errors."""

import pytest
import torch

from sgl_evict import Budget, LayerObservation, make_policy, select_keep
from sgl_evict.policies import POLICIES
from sgl_evict.rope import apply_rope, rope_spec
from sgl_evict.scoring import attention_probs, reduce_gqa
from sgl_evict.soft_tokens import SoftTokens, model_fingerprint

D = 32


def _obs(seq_len=64, hq=4, hkv=2, window=8, seed=0, **extra):
    gen = torch.Generator().manual_seed(seed)
    return LayerObservation(
        keys=torch.randn(hkv, seq_len, D, generator=gen) * 0.3, scaling=D ** -0.5, num_q_heads=hq,
        window_queries=torch.randn(hq, window, D, generator=gen) * 0.3, **extra)


def test_registry_lists_every_policy():
    assert set(POLICIES) == {"none", "snapkv", "laq", "dapq", "laprox", "judgeq", "tova", "streaming",
                             "random"}


def test_unknown_policy_and_option_fail_clearly():
    with pytest.raises(ValueError, match="unknown policy 'h2o'; choose from: dapq"):
        make_policy("h2o")
    with pytest.raises(ValueError, match="policy 'snapkv' has no option lookahead_steps"):
        make_policy("snapkv", lookahead_steps=3)
    with pytest.raises(ValueError, match="lookahead_steps >= 1"):
        make_policy("laq", lookahead_steps=0)


def test_missing_observation_field_names_it():
    obs = _obs()
    with pytest.raises(ValueError, match="lookahead_queries"):
        make_policy("laq").score(obs)
    with pytest.raises(ValueError, match="values, o_proj_weight"):
        make_policy("laprox").score(obs)


def test_snapkv_keeps_the_key_every_window_query_attends():
    obs = _obs(seq_len=100, hq=4, hkv=1)
    needle = torch.randn(D)
    obs.keys[0, 37] = needle * 4
    obs.window_queries[:] = needle + 0.05 * torch.randn(4, 8, D)
    scores = make_policy("snapkv", pooling_kernel=1).score(obs)
    keep = select_keep(scores[None], Budget(tokens=6), sinks=1, recent=4)
    assert 37 in keep.indices[0][0].tolist()
    assert scores[0].argmax().item() == 37


def test_snapkv_window_queries_are_causal():
    obs = _obs(seq_len=20, window=4)
    probs = attention_probs(obs.window_queries, obs.keys, obs.scaling, obs.window_positions())
    assert probs[:, 0, 17:].abs().sum() == 0  # first window query sits at 16
    scores = make_policy("snapkv", pooling_kernel=1, gqa_reduce="mean").score(obs)
    assert torch.allclose(scores, reduce_gqa(probs.mean(1), 2), atol=1e-6)


def test_laq_averages_lookahead_and_window_scores():
    obs = _obs(lookahead_queries=torch.randn(4, 3, D))
    snap = make_policy("snapkv", pooling_kernel=1).score(obs)
    look = reduce_gqa(attention_probs(obs.lookahead_queries, obs.keys, obs.scaling).mean(1), 2)
    laq = make_policy("laq", pooling_kernel=1).score(obs)
    assert torch.allclose(laq, 0.5 * (snap + look), atol=1e-6)
    only = make_policy("laq", pooling_kernel=1, include_window=False).score(obs)
    assert torch.allclose(only, look, atol=1e-6)


def test_dapq_pseudo_queries_equal_rope_at_answer_positions():
    spec = rope_spec(D, 10000.0)
    seq_len, window = 50, 6
    pre = torch.randn(4, window, D, dtype=torch.float64)
    window_pos = torch.arange(seq_len - window, seq_len)
    obs = _obs(seq_len=seq_len, window=window, rope=spec)
    obs.window_queries = apply_rope(pre, window_pos, spec).float()
    policy = make_policy("dapq", offset=2)
    moved = policy.pseudo_queries(obs)
    expected = apply_rope(pre, torch.arange(window) + seq_len + 2, spec).float()
    assert torch.allclose(moved, expected, atol=1e-5)
    scores = make_policy("dapq", pooling_kernel=1).score(obs)
    assert scores.shape == (2, seq_len) and (scores[:, -window:] > 0).all()  # not causal: sees the window too


def test_laprox_equals_attention_times_projected_value_norm_summed_over_group():
    hq, hkv, L, hidden = 4, 2, 30, 24
    values, w_o = torch.randn(hkv, L, D), torch.randn(hidden, hq * D)
    obs = _obs(seq_len=L, hq=hq, hkv=hkv, values=values, o_proj_weight=w_o)
    scores = make_policy("laprox", pooling_kernel=1).score(obs)
    probs = attention_probs(obs.window_queries, obs.keys, obs.scaling, obs.window_positions()).mean(1)
    expected = torch.zeros(hkv, L)
    for h in range(hq):
        w_h = w_o[:, h * D : (h + 1) * D]
        for t in range(L):
            expected[h // 2, t] += probs[h, t] * (w_h @ values[h // 2, t]).norm()
    assert torch.allclose(scores, expected, rtol=1e-4, atol=1e-6)


def test_laprox_prefers_a_token_whose_value_the_output_projection_amplifies():
    hq, hkv, L, hidden = 2, 1, 20, 8
    obs = _obs(seq_len=L, hq=hq, hkv=hkv, values=torch.randn(hkv, L, D) * 0.01,
               o_proj_weight=torch.randn(hidden, hq * D))
    obs.keys[:] = 0  # uniform attention: only the value path can tell tokens apart
    obs.values[0, 5] = torch.randn(D) * 10
    assert make_policy("laprox", pooling_kernel=1).score(obs)[0, :12].argmax().item() == 5


def test_streaming_keeps_sinks_and_most_recent():
    obs = _obs(seq_len=40)
    keep = select_keep(make_policy("streaming").score(obs)[None], Budget(tokens=10), sinks=2, recent=4)
    assert keep.indices[0][0].tolist() == [0, 1] + list(range(32, 40))


def test_random_is_seeded():
    obs = _obs()
    a, b, c = (make_policy("random", seed=s).score(obs) for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_none_does_not_compress():
    assert make_policy("none").compresses is False
    assert all(POLICIES[n].compresses for n in POLICIES if n != "none")


def test_judgeq_scores_with_soft_token_queries(tmp_path):
    obs = _obs(soft_token_queries=torch.randn(4, 5, D))
    scores = make_policy("judgeq", pooling_kernel=1).score(obs)
    expected = reduce_gqa(attention_probs(obs.soft_token_queries, obs.keys, obs.scaling).mean(1), 2)
    assert torch.allclose(scores, expected, atol=1e-6)


def test_soft_tokens_round_trip_and_fingerprint_mismatch(tmp_path):
    cfg = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 100}
    fp = model_fingerprint(cfg)
    tokens = SoftTokens(torch.randn(16, 64), fp)
    path = tmp_path / "judgeq.safetensors"
    tokens.save(path)
    loaded = make_policy("judgeq", soft_tokens_path=str(path)).load(fp)
    assert torch.equal(loaded.embeddings, tokens.embeddings)
    other = model_fingerprint({**cfg, "hidden_size": 128})
    with pytest.raises(ValueError, match="trained for model fingerprint"):
        SoftTokens.load(path, expect_fingerprint=other)
    with pytest.raises(ValueError, match="needs a soft-token file"):
        make_policy("judgeq").load(fp)
    with pytest.raises(FileNotFoundError, match="soft-token file not found"):
        SoftTokens.load(tmp_path / "missing.safetensors")


def test_fingerprint_tells_fine_tunes_apart():
    cfg = {"model_type": "llama", "hidden_size": 8}
    emb = torch.randn(100, 8)
    assert model_fingerprint(cfg, emb) == model_fingerprint(cfg, emb.clone())
    assert model_fingerprint(cfg, emb) != model_fingerprint(cfg, emb + 0.1)
