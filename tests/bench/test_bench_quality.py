"""bench/gpu/quality.py against tests/fake_sglang (CPU): server flags, the run, the JSON it writes."""

import json
import os
import subprocess
import sys
from pathlib import Path

from bench.gpu.quality import server_args

ROOT = Path(__file__).resolve().parents[2]


def test_server_flags_per_granularity(tmp_path):
    uniform = server_args(tmp_path, 9000, "/x/soft.safetensors", "uniform", ["--max-running-requests", "64"])
    assert uniform[uniform.index("--attention-backend") + 1] == "triton"
    assert uniform[uniform.index("--kv-evict-soft-tokens") + 1] == "/x/soft.safetensors"
    assert uniform[-2:] == ["--max-running-requests", "64"] and "--kv-evict-granularity" not in uniform
    layered = server_args(tmp_path, 9000, "", "per_layer", [])
    assert "per_layer" in layered and "--disable-cuda-graph" in layered and "--kv-evict-soft-tokens" not in layered


def run_driver(tmp_path, checkpoint, out, *extra):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "fake_sglang"), str(ROOT),
                                                        os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "bench.gpu.quality", "--model", str(checkpoint), "--families",
                           "single,doc_qa", "--contexts", "400", "--samples", "2", "--turns", "2", "--arms",
                           "snapkv@0.1,laq@0.2", "--seed", "5", "--idle", "0", "--commit", "abc123", "--out",
                           str(out), *extra], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_runs_the_suite_against_a_fake_server_and_writes_its_results(tmp_path, checkpoint):
    out = tmp_path / "out"
    # --server-extra repeats: quality_many.sh splits a driver's arguments on spaces
    proc = run_driver(tmp_path, checkpoint, out, "--server-extra=--max-total-tokens=9000",
                      "--server-extra=--cuda-graph-max-bs=16")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    doc = json.loads((out / "quality.json").read_text())
    argv = json.loads((out / "server-quality.log").read_text().splitlines()[0])["argv"]
    assert argv[-2:] == ["--max-total-tokens=9000", "--cuda-graph-max-bs=16"]
    assert doc["commit"] == "abc123" and doc["config"]["seed"] == 5 and "--kv-evict-policy snapkv" in doc["server"]
    assert doc["requests"] == (2 * 1 + 2 * 2) * 3 and all(c["ok"] for c in doc["checks"].values())
    assert set(doc["summary"]["cells"]) == {f"{f}/400/{a}" for f in ("single", "doc_qa")
                                            for a in ("reference", "snapkv@0.1", "laq@0.2")}
    lines = (out / "records.jsonl").read_text().splitlines()
    assert len(lines) == doc["requests"] and (out / "quality.md").exists()
    sent = [json.loads(line[len("[fake] custom_params "):line.rindex(" prompt")])
            for line in (out / "server-quality.log").read_text().splitlines()
            if line.startswith("[fake] custom_params")]
    assert sorted(s["kv_evict"]["policy"] for s in sent) == sorted(["none", "snapkv", "laq"] * 6)


def test_resumes_from_several_record_files_merged(tmp_path, checkpoint):
    first = tmp_path / "first"
    assert run_driver(tmp_path, checkpoint, first).returncode == 0
    lines = (first / "records.jsonl").read_text().splitlines()
    (tmp_path / "a.jsonl").write_text("\n".join(lines[:10]) + "\n")
    (tmp_path / "b.jsonl").write_text("\n".join(lines[5:]) + "\n")  # overlapping: one answer per request
    out = tmp_path / "out"
    proc = run_driver(tmp_path, checkpoint, out, "--resume-from", f"{tmp_path / 'a.jsonl'},{tmp_path / 'b.jsonl'}")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert json.loads((out / "quality.json").read_text())["requests"] == len(lines)
    assert not any(line.startswith("[fake] custom_params")
                   for line in (out / "server-quality.log").read_text().splitlines())  # nothing asked again
    missing = run_driver(tmp_path, checkpoint, tmp_path / "x", "--resume-from", str(tmp_path / "nope.jsonl"))
    assert missing.returncode != 0 and "--resume-from" in missing.stderr and "Traceback" not in missing.stderr


def test_left_counts_what_the_resumed_records_leave(tmp_path, checkpoint):
    first = tmp_path / "first"
    assert run_driver(tmp_path, checkpoint, first).returncode == 0
    records = first / "records.jsonl"
    done = run_driver(tmp_path, checkpoint, tmp_path / "x", "--resume-from", str(records), "--left")
    assert done.returncode == 10 and "0 of 4 prompts left" in done.stdout, done.stdout + done.stderr
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())  # no server, nothing written
    rows = [json.loads(x) for x in records.read_text().splitlines()]
    dropped = [("doc_qa", 1, 1, "laq@0.2"), ("single", 0, 0, "reference")]  # (family, index, turn, arm)
    keep = [r for r in rows if (r["family"], r["index"], r["turn"], r["arm"]) not in dropped]
    assert len(keep) == len(rows) - 2
    (tmp_path / "part.jsonl").write_text("".join(json.dumps(r) + "\n" for r in keep))
    # one single-turn prompt lacks its reference; one conversation's arm stopped after its first turn
    left = run_driver(tmp_path, checkpoint, tmp_path / "y", "--resume-from", str(tmp_path / "part.jsonl"), "--left")
    assert left.returncode == 0 and "2 of 4 prompts left" in left.stdout, left.stdout + left.stderr
    missing = run_driver(tmp_path, checkpoint, tmp_path / "z", "--resume-from", str(tmp_path / "no.jsonl"), "--left")
    assert missing.returncode not in (0, 10) and "no such file" in missing.stderr and "Traceback" not in missing.stderr


def test_a_bad_setting_exits_naming_it_before_anything_is_written(tmp_path, checkpoint):
    for extra in ((), ("--left",)):
        out = tmp_path / f"bad{len(extra)}"
        bad = run_driver(tmp_path, checkpoint, out, "--arms", "snapkv@lots", *extra)
        assert bad.returncode not in (0, 10) and bad.stderr.strip().splitlines()[-1].startswith("quality: ")
        assert "Traceback" not in bad.stderr and not out.exists(), bad.stderr


def test_quality_many_skips_a_driver_with_nothing_left(tmp_path, checkpoint):
    first = tmp_path / "first"
    assert run_driver(tmp_path, checkpoint, first).returncode == 0
    args = (f"--model {checkpoint} --families single,doc_qa --contexts 400 --samples 2 --turns 2 "
            f"--arms snapkv@0.1,laq@0.2 --seed 5 --idle 0 --resume-from {first / 'records.jsonl'}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "fake_sglang"), str(ROOT),
                                                        os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu" / "quality_many.sh"), str(tmp_path / "q.tgz"),
                           "done", args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "== done: quality: 0 of 4 prompts left to ask" in proc.stdout and "driver exit" not in proc.stdout
    assert (tmp_path / "q.tgz").exists()
