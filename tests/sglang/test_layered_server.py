"""The layered pool in a server (``--kv-evict-granularity per_layer``): the plugin's hooks on SGLang 0.5.17's
``KVCacheConfigurator._build_mha_kv_pool`` / ``_build_token_to_kv_pool_allocator`` and on the attention-backend
setup build ``LayeredMHATokenToKVPool``, ``LayeredTokenToKVPoolAllocator`` and ``LayeredTritonAttnBackend`` when the
flag asks for per_layer, and SGLang's own classes otherwise. SGLang's real (hooked) functions are called on a
stand-in configurator / model runner carrying what they read; the runtime context a server publishes is stubbed."""

import types

import pytest
from sglang_guard import sglang_or_skip

with sglang_or_skip():
    import sglang.srt.layers.attention.triton_backend as triton_backend
    import sglang.srt.mem_cache.kv_cache_configurator as kvc
    import sglang.srt.model_executor.model_runner_components.attention_backend_setup as backend_setup
    import torch
    from sglang.srt.configs.model_config import AttentionArch
    from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
    from sglang.srt.plugins import load_plugins
    from sglang.srt.plugins.hook_registry import HookRegistry

    from sgl_evict.engine.layered_allocator import LayeredTokenToKVPoolAllocator
    from sgl_evict.engine.layered_attention import LayeredTritonAttnBackend
    from sgl_evict.engine.layered_kv_pool import LayeredMHATokenToKVPool

from sgl_evict.config import EvictionConfig
from sgl_evict.engine.runtime import STATE
from sgl_evict.patches import layered_backend, layered_pool
from sgl_evict.patches.scheduler import check_per_layer_pool, layered_allocator
from sgl_evict.selection import Budget

LAYERS, HEADS, KV_HEADS, HEAD_DIM, SIZE = 4, 4, 2, 16, 40
HOOKED = ("sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator._build_mha_kv_pool",
          "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator._build_token_to_kv_pool_allocator",
          "sglang.srt.model_executor.model_runner_components.attention_backend_setup"
          "._build_full_attention_backend_from_str")


@pytest.fixture(autouse=True)
def server(monkeypatch):
    """The plugin's hooks applied (as launch_server and every scheduler do), SGLang's runtime context stubbed, and
    the process's eviction config put back afterwards."""
    load_plugins()
    ns = types.SimpleNamespace
    monkeypatch.setattr(kvc, "get_schedule", lambda: ns(prefill_only_disable_kv_cache=False, page_size=1))
    monkeypatch.setattr(kvc, "get_parallel", lambda: ns(attn_tp_size=1))
    monkeypatch.setattr(kvc, "get_exec", lambda: ns(features=ns(enable_memory_saver=False)))
    monkeypatch.setattr(kvc, "get_disagg", lambda: ns(enable_pdmux=False, disaggregation_mode="null"))
    monkeypatch.setattr(kvc, "get_spec", lambda: ns(speculative_algorithm=None))
    monkeypatch.setattr(triton_backend, "get_spec", lambda: ns(
        speculative_num_draft_tokens=None, speculative_num_steps=None, speculative_eagle_topk=None))
    monkeypatch.setattr(triton_backend, "get_parallel", lambda: ns(attn_dcp_size=1, attn_dcp_rank=0, attn_tp_size=1))
    saved = STATE.config
    yield
    STATE.configure(saved)


def _serve(granularity="uniform", groups=None):
    STATE.configure(EvictionConfig(policy="snapkv", budget=Budget.parse("0.5"), granularity=granularity,
                                   layer_groups=groups))


def _model_config():
    return types.SimpleNamespace(
        attention_arch=AttentionArch.MHA, get_max_num_attention_heads=lambda: HEADS,
        get_num_kv_heads=lambda tp: KV_HEADS, head_dim=HEAD_DIM, v_head_dim=HEAD_DIM, swa_v_head_dim=None,
        context_len=32, is_encoder_decoder=False, linear_attn_registry_result=None,
        hf_config=types.SimpleNamespace(get_text_config=lambda: None))


def _configurator():
    """What SGLang's KVCacheConfigurator._build_mha_kv_pool and the allocator hook read."""
    return types.SimpleNamespace(
        kv_cache_dtype_str="auto", post_capture_kv_active=False, pool_page_size=1, kv_cache_dtype=torch.float32,
        model_config=_model_config(), device="cpu", is_draft_worker=False,
        layer_info=types.SimpleNamespace(num_effective_layers=LAYERS, start_layer=0, end_layer=LAYERS),
        server_args=types.SimpleNamespace(disaggregation_mode="null"))


def _build_pool(configurator):
    return kvc.KVCacheConfigurator._build_mha_kv_pool(configurator, max_total_num_tokens=SIZE,
                                                       mha_pool_class=MHATokenToKVPool)


def _build_allocator(configurator, pool):
    return kvc.KVCacheConfigurator._build_token_to_kv_pool_allocator(
        configurator, sizes=types.SimpleNamespace(max_total_num_tokens=SIZE), token_to_kv_pool=pool,
        is_dsv4_model=False, req_to_token_pool=None, token_to_kv_pool_allocator=None)


