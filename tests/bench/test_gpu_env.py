"""CPU checks of the pure parts of the offline GPU path (bench/gpu): the Llama-3.1-8B config and the host installer."""

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest

GPU_DIR = Path(__file__).resolve().parents[2] / "bench" / "gpu"


def _load_smoke():
    spec = importlib.util.spec_from_file_location("gpu_smoke", GPU_DIR / "smoke.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_llama_8b_config_has_the_model_card_numbers(tmp_path):
    from transformers import LlamaConfig

    path = _load_smoke().write_llama_8b_config(tmp_path / "llama8b")
    raw = json.loads((path / "config.json").read_text())
    cfg = LlamaConfig.from_dict(raw)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (4096, 32, 32, 8)
    assert (cfg.intermediate_size, cfg.vocab_size, cfg.max_position_embeddings) == (14336, 128256, 131072)
    rope = raw["rope_scaling"]
    assert rope["rope_type"] == "llama3"
    assert (rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]) == (8.0, 1.0, 4.0)
    assert rope["original_max_position_embeddings"] == 8192
    assert raw["rope_theta"] == 500000.0


def _install(*args):
    return subprocess.run(["bash", str(GPU_DIR / "install.sh"), *map(str, args)], capture_output=True, text=True)


def test_install_check_reports_a_cold_machine(tmp_path):
    result = _install("--check", tmp_path / "site")
    assert result.returncode == 0
    assert result.stdout.splitlines() == ["bundle a: MISSING", "bundle b: MISSING", "bundle c: MISSING"]


def test_install_refuses_bundle_b_before_a(tmp_path):
    bundle = tmp_path / "b"
    bundle.mkdir()
    result = _install(bundle, tmp_path / "site")
    assert result.returncode == 3
    assert "bundle a is missing" in result.stderr


@pytest.mark.parametrize("repeat", [1, 2])
def test_install_gemma_part_is_copied_once_and_marked(tmp_path, repeat):
    bundle = tmp_path / "gemma2"
    bundle.mkdir()
    (bundle / "gemma.gguf.part1").write_bytes(b"\x01" * 1000)
    site = tmp_path / "site"
    for _ in range(repeat):
        result = _install(bundle, site)
        assert result.returncode == 0, result.stderr
    assert (site / "gemma-parts" / "gemma.gguf.part1").read_bytes() == b"\x01" * 1000
    assert (site / ".installed-gemma2").exists()
    if repeat == 2:
        assert "already installed" in result.stdout
