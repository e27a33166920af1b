"""Kernel warm-up at scheduler start (sgl_evict.engine.warmup, patches/scheduler.py): the server's policy's scoring
path runs once on scratch tensors, on CUDA only, never fatal, skippable."""

import logging
from types import SimpleNamespace

import pytest
import torch

from sgl_evict.config import Budget, EvictionConfig
from sgl_evict.engine import keep as keep_module
from sgl_evict.engine import score_plan
from sgl_evict.engine import warmup
from sgl_evict.engine.judgeq import ServedSoftTokens
from sgl_evict.engine.runtime import EngineState
from sgl_evict.kernels import paged_scoring
from sgl_evict.rope import rope_spec

HQ, HKV, D, WINDOW, STEPS, SOFT = 4, 2, 16, 4, 3, 5

# ---------------------------------------------------------------------------------------------- warm-up


class Calls:
    """Recorders for the engine's kernel entry points."""

    def __init__(self, monkeypatch):
        self.mass, self.lse, self.rerotate, self.select = [], [], [], []
        calls = self

        class RecordingRerotatePlan(score_plan.RerotatePlan):
            def run(self, queries, out=None):
                calls.rerotate.append(tuple(queries.shape))
                return queries

        monkeypatch.setattr(score_plan, "RerotatePlan", RecordingRerotatePlan)
        monkeypatch.setattr(keep_module, "select_pages", self._select)

    def attention_mass(self, queries, keys, table, lens, scaling, positions=None, row_lse=None):
        self.mass.append((tuple(queries.shape), tuple(keys.shape), keys.dtype, table.dtype, positions is not None))
        self.lse.append(None if row_lse is None else (tuple(row_lse.shape), row_lse.stride()[1:], row_lse.dtype))
        return torch.rand(queries.shape[0], queries.shape[1], table.shape[1])

    def _select(self, scores, table, lens, budget, page_size, sinks, recent):
        self.select.append(page_size)
        n = scores.shape[1]
        return SimpleNamespace(keep_mask=torch.ones(1, n, dtype=torch.bool))


def _state(policy, **overrides):
    state = EngineState()
    if policy == "judgeq":
        overrides.setdefault("soft_tokens", __file__)  # the config checks the file exists
    state.configure(EvictionConfig(policy=policy, budget=Budget.parse("0.1"), window=WINDOW,
                                   lookahead_steps=STEPS, **overrides))
    state.rope = rope_spec(D, 10000.0)
    state.value_norm_factors = {3: torch.randn(HQ, D, D)}
    state.soft_tokens = ServedSoftTokens(torch.zeros(SOFT, 8), "soft.safetensors")
    return state


LAYER = warmup.LayerShape(layer_id=3, num_q_heads=HQ, head_dim=D, scaling=0.25)
KEYS = torch.zeros(1000, HKV, D, dtype=torch.bfloat16)


def _warm_layer(state, calls, page_size=1, keys=KEYS, policy=None):
    return warmup.warm_up_layer(state, LAYER, keys, keys.clone(), torch.bfloat16, torch.int32, calls.attention_mass,
                                page_size, policy=policy)


# the one-read variant: a window LSE laid out as the capture hands it out after a FlashInfer prefill
LSE = ((1, HQ, WINDOW), (1, HQ), torch.float32)


@pytest.mark.parametrize("policy,mass,rerotated", [
    # two passes (Triton attention), then one read with the window LSE (FlashInfer)
    ("snapkv", [((1, HQ, WINDOW, D), True, None), ((1, HQ, WINDOW, D), True, LSE)], 0),
    ("dapq", [((1, HQ, WINDOW, D), False, None)], 1),
    ("laprox", [((1, HQ, WINDOW, D), True, None), ((1, HQ, WINDOW, D), True, LSE)], 0),
    # provisional snapkv keep-set (both variants), then the re-scoring: window again and the lookahead steps
    ("laq", [((1, HQ, WINDOW, D), True, None), ((1, HQ, WINDOW, D), True, LSE), ((1, HQ, WINDOW, D), True, None),
             ((1, HQ, STEPS, D), False, None)], 0),
    ("judgeq", [((1, HQ, SOFT, D), False, None)], 0),
    ("streaming", [], 0),
])
def test_warm_up_runs_the_policys_scoring_path(monkeypatch, policy, mass, rerotated):
    calls = Calls(monkeypatch)
    _warm_layer(_state(policy), calls)
    assert [(q, causal, lse) for (q, _, _, _, causal), lse in zip(calls.mass, calls.lse)] == mass
    for _, keys, dtype, slots, _ in calls.mass:  # a scratch tensor like the layer's buffer, not the pool
        assert keys[1:] == (HKV, D) and keys[0] < KEYS.shape[0] and dtype == KEYS.dtype and slots == torch.int32
    assert len(calls.rerotate) == rerotated
    assert calls.select == []  # page size 1: PyTorch selection, no kernel