def test_the_plugin_hooks_sglangs_pool_allocator_and_backend_construction():
    for target in HOOKED:
        assert target in HookRegistry._patched, target


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_per_layer_builds_the_layered_pool_and_allocator_of_sglangs_bytes(groups):
    _serve("per_layer", groups)
    configurator = _configurator()
    pool = _build_pool(configurator)
    assert type(pool) is LayeredMHATokenToKVPool
    assert (pool.size, pool.num_groups, pool.layer_num, pool.head_num, pool.head_dim) == (
        groups * SIZE, groups, LAYERS, KV_HEADS, HEAD_DIM)
    # the heap holds what SGLang's pool would: (G x S + 1) x L / G rows of K and of V against (S + 1) x L
    plain = MHATokenToKVPool(SIZE, 1, torch.float32, KV_HEADS, HEAD_DIM, LAYERS, "cpu", False)
    row_bytes = KV_HEADS * HEAD_DIM * 4
    assert pool.get_kv_size_bytes() == ((groups * SIZE + 1) * LAYERS // groups * row_bytes,) * 2
    assert plain.get_kv_size_bytes()[0] - pool.get_kv_size_bytes()[0] == (LAYERS - LAYERS // groups) * row_bytes
    allocator = _build_allocator(configurator, pool)
    assert type(allocator) is LayeredTokenToKVPoolAllocator and layered_allocator(allocator) is allocator
    assert allocator.num_groups == groups and pool.group_map is allocator.group_map
    # SGLang's token count unchanged; more logical slots than tokens the heap holds in every group
    assert allocator.size == allocator.available_size() == SIZE
    assert allocator.logical.size == layered_pool.LOGICAL_SLOTS_PER_TOKEN * SIZE
    assert allocator.heap_available_size() == groups * SIZE
    check_per_layer_pool(allocator, frozenset())
    check_per_layer_pool(allocator, frozenset({0, 1}))  # sliding-window layers: served (their groups keep the window)


def test_per_layer_groups_default_to_one_per_layer_and_must_divide_the_layers():
    _serve("per_layer")
    assert _build_pool(_configurator()).num_groups == LAYERS
    _serve("per_layer", 3)
    with pytest.raises(ValueError, match="argument --kv-evict-layer-groups: 3 groups must divide the model's 4"):
        _build_pool(_configurator())


def test_uniform_and_draft_workers_get_sglangs_own_classes():
    for granularity, draft in (("uniform", False), ("per_layer", True)):
        _serve(granularity, 2 if granularity == "per_layer" else None)
        configurator = _configurator()
        configurator.is_draft_worker = draft
        pool = _build_pool(configurator)
        assert type(pool) is MHATokenToKVPool and pool.size == SIZE
        sentinel = object()
        assert layered_pool.build_token_to_kv_pool_allocator_around(
            lambda *args, **kwargs: sentinel, configurator, sizes=None, token_to_kv_pool=pool,
            is_dsv4_model=False) is sentinel
    STATE.configure(EvictionConfig())  # no eviction at all
    assert type(_build_pool(_configurator())) is MHATokenToKVPool


def test_per_layer_refuses_what_its_pool_does_not_hold():
    _serve("per_layer", 2)
    configurator = _configurator()
    configurator.pool_page_size = 16
    with pytest.raises(RuntimeError, match="per_layer runs with --page-size 1 only"):
        _build_pool(configurator)
    plain = MHATokenToKVPool(SIZE, 1, torch.float32, KV_HEADS, HEAD_DIM, LAYERS, "cpu", False)
    with pytest.raises(RuntimeError, match="SGLang built MHATokenToKVPool for this model"):
        _build_allocator(_configurator(), plain)
    with pytest.raises(RuntimeError, match="not the layered one"):
        check_per_layer_pool(TokenToKVPoolAllocator(SIZE, torch.float32, "cpu", plain, need_sort=False), frozenset())
    layered = _build_pool(_configurator())
    with pytest.raises(RuntimeError, match="per_layer: every layer has a sliding window"):
        check_per_layer_pool(_build_allocator(_configurator(), layered), frozenset(range(LAYERS)))


def _runner(pool, allocator):
    """What SGLang's Triton backend reads from a ModelRunner."""
    return types.SimpleNamespace(
        req_to_token_pool=ReqToTokenPool(4, 32, "cpu", False), token_to_kv_pool=pool,
        token_to_kv_pool_allocator=allocator, sliding_window_size=None, model_config=_model_config(),
        device="cpu", gpu_id=0, is_draft_worker=False, page_size=1,
        server_args=types.SimpleNamespace(triton_attention_num_kv_splits=4, enable_deterministic_inference=False,
                                          triton_attention_split_tile_size=None, chunked_prefill_size=-1))


def _backend(runner, name="triton"):
    return backend_setup._build_full_attention_backend_from_str(model_runner=runner, backend_str=name,
                                                                 init_new_workspace=False)


def test_the_attention_backend_registry_gives_a_layered_pool_the_layered_triton_backend():
    _serve("per_layer", 2)
    pool = _build_pool(_configurator())
    runner = _runner(pool, _build_allocator(_configurator(), pool))
    backend = _backend(runner)
    assert type(backend) is LayeredTritonAttnBackend and backend.token_to_kv_pool is pool
    with pytest.raises(RuntimeError, match="per_layer runs with --attention-backend triton only"):
        _backend(runner, "torch_native")
    # SGLang's pool: SGLang's backend, whatever the flag says
    plain = MHATokenToKVPool(SIZE, 1, torch.float32, KV_HEADS, HEAD_DIM, LAYERS, "cpu", False)
    plain_runner = _runner(plain, TokenToKVPoolAllocator(SIZE, torch.float32, "cpu", plain, need_sort=False))
    assert type(_backend(plain_runner)) is triton_backend.TritonAttnBackend
    _serve("uniform")
    assert type(_backend(plain_runner)) is triton_backend.TritonAttnBackend


def test_layered_backend_hook_names_the_function_it_wraps():
    assert layered_backend.BACKEND_SETUP == backend_setup.__name__
    assert hasattr(backend_setup, "_build_full_attention_backend_from_str")
