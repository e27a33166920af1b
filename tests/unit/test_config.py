"""EvictionConfig: every field checked on construction, per-request overrides validated the same way, errors that
name the field (a bad override fails its request; it must never raise another exception in the scheduler)."""

import pytest

from sgl_evict.config import EvictionConfig
from sgl_evict.selection import Budget

SERVER = EvictionConfig(policy="snapkv", budget=Budget.parse("0.1"))


@pytest.mark.parametrize("raw, message", [
    ({"window": "abc"}, "window: expected an integer, got 'abc'"),
    ({"window": 2.5}, "window: expected an integer, got 2.5"),
    ({"sinks": None}, "sinks: expected an integer, got None"),
    ({"pooling_kernel": "7"}, "pooling_kernel: expected an integer, got '7'"),
    ({"lookahead_steps": True}, "lookahead_steps: expected an integer, got True"),
    ({"min_prompt_len": [1]}, "min_prompt_len: expected an integer, got [1]"),
    ({"policy": 3}, "policy: expected a string, got 3"),
    ({"history": ["keep"]}, "history: expected a string, got ['keep']"),
    ({"budget": -1}, "budget: budget token count must be >= 1"),
    ({"budget": True}, "budget: invalid budget True"),
    ({"budget": {"fraction": 0.1}}, "budget: invalid budget"),
    ({"page_granular": True}, "page_granular: set by the server"),
    ({"granularity": "per_layer"}, "granularity: set by the server"),
    ({"host_pool_gb": 4}, "host_pool_gb: set by the server (--kv-evict-host-pool-gb)"),
    ({"history": "restore"}, "history: 'restore' needs host memory for evicted tokens: a server started with "
                             "--kv-evict-host-pool-gb"),
    ({"bogus": 1}, "kv_evict: unknown field(s) bogus"),
    ({"lookahead_reserve": "2"}, "lookahead_reserve: expected a number, got '2'"),
    ({"lookahead_reserve": True}, "lookahead_reserve: expected a number, got True"),
    ({"lookahead_reserve": 0.5}, "lookahead_reserve: 0 (off) or a factor of at least 1, got 0.5"),
    ({"lookahead_reserve": float("nan")}, "lookahead_reserve: expected a number, got nan"),
    ({"continuation": "3"}, "continuation: expected an integer, got '3'"),
    ({"continuation": -1}, "continuation: must be at least 0, got -1"),
    ({"policy": "streaming", "continuation": 3}, "continuation: applies to policies scored by queries, not "
                                                 "'streaming'"),
])
def test_a_malformed_override_is_a_value_error_naming_its_field(raw, message):
    with pytest.raises(ValueError) as info:
        SERVER.override({"kv_evict": raw})
    assert message in str(info.value)


def test_good_overrides_and_huge_counts_are_taken():
    assert SERVER.override({"kv_evict": {"budget": 10**12}}).budget.num_tokens(1000) == 1000
    assert SERVER.override({"kv_evict": {"budget": "20%", "window": 16}}).window == 16
    assert SERVER.override({"kv_evict": {"page_granular": False}}) == SERVER  # the server's own value


def test_construction_checks_types_too():
    with pytest.raises(ValueError, match="page_granular: expected true or false"):
        EvictionConfig(page_granular="yes")
    with pytest.raises(ValueError, match="layer_groups: expected an integer"):
        EvictionConfig(layer_groups="2")
    assert EvictionConfig(layer_groups=None).layer_groups is None


def test_a_laq_reserve_is_its_own_radix_namespace_and_its_policy_option():
    laq = EvictionConfig(policy="laq", budget=Budget.parse("0.1"))
    reserved = laq.override({"kv_evict": {"lookahead_reserve": 3}})
    assert reserved.policy_object.reserve == 3 and laq.policy_object.reserve == 0
    assert reserved.fingerprint() != laq.fingerprint()  # it changes which tokens are kept
    assert reserved.override({"kv_evict": {"lookahead_reserve": 3.0}}).fingerprint() == reserved.fingerprint()
    # a policy without lookahead ignores it, and keeps its namespace
    assert SERVER.override({"kv_evict": {"lookahead_reserve": 3}}).fingerprint() == SERVER.fingerprint()


def test_budgets_scale_up_capped_at_the_whole_prompt():
    assert Budget.parse("0.1").scaled(3) == Budget(fraction=0.1 * 3)
    assert Budget.parse("0.4").scaled(3) == Budget(fraction=1.0)
    assert Budget.parse("100").scaled(2.5) == Budget(tokens=250)
    assert Budget.parse("3").scaled(1.1) == Budget(tokens=4)
    with pytest.raises(ValueError):
        Budget.parse("0.1").scaled(0.5)


HOST = EvictionConfig(policy="snapkv", budget=Budget.parse("0.1"), host_pool_gb=2.0)


def test_restore_is_a_history_rule_of_servers_with_a_host_pool_in_its_own_namespace():
    restore = HOST.override({"kv_evict": {"history": "restore"}})
    assert restore.history == "restore" and restore.host_pool_gb == 2.0
    assert restore.fingerprint() != HOST.fingerprint()
    # the pool's size is not part of what is kept: servers with other pools share cached KV
    assert HOST.fingerprint() == SERVER.fingerprint()
    for policy in ("streaming", "dapq", "laprox", "tova"):
        assert HOST.override({"kv_evict": {"policy": policy, "history": "restore"}}).policy == policy
    assert HOST.override({"kv_evict": {"policy": "none", "history": "restore"}}).enabled is False


@pytest.mark.parametrize("raw, message", [
    ({"policy": "laq", "history": "restore"}, "history: 'restore' is not built for policy 'laq'"),
])
def test_restore_refuses_policies_that_need_more_than_the_held_out_keys(raw, message):
    with pytest.raises(ValueError) as info:
        HOST.override({"kv_evict": raw})
    assert message in str(info.value)


@pytest.mark.parametrize("gb", [-1, "2", True, float("nan")])
def test_a_host_pool_size_is_a_non_negative_number(gb):
    with pytest.raises(ValueError, match="host_pool_gb: expected a size in GiB of at least 0"):
        EvictionConfig(policy="snapkv", budget=Budget.parse("0.1"), host_pool_gb=gb)


def test_continuation_is_a_policy_option_and_its_own_radix_namespace():
    carried = SERVER.override({"kv_evict": {"continuation": 3}})
    assert carried.policy_object.continuation == 3 and SERVER.policy_object.continuation == 0
    assert carried.fingerprint() != SERVER.fingerprint()
    assert SERVER.override({"kv_evict": {"continuation": 0}}).fingerprint() == SERVER.fingerprint()
    # a request of such a server may still ask for a position policy, which continuation does not apply to
    streaming = carried.override({"kv_evict": {"policy": "streaming"}})
    assert streaming.continuation == 0 and streaming.policy == "streaming"
    with pytest.raises(ValueError, match="continuation: applies to policies scored by queries, not 'streaming'"):
        carried.override({"kv_evict": {"policy": "streaming", "continuation": 3}})
