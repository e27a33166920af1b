"""The plugin registers through SGLang's entry point and its flags parse through SGLang's own prepare_server_args."""

import dataclasses
import re
from types import SimpleNamespace

import pytest
from sglang_guard import sglang_or_skip

with sglang_or_skip("sglang.srt.server_args"):
    import sglang.srt.server_args

import transformers
from sglang.srt.plugins import load_plugins
from sglang.srt.plugins.hook_registry import HookRegistry

from sgl_evict.config import EvictionConfig
from sgl_evict.patches.server_args import check_per_layer_support, eviction_config
from sgl_evict.policies import POLICIES
from sgl_evict.selection import Budget


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A local config-only checkpoint: ServerArgs resolution reads the model's config, never its weights."""
    path = tmp_path_factory.mktemp("tiny_llama")
    transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, architectures=["LlamaForCausalLM"],
    ).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def prepare(model_dir):
    load_plugins()  # what launch_server does before parsing arguments
    from sglang.srt.server_args import prepare_server_args

    return lambda *flags: prepare_server_args(["--model-path", model_dir, "--device", "cpu", *flags])


def test_entry_point_registers_hooks(prepare):
    assert "sglang.srt.server_args.ServerArgs.add_cli_args" in HookRegistry._patched
    assert "sglang.srt.server_args.ServerArgs.from_cli_args" in HookRegistry._patched


def test_flags_parse_into_one_config(prepare):
    args = prepare("--kv-evict-policy", "snapkv", "--kv-evict-budget", "0.1", "--kv-evict-window", "16",
                   "--kv-evict-sinks", "2", "--kv-evict-pooling-kernel", "5", "--kv-evict-min-prompt-len", "64",
                   "--kv-evict-page-granular")
    config = eviction_config(args)
    assert config == EvictionConfig(policy="snapkv", budget=Budget.parse("0.1"), window=16, sinks=2,
                                    pooling_kernel=5, min_prompt_len=64, page_granular=True)
    assert config.fingerprint() is not None


def test_history_rule_is_a_flag(prepare, capsys):
    args = prepare("--kv-evict-policy", "laq", "--kv-evict-budget", "0.1", "--kv-evict-history", "keep")
    assert eviction_config(args).history == "keep"
    assert eviction_config(prepare("--kv-evict-policy", "laq", "--kv-evict-budget", "0.1")).history == "rescore"
    with pytest.raises(SystemExit):
        prepare("--kv-evict-policy", "laq", "--kv-evict-budget", "0.1", "--kv-evict-history", "all")
    assert "argument --kv-evict-history: invalid choice: 'all'" in capsys.readouterr().err


def _logged(monkeypatch):
    """The sgl_evict logger's messages from here on."""
    import logging

    logged = []
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())
    logger = logging.getLogger("sgl_evict")
    monkeypatch.setattr(logger, "level", logging.INFO)
    monkeypatch.setattr(logger, "handlers", [*logger.handlers, handler])  # restored after the test
    return logged


def test_evicting_server_keeps_the_overlap_scheduler_and_turns_off_prefill_cuda_graphs(prepare, monkeypatch):
    # prefill CUDA graphs would skip the Python hook that captures the window queries; the overlap scheduler stays
    # on where a GPU run verified it (results that evict are processed first: sgl_evict.engine.overlap)
    logged = _logged(monkeypatch)
    args = prepare("--kv-evict-policy", "snapkv", "--kv-evict-budget", "0.1")
    assert not args.disable_overlap_schedule and args.cuda_graph_backend_prefill == "disabled"
    said = [line for line in logged if line.startswith("kv eviction snapkv")]
    assert said and "prefill CUDA graphs and the hybrid SWA memory pool turned off" in said[0]
    assert "overlap" not in said[0]
    assert prepare("--kv-evict-policy", "laq", "--kv-evict-budget", "0.1").disable_overlap_schedule is False
    plain = prepare()
    assert not plain.disable_overlap_schedule and plain.cuda_graph_backend_prefill is None


def test_a_users_own_flag_still_turns_the_overlap_scheduler_off(prepare):
    assert prepare("--kv-evict-policy", "snapkv", "--kv-evict-budget", "0.1",
                   "--disable-overlap-schedule").disable_overlap_schedule


