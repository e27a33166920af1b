"""Reference scoring math against explicit loops and hand-checkable cases."""

import math

import pytest
import torch

from sgl_evict.scoring import attention_probs, pool_scores, projected_value_norms, reduce_gqa, score_queries


def test_attention_probs_match_explicit_softmax_with_gqa_and_causal_mask():
    torch.manual_seed(0)
    q, k = torch.randn(4, 3, 8), torch.randn(2, 10, 8)
    pos = torch.tensor([7, 8, 9])
    probs = attention_probs(q, k, 0.3, pos)
    for h in range(4):
        for i in range(3):
            visible = k[h // 2, : pos[i] + 1]
            expected = torch.softmax((visible @ q[h, i]) * 0.3, dim=0)
            assert torch.allclose(probs[h, i, : pos[i] + 1], expected, atol=1e-6)
            assert probs[h, i, pos[i] + 1 :].abs().sum() == 0


def test_softcap_bounds_logits():
    q, k = torch.full((1, 1, 4), 10.0), torch.stack([torch.full((4,), 10.0), torch.zeros(4)])[None]
    capped = attention_probs(q, k, 1.0, logit_softcap=5.0)
    # logits 400 and 0 capped to ~5 and 0: softmax = sigmoid(5)
    assert capped[0, 0, 0].item() == pytest.approx(1 / (1 + math.exp(-5.0)), rel=1e-4)


def test_pooling_max_and_avg():
    s = torch.tensor([[0.0, 0.0, 5.0, 0.0, 0.0, 0.0, 1.0]])
    assert pool_scores(s, 3, "max").tolist() == [[0.0, 5.0, 5.0, 5.0, 0.0, 1.0, 1.0]]
    avg = pool_scores(s, 3, "avg")
    assert avg[0, 0].item() == pytest.approx(0.0)
    assert avg[0, 1].item() == pytest.approx(5 / 3)
    assert avg[0, 6].item() == pytest.approx(0.5)  # edge averages only real tokens
    assert torch.equal(pool_scores(s, 1), s)
    with pytest.raises(ValueError, match="odd"):
        pool_scores(s, 4)


def test_reduce_gqa_groups_consecutive_heads():
    s = torch.arange(8.0).reshape(4, 2)  # heads 0,1 -> kv 0; heads 2,3 -> kv 1
    assert reduce_gqa(s, 2, "mean").tolist() == [[1.0, 2.0], [5.0, 6.0]]
    assert reduce_gqa(s, 2, "max").tolist() == [[2.0, 3.0], [6.0, 7.0]]
    assert reduce_gqa(s, 2, "sum").tolist() == [[2.0, 4.0], [10.0, 12.0]]


def test_projected_value_norms_equal_explicit_product():
    torch.manual_seed(1)
    hq, hkv, L, d, hidden = 4, 2, 5, 3, 6
    v, w = torch.randn(hkv, L, d), torch.randn(hidden, hq * d)
    norms = projected_value_norms(v, w, hq)
    for h in range(hq):
        w_h = w[:, h * d : (h + 1) * d]
        for t in range(L):
            assert norms[h, t].item() == pytest.approx((w_h @ v[h // 2, t]).norm().item(), rel=1e-5)


def test_key_attended_by_every_query_scores_highest():
    torch.manual_seed(2)
    d = 16
    k = torch.randn(1, 40, d) * 0.1
    needle = torch.randn(d)
    k[0, 13] = needle * 3
    q = needle[None, None, :].repeat(2, 6, 1) + 0.05 * torch.randn(2, 6, d)
    scores = score_queries(q, k, d ** -0.5, pooling_kernel=1)
    assert scores.shape == (1, 40)
    assert scores[0].argmax().item() == 13
