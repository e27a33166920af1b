"""TOVA: the last prompt query's attention, harness and server alike."""

import torch

from sgl_evict.config import EvictionConfig
from sgl_evict.engine import evict_batch
from sgl_evict.engine.runtime import EngineState, request_config
from sgl_evict.kernels.paged_scoring import attention_mass_paged
from sgl_evict.observation import LayerObservation
from sgl_evict.policies import make_policy
from sgl_evict.selection import Budget

HQ, H, D, N, W = 4, 2, 16, 40, 6


def _setup(seed=0):
    gen = torch.Generator().manual_seed(seed)
    pool = torch.randn(N + 5, H, D, generator=gen)
    row = (torch.randperm(N + 4, generator=gen)[:N] + 1).to(torch.int32)
    queries = torch.randn(HQ, W, D, generator=gen)
    return pool, row, queries


def test_tova_scores_the_last_query_alone_unpooled():
    pool, row, queries = _setup()
    keys = pool[row.long()].transpose(0, 1)
    obs = LayerObservation(keys=keys, scaling=0.25, num_q_heads=HQ, window_queries=queries)
    got = make_policy("tova").score(obs)
    logits = torch.einsum("hd,hnd->hn", queries[:, -1], keys.repeat_interleave(HQ // H, dim=0)) * 0.25
    expected = logits.softmax(-1).view(H, HQ // H, N).mean(1)  # the last query sees every prompt key
    assert torch.allclose(got, expected, atol=1e-6)
    # the other window queries do not count: changing them changes nothing
    other = LayerObservation(keys=keys, scaling=0.25, num_q_heads=HQ,
                             window_queries=torch.cat([queries[:, :-1] * 3, queries[:, -1:]], dim=1))
    assert torch.equal(make_policy("tova").score(other), got)


def _server_scores(config, row, queries, pool, row_lse=None):
    prompt = evict_batch.PromptToScore(None, config, row, {0: queries}, row_lse or {})
    return evict_batch.prefill_scores([prompt], {0: 0.25}, EngineState(), lambda _: pool, None,
                                      attention_mass_paged)[0]


def test_server_scores_equal_the_harness_policy_two_pass_and_one_read():
    pool, row, queries = _setup(1)
    config = EvictionConfig(policy="tova", budget=Budget(fraction=0.3), window=W, pooling_kernel=7)
    assert config.policy_object.pool_width == 1  # the server's pooling flag does not apply to TOVA
    two_pass = _server_scores(config, row, queries, pool)
    keys = pool[row.long()].transpose(0, 1)
    reference = make_policy("tova").score(LayerObservation(keys=keys, scaling=0.25, num_q_heads=HQ,
                                                           window_queries=queries))
    assert torch.allclose(two_pass[0], reference, rtol=1e-4, atol=1e-6)
    # one read: the prefill's LSE of the whole window, of which TOVA uses the last query's
    positions = torch.arange(N - W, N)
    logits = torch.einsum("hwd,hnd->hwn", queries, keys.repeat_interleave(HQ // H, dim=0)) * 0.25
    logits = logits.masked_fill(torch.arange(N)[None, None] > positions[None, :, None], float("-inf"))
    one_read = _server_scores(config, row, queries, pool, row_lse={0: logits.logsumexp(-1)})
    assert torch.allclose(one_read, two_pass, rtol=1e-4, atol=1e-6)


def test_config_and_request_override_accept_tova():
    server = EvictionConfig(policy="snapkv", budget=Budget(fraction=0.2))
    request = request_config(server, {"kv_evict": {"policy": "tova"}})
    assert request.policy == "tova" and request.fingerprint() != server.fingerprint()
    assert EvictionConfig(policy="tova", budget=Budget(fraction=0.2), granularity="per_layer").enabled