@pytest.mark.parametrize("flags, named", [
    (("--kv-evict-policy", "tova"), "--kv-evict-policy tova"),
    (("--kv-evict-policy", "snapkv", "--kv-cache-dtype", "fp8_e4m3"), "--kv-cache-dtype fp8_e4m3"),
])
def test_settings_not_verified_with_the_overlap_scheduler_turn_it_off_and_say_which(
        prepare, monkeypatch, flags, named):
    monkeypatch.setenv("SGL_EVICT_UNVERIFIED_KV_DTYPE", "1")
    logged = _logged(monkeypatch)
    args = prepare(*flags, "--kv-evict-budget", "0.1")
    assert args.disable_overlap_schedule
    said = [line for line in logged if line.startswith("kv eviction")]
    assert said and f"overlap scheduling (not verified with {named})" in said[-1]
    monkeypatch.setenv("SGL_EVICT_EXPERIMENTAL_OVERLAP", "1")  # the opt-in keeps it on all the same
    assert not prepare(*flags, "--kv-evict-budget", "0.1").disable_overlap_schedule


def test_overlap_unverified_names_the_first_setting_no_gpu_run_covered():
    from sgl_evict.patches.server_args import overlap_unverified

    def args(**given):
        return SimpleNamespace(**{"tp_size": 1, "kv_cache_dtype": "auto", "page_size": None,
                                  "attention_backend": None, "prefill_attention_backend": None,
                                  "decode_attention_backend": None, **given})

    snapkv = EvictionConfig(policy="snapkv", budget=Budget.parse("0.1"))
    assert overlap_unverified(snapkv, args()) is None
    assert overlap_unverified(snapkv, args(page_size=16, attention_backend="flashinfer")) is None
    assert overlap_unverified(snapkv, args(attention_backend="triton")) is None
    assert overlap_unverified(snapkv, args(page_size=64, attention_backend="flashinfer")) is None
    assert overlap_unverified(snapkv, args(page_size=64)) == "--page-size 64 on the default backend"
    assert overlap_unverified(snapkv, args(page_size=128, attention_backend="flashinfer")) == "--page-size 128"
    # FP8: the one setting a GPU run verified (FP8_VERIFIED), with the overlap scheduler too
    assert overlap_unverified(snapkv, args(kv_cache_dtype="fp8_e4m3", attention_backend="flashinfer")) is None
    assert overlap_unverified(snapkv, args(kv_cache_dtype="fp8_e5m2", attention_backend="flashinfer")) == \
        "--kv-cache-dtype fp8_e5m2"
    assert overlap_unverified(snapkv, args(kv_cache_dtype="fp8_e4m3", attention_backend="triton")) == \
        "--kv-cache-dtype fp8_e4m3"
    assert overlap_unverified(snapkv, args(attention_backend="fa3")) is None
    with_soft_tokens = dataclasses.replace(snapkv, soft_tokens="/some/file")  # a request may ask for judgeq
    assert overlap_unverified(with_soft_tokens, args()) == "--kv-evict-soft-tokens"
    assert overlap_unverified(snapkv, args(page_size=16, attention_backend="triton")) == "--page-size 16 on triton"
    assert overlap_unverified(snapkv, args(tp_size=2)) == "--tp-size 2"
    assert overlap_unverified(snapkv, args(decode_attention_backend="trtllm_mha")) == \
        "--decode-attention-backend trtllm_mha"
    layered = EvictionConfig(policy="snapkv", budget=Budget.parse("0.1"), granularity="per_layer")
    assert overlap_unverified(layered, args()) == "--kv-evict-granularity per_layer"


def test_a_model_with_sliding_window_layers_runs_without_the_overlap_scheduler(tmp_path, model_dir):
    from sgl_evict.patches.server_args import overlap_unverified

    transformers.Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                                  num_key_value_heads=1, head_dim=16, vocab_size=256, sliding_window=512,
                                  architectures=["Gemma3ForCausalLM"]).save_pretrained(tmp_path)
    snapkv = EvictionConfig(policy="snapkv", budget=Budget.parse("0.1"))
    launched = {"tp_size": 1, "kv_cache_dtype": "auto", "page_size": 1, "attention_backend": "triton"}
    assert overlap_unverified(snapkv, SimpleNamespace(model_path=str(tmp_path), **launched)) == \
        "a model with sliding-window layers"
    assert overlap_unverified(snapkv, SimpleNamespace(model_path=model_dir, **launched)) is None