@pytest.mark.parametrize("policy", ["snapkv", "laq", "streaming"])
def test_warm_up_compiles_page_selection_on_a_paged_pool(monkeypatch, policy):
    calls = Calls(monkeypatch)
    _warm_layer(_state(policy), calls, page_size=16)
    assert calls.select and set(calls.select) == {16}


def test_warm_up_scratch_keeps_the_buffers_strides(monkeypatch):
    calls = Calls(monkeypatch)
    seen = []
    real = calls.attention_mass

    def attention_mass(queries, keys, *args, **kwargs):
        seen.append(keys.stride())
        return real(queries, keys, *args, **kwargs)

    padded = torch.zeros(1000, HKV, 2 * D, dtype=torch.bfloat16)[:, :, :D]  # a strided layer buffer
    warmup.warm_up_layer(_state("snapkv"), LAYER, padded, None, torch.bfloat16, torch.int32, attention_mass)
    assert seen == [padded.stride()] * 2  # two passes and one read


def test_warm_up_is_not_reported_by_the_one_read_debug_check(monkeypatch, caplog):
    """Its placeholder LSE makes the one-read scores wrong on purpose: SGL_EVICT_CHECK_LSE=1 must only report real
    requests (on the H100 the warm-up's three lines, off by ~1e3, were taken for a broken capture)."""
    caplog.set_level(logging.INFO, logger="sgl_evict")
    monkeypatch.setenv("SGL_EVICT_CHECK_LSE", "1")
    calls = Calls(monkeypatch)
    assert _warm_layer(_state("snapkv"), calls)
    assert not [r for r in caplog.records if "one-read check" in r.getMessage()]


def test_judgeq_is_not_warmed_without_a_soft_token_file(monkeypatch):
    """The default warm-up set names judgeq; a server without a soft-token file refuses judgeq requests, so there is
    nothing to compile, and no "failed" warning (seen on the H100 before)."""
    calls = Calls(monkeypatch)
    state = _state("snapkv")
    state.soft_tokens = None
    assert _warm_layer(state, calls, policy="judgeq") is False
    assert not calls.select


def test_warm_up_skips_what_the_server_cannot_run(monkeypatch):
    calls = Calls(monkeypatch)
    state = _state("judgeq")
    state.soft_tokens = None
    assert _warm_layer(state, calls) is False
    state = _state("laprox")
    state.value_norm_factors = None
    assert _warm_layer(state, calls) is False
    assert calls.mass == []


def _cuda_buffer(_layer):
    return SimpleNamespace(device=torch.device("cuda", 0))


def test_warm_up_is_a_no_op_on_cpu(monkeypatch):
    ran = []
    monkeypatch.setattr(warmup, "warm_up_layer", lambda *args: ran.append(args))
    assert warmup.warm_up(_state("snapkv"), [LAYER], lambda layer: KEYS, None, torch.bfloat16, torch.int32,
                          None) is None
    assert ran == []


