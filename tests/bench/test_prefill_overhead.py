"""bench/gpu/prefill_overhead.py: plan, summary, table, and the whole script against tests/fake_sglang."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.gpu import prefill_overhead as po

ROOT = Path(__file__).resolve().parents[2]
# bench is a package of the repository root, run as `python -m bench.gpu.prefill_overhead`
BENCH_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def test_plan_interleaves_policies_and_prompts_never_repeat():
    runs = po.plan_runs([64, 128], [2], ["none", "snapkv"], 2)
    assert [r.policy for r in runs] == ["none", "snapkv"] * 4
    assert [r.length for r in runs] == [64] * 4 + [128] * 4
    prompts = {tuple(po.prompt_ids(r, 0, (100, 1000))) for r in runs}
    assert len(prompts) == len(runs)  # no request can hit another's prefix
    assert po.prompt_ids(runs[0], 0, (100, 1000)) == po.prompt_ids(runs[0], 0, (100, 1000))


def test_warmup_rounds_come_first_and_stay_out_of_the_medians():
    runs = po.plan_runs([64], [2], ["none", "snapkv"], 2, warmup=1)
    assert [r.repeat for r in runs] == [-1, -1, 0, 0, 1, 1]
    records = {r.key: {"error": None, "ttft_s": 0.1, "latency_s": 9.0 if r.repeat < 0 else 1.0} for r in runs}
    s = po.summarize(records, runs)
    assert s["none/64/2"]["latency_s"] == 1.0 and s["snapkv/64/2"]["n"] == 2
    assert s["cold"] == {"none/64/2": [9.0], "snapkv/64/2": [9.0]}


def test_summary_takes_medians_and_the_overhead_over_none():
    runs = po.plan_runs([64], [2], ["none", "snapkv"], 3)
    lat = {"none": [1.0, 1.2, 5.0], "snapkv": [1.1, 1.5, 1.3]}
    records = {r.key: {"error": None, "ttft_s": 0.5, "latency_s": lat[r.policy][r.repeat]} for r in runs}
    records[runs[-1].key] = {"error": "boom", "ttft_s": None, "latency_s": None}  # snapkv's third: left out
    s = po.summarize(records, runs)
    assert s["none/64/2"]["latency_s"] == 1.2 and s["none/64/2"]["overhead_vs_none"] == 0
    assert s["snapkv/64/2"]["n"] == 2 and s["snapkv/64/2"]["latency_s"] == pytest.approx(1.3)
    assert s["snapkv/64/2"]["overhead_vs_none"] == pytest.approx(1.3 / 1.2 - 1)
    table = po.markdown_table(s, ["none", "snapkv", "laq"], [64], 2).splitlines()
    assert table[2] == "| none | 1200 |" and table[3] == "| snapkv | 1300 (+8.3%) |" and table[4] == "| laq | - |"


def test_runs_evict_then_plain_against_a_fake_server(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "fake_sglang"), str(ROOT),
                                                        os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "bench.gpu.prefill_overhead", "--out", str(out),
                           "--lengths", "300,600", "--policies", "none,snapkv,laq", "--new-tokens", "2,4",
                           "--repeats", "2", "--model", "llama-3.2-1b", "--server-extra=--disable-cuda-graph",
                           "--evict-extra=--kv-evict-granularity per_layer"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    doc = json.loads((out / "prefill_overhead.json").read_text())
    evict, plain = doc["configs"]["evict"], doc["configs"]["plain"]
    # one cold round (warm-up) before the two measured ones, kept out of the medians
    assert len(evict["records"]) == 3 * 2 * 2 * 3 and len(plain["records"]) == 3 * 2 * 2
    assert set(doc["summary"]["cold"]) == {f"{p}/{n}/{t}" for p in ("none", "snapkv", "laq", "plain")
                                           for n in (300, 600) for t in (2, 4)}
    assert all(row["n"] == 2 for name, row in doc["summary"].items() if name != "cold")
    assert "--kv-evict-policy snapkv" in evict["server_command"] and "--kv-evict" not in plain["server_command"]
    assert "--disable-cuda-graph" in evict["server_command"] and "--disable-cuda-graph" in plain["server_command"]
    assert "--kv-evict-granularity per_layer" in evict["server_command"]
    assert plain["env"] == {"SGLANG_PLUGINS": "not-sgl-evict"}
    assert all(r["error"] is None and r["output_tokens"] == r["max_new_tokens"] for r in evict["records"].values())
    assert all(len(r["output_ids"]) == r["output_tokens"] for r in evict["records"].values())
    assert set(doc["summary"]) == {f"{p}/{n}/{t}" for p in ("none", "snapkv", "laq", "plain")
                                   for n in (300, 600) for t in (2, 4)} | {"cold"}
    # every evicting request carried its policy; plain SGLang's carried none
    sent = [line[len("[fake] custom_params "):line.rindex(" prompt")]
            for line in (out / "server-evict.log").read_text().splitlines() if line.startswith("[fake] custom_params")]
    assert sorted(json.loads(s)["kv_evict"]["policy"] for s in sent) == sorted(["laq", "none", "snapkv"] * 12)
    assert "custom_params" not in (out / "server-plain.log").read_text()
    assert "| snapkv | " in proc.stdout


def test_bad_arguments_fail_with_a_message(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench.gpu.prefill_overhead", "--policies",
                           "snapkv"], cwd=tmp_path, env=BENCH_ENV, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "must include none" in proc.stderr and "Traceback" not in proc.stderr


def test_deadline_starts_no_server_and_still_writes_the_json(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "bench.gpu.prefill_overhead", "--out", str(out),
                           "--deadline", "0", "--model", "llama-3.2-1b"],
                          cwd=tmp_path, env=BENCH_ENV, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    doc = json.loads((out / "prefill_overhead.json").read_text())
    assert {c["error"] for c in doc["configs"].values()} == {"not started: deadline reached"}
    assert not list(out.glob("server-*.log"))