def test_evicting_server_selects_the_hole_aware_radix_cache(prepare):
    from sgl_evict.config import RADIX_CACHE_BACKEND

    assert prepare("--kv-evict-policy", "snapkv", "--kv-evict-budget", "0.1").radix_cache_backend == \
        RADIX_CACHE_BACKEND
    assert prepare("--kv-evict-policy", "snapkv", "--kv-evict-budget", "0.1", "--radix-cache-backend",
                   RADIX_CACHE_BACKEND).radix_cache_backend == RADIX_CACHE_BACKEND
    assert prepare().radix_cache_backend is None  # a plain server keeps SGLang's own choice


def test_pages_make_eviction_page_granular(prepare, monkeypatch, capsys):
    flags = ("--kv-evict-policy", "snapkv", "--kv-evict-budget", "0.1", "--page-size", "16",
             "--attention-backend", "triton")
    with pytest.raises(SystemExit) as exit_info:  # verified on FlashInfer only: other backends opt in
        prepare(*flags)
    assert ("argument --page-size: page-granular eviction (--page-size 16) is verified with --attention-backend "
            "flashinfer only (got triton)") in capsys.readouterr().err + str(exit_info.value.code)
    # a page whose tokens are only partly dropped cannot be freed
    flashinfer = (*flags[:-1], "flashinfer")
    assert eviction_config(prepare(*flashinfer)).page_granular
    monkeypatch.setenv("SGL_EVICT_EXPERIMENTAL_PAGES", "1")
    assert eviction_config(prepare(*flags)).page_granular
    assert not eviction_config(prepare("--kv-evict-policy", "snapkv", "--kv-evict-budget", "0.1")).page_granular


def test_no_flags_means_no_eviction(prepare):
    config = eviction_config(prepare())
    assert not config.enabled and config.fingerprint() is None


