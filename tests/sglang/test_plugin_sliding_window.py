"""Sliding-window models in an evicting SGLang 0.5.17 server: the shared pool is forced at launch, and the scheduler
makes every keep-set keep the model's sliding window or refuses what eviction cannot serve correctly. With
``--kv-evict-granularity per_layer`` a Gemma 3 launches (its layer groups checked against its layers) and the
scheduler records its sliding-window layers, whose groups keep only the window."""

from types import SimpleNamespace

import pytest
from sglang_guard import sglang_or_skip

with sglang_or_skip():
    import torch
    import transformers
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.plugins import load_plugins

from sgl_evict.config import EvictionConfig
from sgl_evict.engine.runtime import STATE
from sgl_evict.patches.scheduler import init_around
from sgl_evict.rope import rope_spec
from sgl_evict.selection import Budget

EVICT = ("--kv-evict-policy", "snapkv", "--kv-evict-budget", "0.1")
GEMMA_LAYERS = ["sliding_attention"] * 5 + ["full_attention"]


@pytest.fixture(scope="module")
def prepare(tmp_path_factory):
    """prepare_server_args over config-only checkpoints: a tiny Llama and a tiny Gemma 3 (5 sliding : 1 full)."""
    llama, gemma = tmp_path_factory.mktemp("llama"), tmp_path_factory.mktemp("gemma3")
    transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=256, architectures=["LlamaForCausalLM"]
                             ).save_pretrained(llama)
    transformers.Gemma3TextConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, sliding_window=512, layer_types=GEMMA_LAYERS,
        architectures=["Gemma3ForCausalLM"]).save_pretrained(gemma)
    load_plugins()
    from sglang.srt.server_args import prepare_server_args

    paths = {"llama": str(llama), "gemma3": str(gemma)}
    return lambda model, *flags: prepare_server_args(["--model-path", paths[model], "--device", "cpu", *flags])


def test_eviction_forces_the_shared_pool(prepare):
    # a model SGLang would give the hybrid SWA pool (gpt-oss, Llama 4, ...) gets the one pool the holes cover
    assert prepare("llama", *EVICT).disable_hybrid_swa_memory
    assert not prepare("llama").disable_hybrid_swa_memory


def test_gemma3_gets_the_shared_pool_and_its_global_rope(prepare):
    args = prepare("gemma3", *EVICT)
    config = ModelConfig.from_server_args(args)
    assert not config.is_hybrid_swa
    # dapq re-rotates with the full-attention layers' RoPE (theta 1e6), not the sliding layers' (1e4)
    from sgl_evict.rope import RopeSpec

    assert torch.equal(RopeSpec.from_config(config.hf_text_config).inv_freq, rope_spec(16, 1e6).inv_freq)


PER_LAYER = (*EVICT, "--kv-evict-granularity", "per_layer", "--attention-backend", "triton", "--disable-cuda-graph")


def test_gemma3_launches_per_layer_with_layer_groups_dividing_its_layers(prepare, capsys):
    from sgl_evict.patches.server_args import eviction_config

    args = prepare("gemma3", *PER_LAYER)
    assert args.disable_hybrid_swa_memory and eviction_config(args).layer_groups == 6
    assert eviction_config(prepare("gemma3", *PER_LAYER, "--kv-evict-layer-groups", "3")).layer_groups == 3
    with pytest.raises(SystemExit) as exit_info:
        prepare("gemma3", *PER_LAYER, "--kv-evict-layer-groups", "4")
    message = str(exit_info.value.code)
    assert "argument --kv-evict-layer-groups: 4 groups must divide the model's 6 layers" in message
    assert "Traceback" not in message


def _layers(logit_cap=0.0, sliding_cap=0.0):
    """Gemma-3-like RadixAttention layers: 0-4 sliding (window 511, as Gemma3Attention sets it), 5 global."""
    return torch.nn.ModuleList(
        [RadixAttention(4, 16, 0.25, 1, layer_id=i, sliding_window_size=511, logit_cap=sliding_cap)
         for i in range(5)] + [RadixAttention(4, 16, 0.25, 1, layer_id=5, logit_cap=logit_cap)])


def _scheduler_init(config, layers, hybrid=False, chunk=None):
    """Runs the Scheduler.__init__ hook around a stand-in for SGLang's __init__; returns the scheduler."""
    hf = transformers.Gemma3TextConfig(num_hidden_layers=6, head_dim=16, layer_types=GEMMA_LAYERS)

    def original(self, server_args):
        model_config = SimpleNamespace(attention_chunk_size=chunk, hf_text_config=hf)
        self.model_config = model_config
        self.tp_worker = SimpleNamespace(is_hybrid_swa=hybrid,
                                         model_runner=SimpleNamespace(model=layers, model_config=model_config))

    scheduler = SimpleNamespace()
    init_around(original, scheduler, SimpleNamespace(_kv_evict=config))
    return scheduler


@pytest.fixture
def state():
    saved = STATE.config, STATE.protected_recent, STATE.rope, STATE.window_layers
    yield STATE
    STATE.configure(saved[0])
    STATE.protected_recent, STATE.rope, STATE.window_layers = saved[1:]


SNAPKV = EvictionConfig(policy="snapkv", budget=Budget.parse("0.1"))


def test_scheduler_protects_the_sliding_window_of_a_gemma3_model(state):
    _scheduler_init(SNAPKV, _layers(sliding_cap=30.0))  # a cap on sliding layers is never scored: accepted
    assert state.protected_recent == 512  # sliding_window_size 511 + the current token: HF's sliding_window
    assert state.window_layers == frozenset(range(5))  # per_layer: groups of these only keep that tail
    assert torch.equal(state.rope.inv_freq, rope_spec(16, 1e6).inv_freq)


def test_scheduler_protects_nothing_without_sliding_window_layers(state):
    state.protected_recent = 7
    _scheduler_init(SNAPKV, torch.nn.ModuleList([RadixAttention(4, 16, 0.25, 1, layer_id=i) for i in range(2)]))
    assert state.protected_recent == 0 and state.window_layers == frozenset()


@pytest.mark.parametrize("setting, message", [
    ({"hybrid": True}, "launch with --disable-hybrid-swa-memory"),
    ({"chunk": 8192}, "chunked attention"),
    ({"layers": _layers(logit_cap=50.0)}, r"caps its attention logits \(logit_cap, layers \[5\]\)"),
])
def test_scheduler_refuses_what_eviction_cannot_serve(state, setting, message):
    setting = dict(setting)
    layers = setting.pop("layers", _layers())
    with pytest.raises(RuntimeError, match=message):
        _scheduler_init(SNAPKV, layers, **setting)


def test_scheduler_checks_nothing_without_eviction(state):
    state.protected_recent = 7  # left by an earlier server config in this process
    _scheduler_init(EvictionConfig(), _layers(logit_cap=50.0), hybrid=True)
    assert state.protected_recent == 0 and not state.enabled
