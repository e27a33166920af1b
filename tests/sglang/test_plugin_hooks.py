"""The plugin's hook table on SGLang 0.5.17: every target resolves; another version or a missing symbol installs
only the flags, and a launch that asks for eviction is refused naming the symbol and the supported version."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from sglang_guard import sglang_or_skip

with sglang_or_skip("sglang.srt.plugins"):
    import sglang.srt.server_args  # noqa: F401
    from sglang.srt.plugins import load_plugins
    from sglang.srt.plugins.hook_registry import HookRegistry

from sgl_evict.plugin import (SUPPORTED_SGLANG, Hook, Unverifiable, _sglang_version, hook_table, resolve,
                              unsupported)

ROOT = Path(__file__).resolve().parents[2]


def test_every_target_resolves_on_the_supported_sglang_and_is_patched():
    assert _sglang_version() == SUPPORTED_SGLANG
    table = hook_table()
    assert unsupported(table, SUPPORTED_SGLANG) is None
    assert len({h.target for h in table}) == len(table)
    load_plugins()
    checkable = set()
    for hook in table:
        try:
            resolve(hook.target)
            checkable.add(hook.target)
        except Unverifiable:  # the scheduler's module needs CUDA-only packages to import: not on CPU
            pass
    assert len(checkable) >= len(table) - 3 and checkable <= HookRegistry._patched


def test_resolve_names_the_first_missing_part():
    assert resolve("sglang.srt.mem_cache.radix_cache.RadixCache.evict") is not None
    with pytest.raises(LookupError) as info:
        resolve("sglang.srt.mem_cache.radix_cache.RadixCache.evict_all.inner")
    assert info.value.args[0] == "sglang.srt.mem_cache.radix_cache.RadixCache.evict_all"


def test_another_version_or_a_missing_symbol_is_named(monkeypatch):
    table = hook_table()
    gone = table + (Hook("sglang.srt.mem_cache.radix_cache.RadixCache.evict_v2", "radix_cache.evict_around",
                         "around"),)
    problem = unsupported(gone, SUPPORTED_SGLANG)
    assert "has no sglang.srt.mem_cache.radix_cache.RadixCache.evict_v2" in problem
    assert f"supports SGLang {SUPPORTED_SGLANG}" in problem
    problem = unsupported(table, "0.5.18")
    assert f"supports SGLang {SUPPORTED_SGLANG} only, this is SGLang 0.5.18" in problem
    monkeypatch.setenv("SGL_EVICT_ANY_SGLANG", "1")
    assert unsupported(table, "0.5.18") is None


def test_a_renamed_radix_cache_method_the_tree_overrides_is_named(monkeypatch):
    """An override whose base method SGLang renamed would never be called: refused like a missing hook target."""
    import sgl_evict.plugin as plugin

    monkeypatch.setattr(plugin, "SUBCLASSED", (*plugin.SUBCLASSED,
                                               "sglang.srt.mem_cache.radix_cache.RadixCache._insert_helper_v2"))
    problem = unsupported(hook_table(), SUPPORTED_SGLANG)
    assert "has no sglang.srt.mem_cache.radix_cache.RadixCache._insert_helper_v2" in problem


def test_a_launch_asking_for_eviction_is_refused_when_a_symbol_is_missing(tmp_path):
    """In a fresh process (SGLang applies hooks once per process): the table gains a symbol SGLang lacks."""
    import transformers

    transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=256,
                             architectures=["LlamaForCausalLM"]).save_pretrained(tmp_path)
    script = textwrap.dedent(f"""
        import sys
        import sgl_evict.plugin as plugin
        table = plugin.hook_table
        plugin.hook_table = lambda: table() + (plugin.Hook(
            "sglang.srt.mem_cache.radix_cache.RadixCache.evict_v2", "radix_cache.evict_around", "around"),)
        from sglang.srt.plugins import load_plugins
        from sglang.srt.plugins.hook_registry import HookRegistry
        load_plugins()
        assert not any("RadixCache" in t for t in HookRegistry._patched), HookRegistry._patched
        from sglang.srt.server_args import prepare_server_args
        base = ["--model-path", {str(tmp_path)!r}, "--device", "cpu"]
        plain = prepare_server_args(base)
        print("plain launch:", plain.model_path is not None)
        prepare_server_args(base + ["--kv-evict-policy", "snapkv", "--kv-evict-budget", "0.1"])
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert "plain launch: True" in proc.stdout, proc.stderr[-3000:]
    assert proc.returncode != 0
    assert ("argument --kv-evict-policy: sgl-evict is not installed on this SGLang: SGLang 0.5.17 has no "
            "sglang.srt.mem_cache.radix_cache.RadixCache.evict_v2") in proc.stderr
    assert "Traceback" not in proc.stderr.split("not installed on this SGLang")[-1]
