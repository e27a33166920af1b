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


def _fa3_bundles(tmp_path, payload: bytes, sha: str | None = None):
    """fa3-1, fa3-2 as wheelhouse.sh --fa3 writes them: xz of the library cut in two, its sha256, the part count."""
    import hashlib
    import lzma

    packed = lzma.compress(payload)
    half = len(packed) // 2
    bundles = []
    for i, chunk in enumerate((packed[:half], packed[half:]), 1):
        b = tmp_path / f"fa3-{i}"
        b.mkdir()
        (b / f"flash_ops.abi3.so.xz.part{i - 1}").write_bytes(chunk)
        bundles.append(b)
    (bundles[0] / "flash_ops.sha256").write_text((sha or hashlib.sha256(payload).hexdigest()) + "\n")
    (bundles[0] / "parts").write_text("2\n")
    return bundles


def test_fa3_parts_join_into_sgl_kernel_once_all_are_there_in_any_order(tmp_path):
    payload = bytes(range(256)) * 400
    first, second = _fa3_bundles(tmp_path, payload)
    site = tmp_path / "site"
    (site / "sgl_kernel").mkdir(parents=True)
    (site / ".installed-c").touch()
    result = _install(second, site)
    assert result.returncode == 0, result.stderr
    assert not (site / "sgl_kernel" / "flash_ops.abi3.so").exists()  # one part of two: nothing joined yet
    result = _install(first, site)
    assert result.returncode == 0, result.stderr and "joined" in result.stdout
    assert (site / "sgl_kernel" / "flash_ops.abi3.so").read_bytes() == payload
    assert not (site / "fa3-parts").exists()


def test_fa3_parts_are_refused_before_sgl_kernel_and_checked_by_sha256(tmp_path):
    first, second = _fa3_bundles(tmp_path, b"flash" * 1000, sha="0" * 64)
    site = tmp_path / "site"
    result = _install(first, site)
    assert result.returncode == 3 and "bundle c" in result.stderr
    (site / "sgl_kernel").mkdir(parents=True)
    (site / ".installed-c").touch()
    _install(first, site)
    result = _install(second, site)
    assert result.returncode == 6 and "sha256" in result.stderr
    assert not (site / "sgl_kernel" / "flash_ops.abi3.so").exists()
