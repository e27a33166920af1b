"""The repository's layout: nothing in it shadows an installed package from any working directory, and the
top-level kernels/ and patches/ folders are importable only as sgl_evict.kernels and sgl_evict.patches."""

import importlib.metadata
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OURS = {"sgl_evict", "bench"}  # the repository's own import names


def _run(code: str, cwd: Path, pythonpath: list[str] | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(pythonpath)
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def test_the_repository_root_holds_no_importable_name_but_its_own():
    importable = {p.stem for p in ROOT.glob("*.py")} | {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    assert importable <= OURS, f"importable from the repository root: {sorted(importable - OURS)}"


def test_no_name_importable_from_the_root_or_the_tests_is_an_installed_distributions():
    installed = importlib.metadata.packages_distributions()
    ours = {"sgl-evict", "sgl_evict"}
    # tests/ and each test folder are on sys.path (pyproject's pythonpath, rootdir-based import): their modules
    # count as top-level names too
    names = OURS | {p.stem for p in (ROOT / "tests").rglob("*.py") if "fake_sglang" not in p.parts}
    clashes = {n: installed[n] for n in names if n in installed and not set(installed[n]) <= ours}
    assert not clashes, f"these names would shadow installed packages: {clashes}"


@pytest.mark.parametrize("name", ["kernels", "patches"])
def test_an_installed_package_of_a_folders_name_wins_from_the_repository_root(tmp_path, name):
    """HF's `kernels` (pulled in by transformers) was shadowed by kernels/ when Python ran from the root."""
    site = tmp_path / "site"
    (site / name).mkdir(parents=True)
    (site / name / "__init__.py").write_text("INSTALLED = True\n")
    proc = _run(f"import {name}; print({name}.INSTALLED)", ROOT, [str(site)])
    assert proc.returncode == 0 and proc.stdout.strip() == "True", proc.stderr[-2000:]


def test_kernels_and_patches_import_from_the_repository_root_and_from_elsewhere(tmp_path):
    code = ("import sgl_evict.kernels.paged_scoring as k, sgl_evict.patches.server_args as p; "
            "print(k.__file__); print(p.__file__)")
    for cwd in (ROOT, tmp_path):
        proc = _run(code, cwd, [str(ROOT)])
        assert proc.returncode == 0, proc.stderr[-2000:]
        kernel, patch = (Path(line).resolve() for line in proc.stdout.split())
        assert kernel == ROOT / "kernels" / "paged_scoring.py" and patch == ROOT / "patches" / "server_args.py"


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git to copy the tracked tree")
def test_the_wheel_carries_kernels_and_patches_inside_sgl_evict(tmp_path):
    pytest.importorskip("setuptools")
    src = tmp_path / "src"
    # a copy of the tracked files (symbolic links kept as links), so the build leaves the checkout untouched
    files = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           check=True, capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        if rel.startswith(("bench/results/", "docs/img/")) or not os.path.lexists(ROOT / rel):
            continue
        dest = src / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if (ROOT / rel).is_symlink():
            os.symlink(os.readlink(ROOT / rel), dest)
        else:
            shutil.copy2(ROOT / rel, dest)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("sgl_evict-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder in ("kernels", "patches"):
        expected = {f"sgl_evict/{folder}/{p.name}" for p in (ROOT / folder).glob("*.py")}
        assert expected and expected <= names, sorted(expected - names)
    assert not any(n.startswith(("kernels/", "patches/", "bench/")) for n in names)
