"""Harness on tiny random-weight models: cache lengths, exactness at 100%, logical positions, lookahead, soft tokens."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tiny_models import tiny_gemma3, tiny_llama

from sgl_evict import Budget, make_policy
from sgl_evict.harness import EvictionHarness
from sgl_evict.selection import KeepSet, select_keep
from sgl_evict.soft_tokens import SoftTokens

POLICIES = ["snapkv", "laq", "dapq", "laprox", "streaming", "random"]


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def setup(request):
    model = tiny_llama() if request.param == "llama" else tiny_gemma3()
    ids = torch.randint(0, 200, (1, 61), generator=torch.Generator().manual_seed(1))
    # the reference runs on the model's own sdpa attention, before the harness swaps in its attention function
    model.hf_greedy = model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:].tolist()
    harness = EvictionHarness(model, window=8, sinks=2)
    return request.param, model, ids, harness, harness.prefill(ids)


def test_full_cache_decode_equals_hf_generate(setup):
    _, model, ids, harness, state = setup
    expected = model.hf_greedy
    assert model.config._attn_implementation == "sgl_evict_capture"
    ours = harness.generate(state, make_policy("none"), Budget(fraction=1.0), max_new_tokens=12).tokens
    assert ours == expected


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("granularity", ["uniform", "per_layer", "per_head"])
def test_full_budget_reproduces_full_cache_exactly(setup, policy, granularity):
    _, _, _, harness, state = setup
    full = harness.generate(state, make_policy("none"), Budget(fraction=1.0), max_new_tokens=8).tokens
    res = harness.generate(state, make_policy(policy), Budget(fraction=1.0), granularity, max_new_tokens=8)
    assert res.tokens == full
    fid = harness.fidelity(state, make_policy(policy), Budget(fraction=1.0), granularity, torch.tensor([full]))
    assert fid.top1_agreement == 1.0 and fid.kl < 1e-6


@pytest.mark.parametrize("policy", POLICIES)
def test_compressed_cache_has_promised_length_and_sliding_layers_untouched(setup, policy):
    name, _, ids, harness, state = setup
    budget = Budget(fraction=0.25)
    keep = harness.select(state, make_policy(policy), budget, "uniform")
    cache = harness._compressed_cache(state, keep)
    expected = budget.num_tokens(ids.shape[1])
    for layer, entry in enumerate(cache.layers):
        if layer in harness.layers:
            assert entry.keys.shape[2] == expected and entry.values.shape[2] == expected
        else:
            assert entry.keys is state.cache.layers[layer].keys  # sliding layer shares the prefill tensors
    assert state.cache.layers[harness.layers[0]].keys.shape[2] == ids.shape[1]  # prefill state not mutated
    if name == "gemma3":
        assert harness.layers == [1, 3]


def test_kept_keys_are_the_selected_ones(setup):
    _, _, _, harness, state = setup
    keep = harness.select(state, make_policy("snapkv"), Budget(tokens=20), "per_head")
    cache = harness._compressed_cache(state, keep)
    layer = harness.layers[0]
    full_keys = state.cache.layers[layer].keys[0]
    for head in range(full_keys.shape[0]):
        assert torch.equal(cache.layers[layer].keys[0, head], full_keys[head, keep.indices[0][head]])


def test_positions_stay_logical(setup):
    """Decoding continues at the full prompt length: the compressed length as position changes the outputs."""
    _, _, ids, harness, state = setup
    policy, budget = make_policy("snapkv"), Budget(fraction=0.3)
    keep = harness.select(state, policy, budget, "uniform")
    first = int(state.last_logits.argmax())
    logical = harness._extend(harness._compressed_cache(state, keep), torch.tensor([ids.shape[1]]),
                              input_ids=torch.tensor([[first]]))
    shifted = harness._extend(harness._compressed_cache(state, keep), torch.tensor([keep.indices[0].shape[1]]),
                              input_ids=torch.tensor([[first]]))
    assert not torch.allclose(logical, shifted)
    res = harness.generate(state, policy, budget, max_new_tokens=2)
    assert res.tokens[1] == int(logical[-1].argmax())


def test_laq_scores_with_lookahead_queries(setup):
    _, _, ids, harness, state = setup
    policy = make_policy("laq", lookahead_steps=3)
    obs = harness.observations(state, policy, Budget(fraction=0.3), "uniform")
    num_q_heads, head_dim = state.window_queries[harness.layers[0]].shape[::2]
    for o in obs:
        assert o.lookahead_queries.shape == (num_q_heads, 3, head_dim)
        assert o.window_queries.shape == (num_q_heads, 8, head_dim)
    assert harness.select(state, policy, Budget(fraction=0.3), "uniform").indices[0].shape[1] == 19


def test_laq_with_a_reserve_chooses_among_the_snapkv_best_only(setup):
    _, _, _, harness, state = setup
    budget = Budget(fraction=0.2)
    laq = harness.select(state, make_policy("laq", lookahead_steps=3), budget, "uniform")
    reserved = harness.select(state, make_policy("laq", lookahead_steps=3, reserve=1.5), budget, "uniform")
    wide = harness.select(state, make_policy("snapkv"), budget.scaled(1.5), "uniform")
    for layer in range(len(harness.layers)):
        assert reserved.indices[layer].shape == laq.indices[layer].shape
        assert not (reserved.mask(layer) & ~wide.mask(layer)).any()
    covering = harness.select(state, make_policy("laq", lookahead_steps=3, reserve=5.0), budget, "uniform")
    assert all(torch.equal(a, b) for a, b in zip(covering.indices, laq.indices))  # 5 x 20%: every token
    with pytest.raises(ValueError, match="reserve 0 \\(off\\) or at least 1"):
        make_policy("laq", reserve=0.5)


@pytest.mark.parametrize("granularity", ["uniform", "per_layer"])
def test_a_policys_continuation_reaches_the_selection(setup, granularity):
    _, _, _, harness, state = setup
    budget, policy = Budget(fraction=0.2), make_policy("laprox", continuation=3)
    scores = torch.stack([policy.score(o) for o in harness.observations(state, policy, budget, granularity)])
    recent = max(harness.window, harness.protected_recent)
    expected = select_keep(scores, budget, harness.sinks, recent, granularity, granularity == "per_layer",
                           continuation=3)
    got = harness.select(state, policy, budget, granularity)
    assert all(torch.equal(a, b) for a, b in zip(got.indices, expected.indices))
    plain = harness.select(state, make_policy("laprox"), budget, "uniform")
    carried = harness.select(state, policy, budget, "uniform")
    assert not torch.equal(carried.indices[0], plain.indices[0])


def test_laq_with_its_own_greedy_tokens_forced_keeps_the_same_set(setup):
    """Teacher-forcing the lookahead (one causal extend) equals decoding it step by step; other tokens change it."""
    _, _, _, harness, state = setup
    budget = Budget(fraction=0.3)
    greedy = make_policy("laq", lookahead_steps=4)
    own = harness.generate(state, make_policy("snapkv"), budget, max_new_tokens=4).tokens  # the steps' tokens
    forced = make_policy("laq", lookahead_steps=4, lookahead_tokens=tuple(own))
    other = make_policy("laq", lookahead_steps=4, lookahead_tokens=tuple((t + 97) % 200 for t in own))
    keep = harness.select(state, greedy, budget, "uniform").indices
    assert all(torch.equal(a, b) for a, b in zip(keep, harness.select(state, forced, budget, "uniform").indices))
    obs_greedy = harness.observations(state, greedy, budget, "uniform")
    obs_other = harness.observations(state, other, budget, "uniform")
    assert not torch.allclose(obs_greedy[0].lookahead_queries, obs_other[0].lookahead_queries)
    with pytest.raises(ValueError, match="at least lookahead_steps=4 lookahead_tokens"):
        make_policy("laq", lookahead_steps=4, lookahead_tokens=(1, 2))


def test_judgeq_soft_tokens(setup, tmp_path):
    _, model, _, harness, state = setup
    path = tmp_path / "soft.safetensors"
    SoftTokens(torch.randn(5, model.config.hidden_size), harness.fingerprint()).save(path)
    policy = make_policy("judgeq", soft_tokens_path=str(path))
    obs = harness.observations(state, policy, Budget(fraction=0.3), "uniform")
    assert obs[0].soft_token_queries.shape[1] == 5
    res = harness.generate(state, policy, Budget(fraction=0.3), max_new_tokens=3)
    assert len(res.tokens) == 3
    SoftTokens(torch.randn(5, model.config.hidden_size), "0123456789abcdef").save(path)
    with pytest.raises(ValueError, match="trained for model fingerprint"):
        harness.generate(state, make_policy("judgeq", soft_tokens_path=str(path)), Budget(fraction=0.3))
    SoftTokens(torch.randn(5, model.config.hidden_size + 1), harness.fingerprint()).save(path)
    with pytest.raises(ValueError, match="soft tokens must be"):
        harness.generate(state, make_policy("judgeq", soft_tokens_path=str(path)), Budget(fraction=0.3))


def test_laprox_global_budget_gives_per_layer_lengths(setup):
    _, _, ids, harness, state = setup
    res = harness.generate(state, make_policy("laprox"), Budget(fraction=0.3), "per_layer", max_new_tokens=4)
    assert sum(res.kept_tokens) == len(harness.layers) * Budget(fraction=0.3).num_tokens(ids.shape[1])
    assert len(res.tokens) == 4


def test_eos_stops_generation(setup):
    _, _, _, harness, state = setup
    full = harness.generate(state, make_policy("none"), Budget(fraction=1.0), max_new_tokens=6).tokens
    stopped = harness.generate(state, make_policy("none"), Budget(fraction=1.0), max_new_tokens=6,
                               eos_token_ids=(full[2],))
    assert stopped.tokens == full[: full.index(full[2]) + 1]


def test_bad_input_is_a_clear_error(setup):
    _, _, _, harness, _ = setup
    with pytest.raises(ValueError, match=r"input_ids must be \[1, seq_len\]"):
        harness.prefill(torch.zeros(2, 10, dtype=torch.long))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("build", [tiny_llama, tiny_gemma3])
def test_on_gpu_full_cache_equals_generate_and_full_budget_is_exact(build):
    model = build().cuda()
    ids = torch.randint(0, 200, (1, 61), generator=torch.Generator().manual_seed(1)).cuda()
    expected = model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:].tolist()
    harness = EvictionHarness(model, window=8, sinks=2, device="cuda")
    state = harness.prefill(ids)
    full = harness.generate(state, make_policy("none"), Budget(fraction=1.0), max_new_tokens=8).tokens
    assert full == expected
    for policy in POLICIES:
        assert harness.generate(state, make_policy(policy), Budget(fraction=1.0), max_new_tokens=8).tokens == full
    half = harness.generate(state, make_policy("laq"), Budget(fraction=0.5), max_new_tokens=8)
    assert half.kept_tokens == [Budget(fraction=0.5).num_tokens(ids.shape[1])] * len(harness.layers)


def test_token_logprobs_score_the_greedy_answer_under_the_compressed_cache(setup):
    _, _, _, harness, state = setup
    budget = Budget(fraction=0.3)
    answer = harness.generate(state, make_policy("snapkv"), budget, max_new_tokens=6).tokens
    logp = harness.token_logprobs(state, make_policy("snapkv"), budget, "uniform", answer)
    assert len(logp) == len(answer) and all(lp <= 0 for lp in logp)
    # causal: scoring a prefix of the answer gives the same numbers
    step = harness.token_logprobs(state, make_policy("snapkv"), budget, "uniform", answer[:3])
    assert step == pytest.approx(logp[:3], abs=1e-5)
    full = harness.token_logprobs(state, make_policy("none"), Budget(fraction=1.0), "uniform", answer)
    assert full[0] == pytest.approx(logp[0])  # the first token comes before eviction
    assert full[1:] != pytest.approx(logp[1:], abs=1e-3)  # later ones see the compressed cache


def test_token_logprobs_under_a_given_keep_set_are_those_of_the_cache_it_keeps(setup):
    _, _, _, harness, state = setup
    budget = Budget(fraction=0.3)
    answer = harness.generate(state, make_policy("snapkv"), budget, max_new_tokens=6).tokens
    chosen = harness.select(state, make_policy("snapkv"), budget, "uniform")
    heads = chosen.indices[0].shape[0]
    logged = KeepSet.uniform(chosen.indices[0][0].tolist()[::-1], len(harness.layers), heads, state.seq_len)
    ours = harness.token_logprobs(state, make_policy("snapkv"), budget, "uniform", answer)
    none = make_policy("none")  # the keep-set decides, not the policy
    assert harness.token_logprobs(state, none, budget, "uniform", answer, keep=logged) == pytest.approx(ours)
    other = KeepSet.uniform(range(state.seq_len - len(logged.indices[0][0]), state.seq_len), len(harness.layers),
                            heads, state.seq_len)
    assert harness.token_logprobs(state, none, budget, "uniform", answer, keep=other)[1:] != pytest.approx(
        ours[1:], abs=1e-3)
    with pytest.raises(ValueError, match="distinct"):
        KeepSet.uniform([3, 3], 1, 1, state.seq_len)


def test_layer_groups_share_keep_sets_as_the_servers_layered_pool_groups_them():
    ids = torch.randint(0, 200, (1, 61), generator=torch.Generator().manual_seed(2))
    budget = Budget(fraction=0.5)  # 31 of 61 tokens: 13 chosen besides the sinks and the sliding-window tail
    keep_sets = {}
    for groups in (None, 1, 2, 4):  # tiny Gemma 3: layers 1 and 3 attend globally, 0 and 2 slide
        harness = EvictionHarness(tiny_gemma3(), window=8, sinks=2, protected_recent=16, layer_groups=groups)
        state = harness.prefill(ids)
        keep_sets[groups] = harness.select(state, make_policy("snapkv"), budget, "per_layer").indices
        if groups == 1:
            uniform = harness.select(state, make_policy("snapkv"), budget, "uniform").indices
    # a group per layer (2 and 4 groups put layers 1 and 3 apart) is the default per_layer; one group is uniform
    for groups in (2, 4):
        assert all(torch.equal(a, b) for a, b in zip(keep_sets[groups], keep_sets[None]))
    assert all(torch.equal(a, b) for a, b in zip(keep_sets[1], uniform))
    assert not torch.equal(keep_sets[None][0], keep_sets[None][1])  # the layers' own keep-sets differ
    with pytest.raises(ValueError, match="3 layer groups do not divide 4 layers"):
        EvictionHarness(tiny_gemma3(), layer_groups=3)


def test_the_harness_calls_the_model_without_deprecated_arguments(setup):
    import warnings

    _, _, ids, harness, _ = setup
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # transformers 5.24+: past_key_values is deprecated
        state = harness.prefill(ids)
        harness.generate(state, make_policy("snapkv"), Budget(fraction=0.5), max_new_tokens=3)
