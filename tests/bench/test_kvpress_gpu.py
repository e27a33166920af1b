"""CPU checks of the kvpress peer's GPU-host path (issue 20): the host wheel list and the host installer's own target
and tokenizer. kvpress itself is not needed."""

import lzma
import re
import subprocess
import zipfile
from pathlib import Path


ROOT = Path(__file__).resolve().parents[2]
PEER = ROOT / "bench" / "peers" / "kvpress"


def _pins(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split()[0].split("==")
            out[re.sub(r"[-_.]+", "-", name).lower()] = version
    return out


def test_host_wheels_pin_what_the_cpu_venv_tested():
    host, cpu = _pins(PEER / "host-wheels.txt"), _pins(PEER / "constraints.txt")
    assert host["kvpress"] == "0.5.5" and host["transformers"] == "5.2.0"
    # transformers 5.2.0 checks tokenizers >=0.22.0,<=0.23.0 at import; the host has 0.23.2
    assert (0, 22, 0) <= tuple(map(int, host["tokenizers"].split("."))) <= (0, 23, 0)
    for name, version in host.items():
        if name in cpu:
            assert version == cpu[name], f"{name}: host-wheels.txt {version}, constraints.txt {cpu[name]}"
    # everything kvpress imports at import time that the host image lacks
    assert {"datasets", "fire", "cachetools", "multiprocess", "dill", "termcolor"} <= set(host)


def _install(*args):
    return subprocess.run(["bash", str(ROOT / "bench" / "gpu" / "install.sh"), *map(str, args)],
                          capture_output=True, text=True)


def _tiny_wheel(folder: Path) -> Path:
    path = folder / "tinykv-0.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("tinykv/__init__.py", "X = 1\n")
        z.writestr("tinykv-0.1.dist-info/METADATA", "Metadata-Version: 2.1\nName: tinykv\nVersion: 0.1\n")
        z.writestr("tinykv-0.1.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                   "Tag: py3-none-any\n")
        z.writestr("tinykv-0.1.dist-info/RECORD", "")
    return path


def test_install_kvpress_bundle_into_its_own_target(tmp_path):
    bundle = tmp_path / "kvpress"
    bundle.mkdir()
    _tiny_wheel(bundle)
    (bundle / "tokenizer.json.xz").write_bytes(lzma.compress(b'{"tok": 1}'))
    (bundle / "tokenizer_config.json").write_text("{}")
    site = tmp_path / "kvsite"
    result = _install(bundle, site)
    assert result.returncode == 0, result.stderr
    assert (site / "tinykv" / "__init__.py").exists() and (site / ".installed-kvpress").exists()
    assert (site / "gemma-tok" / "tokenizer.json").read_bytes() == b'{"tok": 1}'
    assert (site / "gemma-tok" / "tokenizer_config.json").read_text() == "{}"
    assert _install("--check", site).stdout.splitlines()[-1] == "bundle kvpress: installed"


def test_install_gemma6tok_unpacks_its_tokenizer(tmp_path):
    bundle = tmp_path / "gemma6tok"
    bundle.mkdir()
    (bundle / "gemma.gguf.part5").write_bytes(b"\x05" * 10)
    (bundle / "tokenizer.json.xz").write_bytes(lzma.compress(b"T"))
    (bundle / "tokenizer_config.json").write_text("C")
    site = tmp_path / "site"
    assert _install(bundle, site).returncode == 0
    assert (site / "gemma-parts" / "gemma.gguf.part5").exists()
    assert (site / "gemma-tok" / "tokenizer.json").read_bytes() == b"T"