@pytest.mark.parametrize("flags, message", [
    (["--kv-evict-policy", "h2o"], "argument --kv-evict-policy: invalid choice: 'h2o'"),
    (["--kv-evict-policy", "snapkv", "--kv-evict-budget", "lots"], "argument --kv-evict-budget: invalid budget 'lots'"),
    (["--kv-evict-window", "0"], "argument --kv-evict-window: must be at least 1, got 0"),
    (["--kv-evict-policy", "laq", "--kv-evict-budget", "0.1", "--kv-evict-lookahead-reserve", "0.5"],
     "argument --kv-evict-lookahead-reserve: 0 (off) or a factor of at least 1, got 0.5"),
    (["--kv-evict-lookahead-reserve", "lots"], "argument --kv-evict-lookahead-reserve: expected a number"),
    (["--kv-evict-sinks", "x"], "argument --kv-evict-sinks: expected an integer, got 'x'"),
    (["--kv-evict-policy", "snapkv"], "argument --kv-evict-budget: policy 'snapkv' needs a budget"),
    (["--kv-evict-pooling-kernel", "4"], "argument --kv-evict-pooling-kernel: must be odd, got 4"),
    (["--kv-evict-continuation", "-1"], "argument --kv-evict-continuation: must be at least 0, got -1"),
    (["--kv-evict-policy", "streaming", "--kv-evict-budget", "0.1", "--kv-evict-continuation", "3"],
     "argument --kv-evict-continuation: applies to policies scored by queries, not 'streaming'"),
    (["--kv-evict-policy", "judgeq", "--kv-evict-budget", "0.1", "--kv-evict-soft-tokens", "/no/such/file"],
     "argument --kv-evict-soft-tokens: file '/no/such/file' does not exist"),
    (["--kv-evict-policy", "snapkv", "--kv-evict-budget", "0.1", "--enable-hierarchical-cache"],
     "argument --enable-hierarchical-cache: not supported together with --kv-evict-policy yet"),
    (["--kv-evict-policy", "snapkv", "--kv-evict-budget", "0.1", "--radix-cache-backend", "flexkv"],
     "argument --radix-cache-backend: not supported together with --kv-evict-policy yet (eviction selects its own "
     "radix cache, sgl-evict"),
    (["--kv-evict-policy", "snapkv", "--kv-evict-budget", "0.1", "--kv-cache-dtype", "fp8_e4m3"],
     "argument --kv-cache-dtype: with eviction, fp8_e4m3 is verified on a GPU with --attention-backend flashinfer "
     "and --page-size 1 only (got fp8_e4m3, the default backend, page size 1)"),
    (["--kv-evict-policy", "snapkv", "--kv-evict-budget", "0.1", "--kv-cache-dtype", "fp8_e5m2",
      "--attention-backend", "flashinfer"],
     "argument --kv-cache-dtype: with eviction, fp8_e4m3 is verified on a GPU with --attention-backend flashinfer "
     "and --page-size 1 only (got fp8_e5m2, flashinfer, page size 1)"),
    (["--kv-evict-host-pool-gb", "lots"], "argument --kv-evict-host-pool-gb: expected a size in GiB, got 'lots'"),
    (["--kv-evict-host-pool-gb", "-2"], "argument --kv-evict-host-pool-gb: must be at least 0, got -2"),
    (["--kv-evict-host-pool-gb", "4"], "argument --kv-evict-host-pool-gb: needs --kv-evict-policy"),
    (["--kv-evict-policy", "snapkv", "--kv-evict-budget", "0.1", "--kv-evict-history", "restore"],
     "argument --kv-evict-history: 'restore' needs host memory for evicted tokens: a server started with "
     "--kv-evict-host-pool-gb"),
    (["--kv-evict-policy", "laq", "--kv-evict-budget", "0.1", "--kv-evict-history", "restore",
      "--kv-evict-host-pool-gb", "4"], "argument --kv-evict-history: 'restore' is not built for policy 'laq'"),
    (["--kv-evict-policy", "snapkv", "--kv-evict-budget", "0.1", "--kv-evict-host-pool-gb", "4", "--page-size",
      "16", "--attention-backend", "flashinfer"], "argument --page-size: --kv-evict-host-pool-gb runs with "
     "--page-size 1 only"),
    (["--kv-evict-policy", "snapkv", "--kv-evict-budget", "0.1", "--kv-evict-host-pool-gb", "4",
      "--disable-radix-cache"], "argument --disable-radix-cache: --kv-evict-host-pool-gb later turns find evicted "
     "tokens through the radix cache"),
    (["--kv-evict-policy", "snapkv", "--kv-evict-budget", "0.1", "--kv-evict-host-pool-gb", "4",
      "--kv-evict-granularity", "per_layer", "--attention-backend", "triton"],
     "argument --kv-evict-granularity: --kv-evict-host-pool-gb is built for uniform eviction only"),
    (["--kv-evict-policy", "snapkv", "--kv-evict-budget", "0.1", "--kv-evict-host-pool-gb", "1000000"],
     "argument --kv-evict-host-pool-gb: 1e+06 GiB asked, but this host has"),
    (["--kv-evict-policy", "snapkv", "--kv-evict-budget", "0.1", "--kv-cache-dtype", "nvfp4"],
     "argument --kv-cache-dtype: not supported together with --kv-evict-policy yet (the scoring kernels read "
     "16-bit or FP8 keys, got nvfp4)"),
])
def test_bad_values_fail_at_launch_naming_the_flag(prepare, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        prepare(*flags)
    printed = capsys.readouterr().err + str(exit_info.value.code)
    assert message in printed
    assert "Traceback" not in printed


def test_a_host_pool_and_restore_are_flags(prepare):
    config = eviction_config(prepare("--kv-evict-policy", "snapkv", "--kv-evict-budget", "0.1",
                                     "--kv-evict-history", "restore", "--kv-evict-host-pool-gb", "1.5"))
    assert config.history == "restore" and config.host_pool_gb == 1.5
    assert eviction_config(prepare("--kv-evict-policy", "snapkv", "--kv-evict-budget", "0.1")).host_pool_gb == 0


def test_laq_is_served_with_its_lookahead_steps(prepare):
    # the README's headline command
    args = prepare("--kv-evict-policy", "laq", "--kv-evict-budget", "0.1", "--kv-evict-lookahead-steps", "4")
    config = eviction_config(args)
    assert config == EvictionConfig(policy="laq", budget=Budget.parse("0.1"), lookahead_steps=4)
    assert not args.disable_overlap_schedule and args.cuda_graph_backend_prefill == "disabled"
    assert eviction_config(prepare("--kv-evict-policy", "laq", "--kv-evict-budget", "0.1")).lookahead_steps == 8
    reserved = prepare("--kv-evict-policy", "laq", "--kv-evict-budget", "0.1", "--kv-evict-lookahead-reserve", "3")
    assert eviction_config(reserved).lookahead_reserve == 3.0


def test_laprox_is_served(prepare):
    args = prepare("--kv-evict-policy", "laprox", "--kv-evict-budget", "0.1", "--kv-evict-pooling-kernel", "5")
    assert eviction_config(args) == EvictionConfig(policy="laprox", budget=Budget.parse("0.1"), pooling_kernel=5)
    carried = eviction_config(prepare("--kv-evict-policy", "laprox", "--kv-evict-budget", "0.1",
                                      "--kv-evict-continuation", "3"))
    assert carried.continuation == 3 and carried.policy_object.continuation == 3
    assert not args.disable_overlap_schedule and args.cuda_graph_backend_prefill == "disabled"


def _soft_token_file(path):
    import torch

    from sgl_evict.soft_tokens import SoftTokens

    SoftTokens(torch.randn(4, 64), "fingerprint-checked-by-the-scheduler").save(path)
    return str(path)


def test_judgeq_is_served_with_its_soft_token_file(prepare, tmp_path):
    soft = _soft_token_file(tmp_path / "soft.safetensors")
    args = prepare("--kv-evict-policy", "judgeq", "--kv-evict-budget", "0.1", "--kv-evict-soft-tokens", soft)
    assert eviction_config(args) == EvictionConfig(policy="judgeq", budget=Budget.parse("0.1"), soft_tokens=soft)
    assert args.disable_overlap_schedule and args.cuda_graph_backend_prefill == "disabled"
    # another policy's server loads the file too, so that requests may ask for judgeq
    assert eviction_config(prepare("--kv-evict-policy", "snapkv", "--kv-evict-budget", "0.1",
                                   "--kv-evict-soft-tokens", soft)).soft_tokens == soft


def test_judgeq_refuses_a_file_that_is_no_soft_token_file_and_pages(prepare, capsys, tmp_path):
    junk = tmp_path / "soft.pt"
    junk.write_bytes(b"")
    for flags, message in [
        (("--kv-evict-policy", "judgeq", "--kv-evict-budget", "0.1", "--kv-evict-soft-tokens", str(junk)),
         "argument --kv-evict-soft-tokens: "),
        (("--kv-evict-policy", "snapkv", "--kv-evict-budget", "0.1", "--kv-evict-soft-tokens", str(junk)),
         "argument --kv-evict-soft-tokens: "),
        (("--kv-evict-policy", "judgeq", "--kv-evict-budget", "0.1", "--page-size", "16",
          "--attention-backend", "flashinfer", "--kv-evict-soft-tokens", _soft_token_file(tmp_path / "s.st")),
         "argument --page-size: --kv-evict-policy judgeq runs with --page-size 1 only"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            prepare(*flags)
        printed = capsys.readouterr().err + str(exit_info.value.code)
        assert message in printed and "Traceback" not in printed, printed


def test_help_names_the_policies_the_server_runs(prepare, capsys):
    with pytest.raises(SystemExit):
        prepare("--help")
    text = " ".join(capsys.readouterr().out.split())
    named = re.search(r"the server runs (.+?), one keep-set", text).group(1).replace(" and ", ", ").split(", ")
    assert named == list(POLICIES)  # every registered policy, in registry order, from the registry alone


def test_request_override_is_validated_the_same_way():
    server = EvictionConfig(policy="laq", budget=Budget.parse("0.1"))
    request = server.override({"kv_evict": {"policy": "snapkv", "budget": 0.2}})
    assert request.policy == "snapkv" and request.budget == Budget.parse("0.2")
    assert request.fingerprint() != server.fingerprint()
    assert server.override({}) is server
    for params, message in [
        ({"kv_evict": {"policy": "h2o"}}, "policy: 'h2o' is not one of"),
        ({"kv_evict": {"budget": "lots"}}, "budget: invalid budget 'lots'"),
        ({"kv_evict": {"windw": 3}}, "kv_evict: unknown field(s) windw"),
        ({"kv_evict": "snapkv"}, "kv_evict: expected an object"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            server.override(params)


PER_LAYER = ("--kv-evict-policy", "snapkv", "--kv-evict-budget", "0.1", "--kv-evict-granularity", "per_layer",
             "--attention-backend", "triton")


def test_per_layer_parses_and_resolves_its_layer_groups(prepare):
    # the tiny model has 2 layers: no --kv-evict-layer-groups means one group per layer
    config = eviction_config(prepare(*PER_LAYER))
    assert (config.granularity, config.layer_groups) == ("per_layer", 2)
    assert eviction_config(prepare(*PER_LAYER, "--kv-evict-layer-groups", "1")).layer_groups == 1
    uniform = eviction_config(prepare("--kv-evict-policy", "snapkv", "--kv-evict-budget", "0.1"))
    assert (uniform.granularity, uniform.layer_groups) == ("uniform", None)
    # uniform keeps the radix namespace it had before the flag existed; per_layer is a namespace of its own
    assert uniform.fingerprint() == EvictionConfig(policy="snapkv", budget=Budget.parse("0.1")).fingerprint()
    assert config.fingerprint() != uniform.fingerprint()
    laprox = eviction_config(prepare(*PER_LAYER[:1], "laprox", *PER_LAYER[2:]))
    assert (laprox.policy, laprox.granularity) == ("laprox", "per_layer")


def test_per_layer_runs_with_decode_cuda_graphs_or_eagerly(prepare):
    # decode CUDA graphs of the layered Triton backend (design step 5): SGLang's default full graphs, or none
    graphs = prepare(*PER_LAYER)
    assert graphs.cuda_graph_config.decode.backend == "full"
    assert graphs.cuda_graph_config.prefill.backend == "disabled"  # eviction turns prefill graphs off
    eager = prepare(*PER_LAYER, "--disable-cuda-graph")
    assert eager.cuda_graph_config.decode.backend == "disabled"
    assert eviction_config(graphs) == eviction_config(eager)


def test_per_layer_refuses_prefill_cuda_graphs():
    # eviction turns prefill graphs off before SGLang resolves its flags; a server that has one anyway is refused
    server_args = SimpleNamespace(
        get_attention_backends=lambda: ["triton"], page_size=1, tp_size=1, enable_torch_compile=False,
        cuda_graph_config=SimpleNamespace(decode=SimpleNamespace(backend="full"),
                                          prefill=SimpleNamespace(backend="breakable")),
        get_model_config=lambda: SimpleNamespace(is_hybrid_swa=False, num_hidden_layers=2))
    config = EvictionConfig(policy="snapkv", budget=Budget.parse("0.1"), granularity="per_layer")
    with pytest.raises(ValueError, match=re.escape("argument --cuda-graph-backend-prefill: --kv-evict-granularity "
                                                   "per_layer runs prefill eagerly only (got breakable)")):
        check_per_layer_support(config, server_args)
    server_args.cuda_graph_config.prefill.backend = "disabled"
    assert check_per_layer_support(config, server_args).layer_groups == 2


@pytest.mark.parametrize("flags, message", [
    (["--kv-evict-granularity", "per_layr"], "argument --kv-evict-granularity: invalid choice: 'per_layr'"),
    (["--kv-evict-layer-groups", "0"], "argument --kv-evict-layer-groups: must be at least 1, got 0"),
    (["--kv-evict-policy", "snapkv", "--kv-evict-budget", "0.1", "--kv-evict-layer-groups", "2"],
     "argument --kv-evict-layer-groups: applies to granularity per_layer only"),
    (["--kv-evict-granularity", "per_layer", "--attention-backend", "triton"],
     "argument --kv-evict-granularity: per_layer needs --kv-evict-policy"),
    ([*PER_LAYER, "--kv-evict-layer-groups", "3"],
     "argument --kv-evict-layer-groups: 3 groups must divide the model's 2 layers"),
    ([*PER_LAYER[:6], "--disable-cuda-graph"],
     "argument --attention-backend: --kv-evict-granularity per_layer runs with --attention-backend triton only "
     "(got torch_native)"),
    ([*PER_LAYER, "--cuda-graph-backend-decode", "breakable"],
     "argument --cuda-graph-backend-decode: --kv-evict-granularity per_layer captures decode CUDA graphs with the "
     "full backend only (got breakable)"),
    ([*PER_LAYER, "--enable-torch-compile"],
     "argument --enable-torch-compile: --kv-evict-granularity per_layer does not run under torch.compile"),
    ([*PER_LAYER, "--page-size", "16"],
     "argument --page-size: --kv-evict-granularity per_layer runs with --page-size 1 only (got 16)"),
    ([*PER_LAYER, "--tp-size", "2"],
     "argument --tp-size: --kv-evict-granularity per_layer runs on one GPU only (got --tp-size 2)"),
    (["--kv-evict-policy", "laq", *PER_LAYER[2:]],
     "argument --kv-evict-granularity: per_layer is not built for policy 'laq'"),
])
def test_per_layer_refusals_name_the_flag(prepare, capsys, monkeypatch, flags, message):
    monkeypatch.setenv("SGL_EVICT_EXPERIMENTAL_PAGES", "1")  # --page-size 16 on triton: reach the per_layer check
    with pytest.raises(SystemExit) as exit_info:
        prepare(*flags)
    printed = capsys.readouterr().err + str(exit_info.value.code)
    assert message in printed, printed
    # argparse's errors are printed, ours are the SystemExit's message; logging handlers SGLang bound to an earlier
    # test's captured stderr may print "--- Logging error ---" tracebacks of their own, which are no failure here
    assert "Traceback" not in str(exit_info.value.code)


def test_per_layer_refuses_judgeq(prepare, capsys, tmp_path):
    soft = _soft_token_file(tmp_path / "soft.safetensors")
    with pytest.raises(SystemExit) as exit_info:
        prepare("--kv-evict-policy", "judgeq", *PER_LAYER[2:], "--kv-evict-soft-tokens", soft)
    printed = str(exit_info.value.code)
    assert "argument --kv-evict-granularity: per_layer is not built for policy 'judgeq'" in printed


def test_per_layer_serves_sliding_window_models_on_the_shared_pool(tmp_path):
    load_plugins()
    from sglang.srt.server_args import prepare_server_args

    transformers.MistralConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=256, sliding_window=16, architectures=["MistralForCausalLM"],
    ).save_pretrained(tmp_path)
    server_args = prepare_server_args(["--model-path", str(tmp_path), "--device", "cpu", *PER_LAYER])
    assert server_args.disable_hybrid_swa_memory  # eviction runs every layer on the one shared pool
    assert server_args.get_model_config().sliding_window_size == 16
    assert eviction_config(server_args).layer_groups == 2


def test_per_layer_refuses_sglangs_hybrid_swa_pool():
    # eviction turns the hybrid pool off at launch; a server that has it anyway (its ModelConfig says so) is refused
    server_args = SimpleNamespace(
        get_attention_backends=lambda: ["triton"], page_size=1, tp_size=1,
        cuda_graph_config=SimpleNamespace(decode=SimpleNamespace(backend="disabled")),
        get_model_config=lambda: SimpleNamespace(is_hybrid_swa=True, sliding_window_size=16, num_hidden_layers=2))
    config = EvictionConfig(policy="snapkv", budget=Budget.parse("0.1"), granularity="per_layer")
    with pytest.raises(ValueError, match=re.escape("argument --disable-hybrid-swa-memory: --kv-evict-granularity "
                                                   "per_layer runs sliding-window models on the one shared KV pool")):
        check_per_layer_support(config, server_args)
    server_args.get_model_config = lambda: SimpleNamespace(is_hybrid_swa=False, sliding_window_size=16,
                                                           num_hidden_layers=2)
    assert check_per_layer_support(config, server_args).layer_groups == 2


def test_per_layer_server_refuses_per_request_granularity_and_laq():
    server = EvictionConfig(policy="snapkv", budget=Budget.parse("0.1"), granularity="per_layer", layer_groups=4)
    assert server.override({"kv_evict": {"budget": 0.2}}).granularity == "per_layer"
    assert not server.override({"kv_evict": {"policy": "none"}}).enabled  # a request may still turn eviction off
    for params, message in [
        ({"kv_evict": {"granularity": "uniform"}}, "granularity: set by the server (--kv-evict-granularity)"),
        ({"kv_evict": {"layer_groups": 2}}, "layer_groups: set by the server (--kv-evict-layer-groups)"),
        ({"kv_evict": {"policy": "laq"}}, "granularity: per_layer is not built for policy 'laq'"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            server.override(params)
    uniform = EvictionConfig(policy="snapkv", budget=Budget.parse("0.1"))
    with pytest.raises(ValueError, match=re.escape("granularity: set by the server")):
        uniform.override({"kv_evict": {"granularity": "per_layer"}})


def _launch_args(model: str, **flags) -> SimpleNamespace:
    return SimpleNamespace(**{"device": None, "attention_backend": None, "prefill_attention_backend": None,
                              "decode_attention_backend": None, "model_path": model, **flags})


def test_without_a_backend_a_gpu_server_gets_a_verified_one(model_dir, tmp_path):
    from sgl_evict.patches.server_args import choose_attention_backend

    args = _launch_args(model_dir)
    assert "--attention-backend flashinfer" in choose_attention_backend(args)
    assert args.attention_backend == "flashinfer"  # SGLang would pick fa3 on Hopper
    transformers.Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                                  num_key_value_heads=1, head_dim=16, vocab_size=256, sliding_window=512,
                                  architectures=["Gemma3ForCausalLM"]).save_pretrained(tmp_path)
    gemma = _launch_args(str(tmp_path))
    assert "sliding-window" in choose_attention_backend(gemma) and gemma.attention_backend == "triton"
    layered = _launch_args(model_dir, kv_evict_granularity="per_layer")
    assert "layered pool" in choose_attention_backend(layered) and layered.attention_backend == "triton"
    cpu = _launch_args(model_dir, device="cpu")
    assert choose_attention_backend(cpu) is None and cpu.attention_backend is None
    given = _launch_args(model_dir, attention_backend="triton")
    assert choose_attention_backend(given) is None and given.attention_backend == "triton"


@pytest.mark.parametrize("flag", ["--attention-backend", "--decode-attention-backend", "--prefill-attention-backend"])
def test_an_unverified_backend_is_refused_at_launch_naming_its_flag(prepare, capsys, monkeypatch, flag):
    flags = ("--kv-evict-policy", "laq", "--kv-evict-budget", "0.1", "--device", "cuda", flag, "torch_native")
    with pytest.raises(SystemExit) as exit_info:
        prepare(*flags)
    printed = capsys.readouterr().err + str(exit_info.value.code)
    assert f"argument {flag}: eviction is verified with flashinfer, triton, fa3 only (got torch_native)" in printed
    assert "Traceback" not in printed
    from sgl_evict.patches.server_args import choose_attention_backend

    monkeypatch.setenv("SGL_EVICT_UNVERIFIED_BACKEND", "1")  # the opt-in
    assert choose_attention_backend(_launch_args("m", **{flag[2:].replace("-", "_"): "torch_native"})) is None


def test_fa3_is_taken_as_given_except_on_sliding_window_models_and_keeps_the_overlap_scheduler(
        model_dir, tmp_path, monkeypatch):
    # verified end to end on an H100 on a model without sliding-window layers (evict_e2e 2026-12-07), with the
    # overlap scheduler too (the snapkv-fa3-overlap twin: same keep-sets and answers)
    from sgl_evict.patches.server_args import choose_attention_backend, overlap_unverified

    llama = _launch_args(model_dir, attention_backend="fa3")
    assert choose_attention_backend(llama) is None and llama.attention_backend == "fa3"
    launched = SimpleNamespace(tp_size=1, kv_cache_dtype="auto", page_size=1, attention_backend="fa3",
                               prefill_attention_backend=None, decode_attention_backend=None)
    assert overlap_unverified(EvictionConfig(policy="snapkv", budget=Budget.parse("0.1")), launched) is None
    transformers.Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                                  num_key_value_heads=1, head_dim=16, vocab_size=256, sliding_window=512,
                                  architectures=["Gemma3ForCausalLM"]).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=re.escape("argument --decode-attention-backend: eviction on fa3 is "
                                                   "verified on models without sliding-window layers only")):
        choose_attention_backend(_launch_args(str(tmp_path), decode_attention_backend="fa3"))
    monkeypatch.setenv("SGL_EVICT_UNVERIFIED_BACKEND", "1")
    assert choose_attention_backend(_launch_args(str(tmp_path), attention_backend="fa3")) is None


def test_fp8_e4m3_on_flashinfer_is_served_without_the_opt_in(prepare):
    args = prepare("--kv-evict-policy", "snapkv", "--kv-evict-budget", "0.1", "--kv-cache-dtype", "fp8_e4m3",
                   "--attention-backend", "flashinfer")
    assert args.kv_cache_dtype == "fp8_e4m3" and eviction_config(args).enabled
    assert not args.disable_overlap_schedule  # run with the overlap scheduler too (snapkv-fp8-overlap)


def test_an_fp8_kv_cache_is_let_through_by_its_opt_in_but_never_with_per_layer(prepare, monkeypatch, capsys):
    monkeypatch.setenv("SGL_EVICT_UNVERIFIED_KV_DTYPE", "1")
    for dtype in ("fp8_e4m3", "fp8_e5m2"):
        args = prepare("--kv-evict-policy", "snapkv", "--kv-evict-budget", "0.1", "--kv-cache-dtype", dtype)
        assert args.kv_cache_dtype == dtype and eviction_config(args).enabled
    with pytest.raises(SystemExit) as exit_info:
        prepare("--kv-evict-policy", "snapkv", "--kv-evict-budget", "0.1", "--kv-cache-dtype", "fp8_e4m3",
                "--kv-evict-granularity", "per_layer")
    assert "argument --kv-cache-dtype: fp8_e4m3 is not built for --kv-evict-granularity per_layer" in (
        capsys.readouterr().err + str(exit_info.value.code))
    # a server without eviction takes any KV dtype, as plain SGLang
    assert prepare("--kv-cache-dtype", "fp8_e4m3").kv_cache_dtype == "fp8_e4m3"
