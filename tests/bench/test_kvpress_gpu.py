"""CPU checks of the kvpress peer's GPU-host path (issue 20): the host wheel list, run.py's --model / --shard, the
shards' merge, the host installer's own target and tokenizer, and gpu.sh's syntax. kvpress itself is not needed."""

import gzip
import json
import lzma
import re
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch

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


def test_run_takes_the_checkpoint_path_and_a_shard():
    from bench.peers.kvpress import run

    args = run.parse_args(["--model", "/tmp/gemma3-270m-hf", "--device", "cuda", "--shard", "3/8"])
    assert args.model == "/tmp/gemma3-270m-hf" and args.shard == (3, 8)
    assert run.default_out(args).name.endswith("_cuda_gemma3-270m_2k_shard3-of-8.json")
    assert run.parse_args([]).shard is None
    for bad in ("8/8", "x/2", "-1/2", "3"):
        with pytest.raises(SystemExit):
            run.parse_args(["--shard", bad])


def test_model_loader_names_the_missing_checkpoint(tmp_path):
    from bench.peers.kvpress.model import load

    with pytest.raises(SystemExit, match=str(tmp_path)):
        load(tmp_path, "cpu")


def test_write_json_leaves_no_partial_file(tmp_path):
    from bench.peers.kvpress import run

    path = tmp_path / "sub" / "x.json"
    run.write_json(path, {"a": 1})
    run.write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert [p.name for p in path.parent.iterdir()] == ["x.json"]


class CharTokenizer:
    """One token a character, after a BOS: enough for the prompt builder."""

    def __call__(self, text, return_tensors=None):
        ids = [2] + [ord(c) % 1000 for c in text]
        return type("Enc", (), {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids})()


def test_shards_together_are_the_unsharded_prompts():
    from bench.peers.kvpress.prompts import build_prompts

    tok = CharTokenizer()
    whole = build_prompts(tok, 700, 5, 7)
    shards = [build_prompts(tok, 700, 5, 7, (k, 3)) for k in range(3)]
    assert [p.key for p in shards[1]] == [whole[i].key for i in (1, 4)]
    joined = sorted((p for s in shards for p in s), key=lambda p: [q.key for q in whole].index(p.key))
    assert [(p.key, p.split, p.answers) for p in joined] == [(p.key, p.split, p.answers) for p in whole]
    assert all(torch.equal(a.ids, b.ids) for a, b in zip(joined, whole))
    with pytest.raises(ValueError):
        build_prompts(tok, 700, 5, 7, (3, 3))


def _record(prompt, method, correct, mode="question-agnostic", family="ours", budget=0.1):
    return dict(prompt=prompt, task="niah_single", mode=mode, family=family, method=method,
                budget=budget, n_keep=10, kept=[10, 10, 10], correct=correct, first_agree=1.0, top1_1_8=1.0,
                top1_9=0.9, kl_0=0.0, kl_1_8=0.1, kl_9=0.2, seconds=1.0)


def _records(key, correct):
    return [_record(key, "full", True, "default", "full", 1.0), _record(key, "snapkv", correct, "default"),
            _record(key, "full", True, family="full", budget=1.0), _record(key, "snapkv", correct)]


def _shard(k, n, keys, unfinished=None, sweep=None):
    recs = [r for i, key in enumerate(keys) for r in _records(key, i % 2 == 0)]
    if unfinished:
        recs += _records(unfinished, True)
    return {"what": "x", "settings": {"context": 2048, "prompts": 5, "budgets": "0.1"}, "seeds": {"eval": 1},
            "ours": {}, "presses": ["SnapKVPress(w64,k5)"], "compressed_layers": [5, 11, 17], "nearest": {},
            "shard": [k, n], "commands": [f"run --shard {k}/{n}"], "git_commit": "abc", "device": "H100",
            "versions": {"kvpress": "0.5.5"}, "sweep": sweep,
            "prompts": [{"key": key} for key in keys], "records": recs}


def test_merge_joins_shards_in_prompt_order():
    from bench.peers.kvpress.merge import merge

    a = _shard(0, 2, ["single/2048/1/0", "single/2048/1/2", "single/2048/1/4"], sweep={"ok": 1})
    b = _shard(1, 2, ["single/2048/1/1"], unfinished="single/2048/1/3")
    doc = merge([b, a])
    assert [p["key"] for p in doc["prompts"]] == [f"single/2048/1/{i}" for i in (0, 1, 2, 4)]
    # the unfinished prompt's records are dropped
    assert [r["prompt"] for r in doc["records"][::4]] == [p["key"] for p in doc["prompts"]]
    assert len(doc["records"]) == 16
    assert doc["summary"][0]["n"] == 4 and doc["sweep"] == {"ok": 1} and doc["git_commit"] == "abc"
    assert doc["shards"]["n"] == 2 and doc["shards"]["missing"] == [] and doc["shards"]["prompts"] == 4
    assert "shard" not in doc and len(doc["commands"]) == 2


def test_merge_refuses_mixed_settings_and_repeats():
    from bench.peers.kvpress.merge import merge

    a, b = _shard(0, 2, ["single/2048/1/0"]), _shard(1, 2, ["single/2048/1/1"])
    b["settings"] = dict(b["settings"], context=4096)
    with pytest.raises(ValueError, match="settings"):
        merge([a, b])
    c = _shard(1, 2, ["single/2048/1/1"])
    c["settings"] = dict(c["settings"], prompts=200)  # resumed with more prompts: allowed, the largest kept
    assert merge([a, c])["settings"]["prompts"] == 200
    with pytest.raises(ValueError, match="twice"):
        merge([a, _shard(0, 2, ["single/2048/1/2"])])
    with pytest.raises(ValueError, match="single/2048/1/0"):
        merge([a, _shard(1, 2, ["single/2048/1/0"])])
    with pytest.raises(ValueError, match="counts"):
        merge([a, _shard(1, 3, ["single/2048/1/1"])])


def test_merged_json_round_trips_gzipped(tmp_path, capsys):
    from bench.peers.kvpress.merge import main
    from bench.peers.kvpress.report import load_json

    paths = []
    for k, keys in ((0, ["single/2048/1/0"]), (1, ["single/2048/1/1"])):
        paths.append(tmp_path / f"s{k}.json")
        paths[-1].write_text(json.dumps(_shard(k, 2, keys)))
    out = tmp_path / "m.json.gz"
    assert main(["--out", str(out), *map(str, paths)]) == 0
    assert gzip.decompress(out.read_bytes())[:1] == b"{"
    assert load_json(out)["shards"]["per_shard"] == {"0/2": 1, "1/2": 1}
    assert "| ours | snapkv |" in capsys.readouterr().out


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


def test_gpu_script_parses():
    assert subprocess.run(["bash", "-n", str(PEER / "gpu.sh")]).returncode == 0