def test_warm_up_runs_each_layer_shape_on_cuda_and_logs_its_time(monkeypatch, caplog):
    ran = []
    monkeypatch.setattr(warmup, "warm_up_layer", lambda state, layer, *args, **kwargs: ran.append(layer) or True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.delenv(warmup.SKIP_ENV, raising=False)
    other = warmup.LayerShape(layer_id=7, num_q_heads=2 * HQ, head_dim=D, scaling=0.25)
    with caplog.at_level(logging.INFO, logger="sgl_evict"):
        elapsed = warmup.warm_up(_state("snapkv"), [LAYER, other], _cuda_buffer, _cuda_buffer, torch.bfloat16,
                                 torch.int32, None)
    # the server's policy first, then every other policy a request can pick (each compiles its own variant)
    assert elapsed is not None and elapsed >= 0 and ran == [LAYER, other] * len(warmup.REQUEST_POLICIES)
    assert f"warmed up the {','.join(warmup.REQUEST_POLICIES)} eviction kernels" in caplog.text


def test_warm_up_by_default_covers_the_policies_requests_can_pick(monkeypatch):
    ran = []
    monkeypatch.setattr(warmup, "warm_up_layer", lambda state, layer, *args, policy=None: ran.append(policy) or True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.delenv(warmup.SKIP_ENV, raising=False)
    monkeypatch.delenv(warmup.POLICIES_ENV, raising=False)
    warmup.warm_up(_state("streaming"), [LAYER], _cuda_buffer, None, torch.bfloat16, torch.int32, None)
    assert ran == ["streaming", *warmup.REQUEST_POLICIES]
    assert {"snapkv", "laq", "dapq", "laprox", "judgeq"} <= set(warmup.REQUEST_POLICIES)


def test_the_log_names_only_the_policies_that_were_warmed(monkeypatch, caplog):
    def warm(state, layer, *args, policy=None):
        if policy == "laprox":
            raise RuntimeError("out of shared memory")
        return policy != "judgeq"  # no soft-token file: nothing to compile

    monkeypatch.setattr(warmup, "warm_up_layer", warm)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.delenv(warmup.SKIP_ENV, raising=False)
    monkeypatch.delenv(warmup.POLICIES_ENV, raising=False)
    with caplog.at_level(logging.INFO, logger="sgl_evict"):
        assert warmup.warm_up(_state("snapkv"), [LAYER], _cuda_buffer, None, torch.bfloat16, torch.int32,
                              None) is not None
    assert "kernel warm-up for laprox failed (RuntimeError: out of shared memory)" in caplog.text
    warmed = [p for p in warmup.REQUEST_POLICIES if p not in ("laprox", "judgeq")]  # failed; had nothing
    assert f"warmed up the {','.join(warmed)} eviction kernels" in caplog.text


def test_warm_up_is_skipped_by_the_env_var_and_when_eviction_is_off(monkeypatch):
    ran = []
    monkeypatch.setattr(warmup, "warm_up_layer", lambda *args: ran.append(args))
    monkeypatch.setenv(warmup.SKIP_ENV, "1")
    assert warmup.warm_up(_state("snapkv"), [LAYER], _cuda_buffer, None, torch.bfloat16, torch.int32, None) is None
    monkeypatch.delenv(warmup.SKIP_ENV)
    # the spelling SGLang's warning about SGL_* variables asks for
    monkeypatch.setenv("SGLANG_EVICT_SKIP_WARMUP", "1")
    assert warmup.warm_up(_state("snapkv"), [LAYER], _cuda_buffer, None, torch.bfloat16, torch.int32, None) is None
    monkeypatch.delenv("SGLANG_EVICT_SKIP_WARMUP")
    off = EngineState()
    off.configure(EvictionConfig())
    assert warmup.warm_up(off, [LAYER], _cuda_buffer, None, torch.bfloat16, torch.int32, None) is None
    assert ran == []


def test_a_failing_warm_up_is_logged_not_raised(monkeypatch, caplog):
    def fail(*args, **kwargs):
        raise RuntimeError("out of shared memory")

    monkeypatch.setattr(warmup, "warm_up_layer", fail)
    monkeypatch.delenv(warmup.SKIP_ENV, raising=False)
    with caplog.at_level(logging.WARNING, logger="sgl_evict"):
        assert warmup.warm_up(_state("dapq"), [LAYER], _cuda_buffer, None, torch.bfloat16, torch.int32,
                              None) is None
    assert "kernel warm-up for dapq failed (RuntimeError: out of shared memory)" in caplog.text


def test_layer_shapes_takes_one_full_attention_layer_per_shape():
    def attn(layer_id, heads, window=-1):
        return SimpleNamespace(layer_id=layer_id, tp_q_head_num=heads, qk_head_dim=D, scaling=0.5,
                               sliding_window_size=window)

    shapes = warmup.layer_shapes([attn(0, 4, window=511), attn(1, 4), attn(2, 4), attn(3, 8)])
    assert shapes == [warmup.LayerShape(1, 4, D, 0.5), warmup.LayerShape(3, 8, D, 0.5)]


def test_scheduler_hook_warms_up_on_cuda_only(monkeypatch):
    from sgl_evict.patches import scheduler as hook

    got = []
    monkeypatch.setattr(hook, "warm_up", lambda *args: got.append(args) or 0.5)
    layers = [SimpleNamespace(layer_id=0, tp_q_head_num=HQ, qk_head_dim=D, scaling=0.25, sliding_window_size=-1)]
    cpu = SimpleNamespace(tp_worker=SimpleNamespace(model_runner=SimpleNamespace(device="cpu")))
    assert hook.warm_up_kernels(cpu, layers) is None and got == []  # no pool read on CPU

    kvcache = SimpleNamespace(get_key_buffer=lambda layer: KEYS, get_value_buffer=lambda layer: KEYS)
    allocator = SimpleNamespace(get_kvcache=lambda: kvcache, free=None, page_size=16)
    gpu = SimpleNamespace(tp_worker=SimpleNamespace(model_runner=SimpleNamespace(device="cuda", dtype=torch.float16)),
                          server_args=SimpleNamespace(tp_size=1), token_to_kv_pool_allocator=allocator,
                          req_to_token_pool=SimpleNamespace(req_to_token=torch.zeros(2, 8, dtype=torch.int32)))
    assert hook.warm_up_kernels(gpu, layers) == 0.5
    (state, shapes, key_buffer, value_buffer, query_dtype, slot_dtype, attention_mass, page_size), = got
    assert shapes == [warmup.LayerShape(0, HQ, D, 0.25)] and key_buffer(0) is KEYS
    assert (query_dtype, slot_dtype, page_size) == (torch.float16, torch.int32, 16)
    assert attention_mass is paged_scoring.attention_mass_paged


def test_scheduler_hook_never_stops_the_server(monkeypatch, caplog):
    from sgl_evict.patches import scheduler as hook

    broken = SimpleNamespace(tp_worker=SimpleNamespace(model_runner=SimpleNamespace(device="cuda:0")),
                             server_args=SimpleNamespace(tp_size=1))  # no allocator
    with caplog.at_level(logging.WARNING, logger="sgl_evict"):
        assert hook.warm_up_kernels(broken, []) is None
    assert "kernel warm-up skipped" in caplog.text


# ---------------------------------------------------------------------------------------------- real kernels


@pytest.mark.parametrize("policy", ["snapkv", "dapq", "laq"])
def test_warm_up_runs_the_real_kernels(policy):
    """The warm-up path end to end on the real Triton kernels (interpreted on CPU), tiny shapes."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    keys = torch.zeros(1000, HKV, D, dtype=torch.float32, device=device)
    state = _state(policy)
    warmup.warm_up_layer(state, LAYER, keys, None, torch.float32, torch.int32, paged_scoring.attention_mass_paged,
                         num_keys=64)


def test_warm_up_policies_from_the_env_var(monkeypatch):
    ran = []
    monkeypatch.setattr(warmup, "warm_up_layer", lambda state, layer, *args, policy=None: ran.append(policy) or True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.delenv(warmup.SKIP_ENV, raising=False)
    monkeypatch.setenv(warmup.POLICIES_ENV, "snapkv, dapq,laq")
    assert warmup.warm_up(_state("snapkv"), [LAYER], _cuda_buffer, None, torch.bfloat16, torch.int32, None) is not None
    assert ran == ["snapkv", "dapq", "laq"]


def test_warm_up_layer_runs_another_policy_than_the_servers(monkeypatch):
    calls = Calls(monkeypatch)
    warmup.warm_up_layer(_state("snapkv"), LAYER, KEYS, None, torch.bfloat16, torch.int32, calls.attention_mass,
                         policy="dapq")
    assert len(calls.rerotate) == 1 and [causal for *_, causal in calls.mass] == [False]


@pytest.mark.parametrize("policy", ["snapkv", "laprox"])
def test_warm_up_compiles_the_fp8_variant_over_an_fp8_pool(monkeypatch, policy):
    """An FP8 pool (--kv-cache-dtype fp8_e4m3) gets FP8 scratch keys (and values), so the kernels its requests
    launch are the ones compiled at start; the queries stay in the model's dtype."""
    calls = Calls(monkeypatch)
    keys = torch.zeros(1000, HKV, D, dtype=torch.float8_e4m3fn)
    _warm_layer(_state(policy), calls, keys=keys)
    assert calls.mass and all(dtype == torch.float8_e4m3fn for _, _, dtype, _, _ in calls.mass)
