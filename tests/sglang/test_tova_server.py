"""TOVA through SGLang's own argument parsing and a request override: no server code names it."""

import pytest
from sglang_guard import sglang_or_skip

with sglang_or_skip("sglang.srt.server_args"):
    import sglang.srt.server_args  # noqa: F401

import transformers
from sglang.srt.plugins import load_plugins

from sgl_evict.engine.runtime import request_config
from sgl_evict.patches.server_args import eviction_config


@pytest.fixture(scope="module")
def prepare(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=256,
                             architectures=["LlamaForCausalLM"]).save_pretrained(path)
    load_plugins()
    from sglang.srt.server_args import prepare_server_args

    return lambda *flags: prepare_server_args(["--model-path", str(path), "--device", "cpu", *flags])


def test_flag_and_request_override_take_tova(prepare):
    config = eviction_config(prepare("--kv-evict-policy", "tova", "--kv-evict-budget", "0.1"))
    assert config.policy == "tova" and config.policy_object.window_queries_used == 1
    snapkv = eviction_config(prepare("--kv-evict-policy", "snapkv", "--kv-evict-budget", "0.1"))
    assert request_config(snapkv, {"kv_evict": {"policy": "tova"}}).policy == "tova"
    per_layer = eviction_config(prepare("--kv-evict-policy", "tova", "--kv-evict-budget", "0.1",
                                        "--kv-evict-granularity", "per_layer", "--attention-backend", "triton"))
    assert per_layer.granularity == "per_layer"
