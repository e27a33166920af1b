"""bench/gpu/throughput.py (against a fake ``sglang.launch_server``) and bench/plot_throughput.py, on CPU."""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

from bench.gpu import throughput
from bench.plot_throughput import markdown_table, plot


def test_llama_32_1b_config_has_the_model_card_numbers():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(**throughput.LLAMA_32_1B)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == \
        (2048, 16, 32, 8)
    assert (cfg.head_dim, cfg.intermediate_size, cfg.vocab_size) == (64, 8192, 128256)
    assert cfg.tie_word_embeddings is True
    rope = throughput.LLAMA_32_1B["rope_scaling"]
    assert rope["factor"] == 32.0 and rope["rope_type"] == "llama3"
    assert throughput.LLAMA_32_1B["rope_theta"] == 500000.0


def test_shared_duration_fits_two_servers_in_the_deadline():
    m = throughput.STOP_MARGIN_S
    # fast start: the requested duration fits
    assert throughput.shared_duration(110, 450, 90, 90) == 110
    # slow start: both get the equal share that ends at the deadline
    d = throughput.shared_duration(110, 450, 110, 110)
    assert d < 110 and 110 + d + m + 110 + d + m == pytest.approx(450)
    # a cold first start (JIT) is not expected again from the second server
    cap = throughput.SECOND_START_CAP_S
    d = throughput.shared_duration(110, 450, 200, 200)
    assert 200 + d + m + cap + d + m == pytest.approx(450)
    assert throughput.shared_duration(110, 450, 380, 380) == 10  # never below 10 s


def test_one_server_gets_the_whole_deadline():
    m = throughput.STOP_MARGIN_S
    assert throughput.shared_duration(300, 450, 200, 200, servers=1) == pytest.approx(450 - 200 - m)
    assert throughput.shared_duration(110, 450, 200, 200, servers=1) == 110
    assert throughput.shared_duration(300, 450, 445, 445, servers=1) == 10


def test_evictions_logged_totals(tmp_path):
    log = tmp_path / "server.log"
    log.write_text("noise\n[x] sgl-evict: request a1 kept 10 of 100 tokens, freed 90 slots, hid 0\n"
                   "[y] sgl-evict: request b2 kept 30 of 300 tokens, freed 250 slots, hid 20\nmore noise\n")
    ev = throughput.evictions_logged(log)
    assert ev == {"evicted_prefills": 2, "kept_tokens": 40, "logical_tokens": 400, "freed_slots": 340,
                  "kept_fraction": 0.1}
    log.write_text("nothing evicted\n")
    assert throughput.evictions_logged(log)["kept_fraction"] is None


def _summary(rps, tps, ttft, tpot, running, kv):
    q = lambda v: {"p50": v, "p90": 2 * v, "p99": 3 * v}
    return {"duration_s": 100, "requests_sent": 10, "requests_completed": 9, "requests_cut_at_deadline": 1,
            "errors": 0, "requests_per_s": rps, "output_tokens_per_s": tps, "prompt_tokens_mean": 5000,
            "ttft_s": q(ttft), "tpot_s": q(tpot), "latency_s": q(1.0), "cache_hit_rate": 0.8,
            "retracted_requests": 0, "peak_in_flight": 48, "peak_running_reqs": running,
            "mean_running_reqs": running / 2,
            "peak_used_kv_tokens": kv, "mean_used_kv_tokens": kv / 2, "max_total_kv_tokens": 120000}


def _doc():
    samples = lambda r, kv: [{"t_s": t, "in_flight": 10, "num_running_reqs": r, "num_used_tokens": kv}
                             for t in range(5)]
    return {"model": "llama-3.2-1b", "device": "test", "date": "2026-11-23", "settings": {"max_total_tokens": 120000},
            "configs": {"plain": {"summary": _summary(1.0, 200, 0.5, 0.01, 6, 118000), "samples": samples(6, 118000),
                                  "evictions": {"kept_fraction": None, "evicted_prefills": 0}},
                        "evict": {"summary": _summary(3.5, 700, 0.2, 0.012, 40, 90000), "samples": samples(40, 90000),
                                  "evictions": {"kept_fraction": 0.1, "evicted_prefills": 321}}}}


def test_plot_and_table_from_a_small_json(tmp_path):
    doc = _doc()
    png = tmp_path / "t.png"
    plot(doc, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    table = markdown_table(doc)
    lines = table.splitlines()
    assert lines[0].startswith("| config | req/s") and set(lines[1]) <= set("|- ")
    assert lines[2].startswith("| plain | 1.00 | 200 | 500 / 1000 / 1500 | 10 / 20 / 30 |")
    assert "| evict | 3.50 | 700 |" in lines[3] and "0.100 (321)" in lines[3]
    assert "evict / plain requests/s: 3.50x" in table


def test_plot_cli_and_failed_config(tmp_path):
    from bench.plot_throughput import main

    doc = _doc()
    doc["configs"]["evict"] = {"error": "not healthy"}
    path = tmp_path / "run.json"
    path.write_text(json.dumps(doc))
    assert main([str(path)]) == 0
    assert (tmp_path / "run.png").exists()
    assert "| evict | failed: not healthy |" in markdown_table(doc)


def test_plot_cli_reads_a_gzipped_json(tmp_path):
    from bench.plot_throughput import main

    path = tmp_path / "run.json.gz"
    path.write_bytes(gzip.compress(json.dumps(_doc()).encode()))
    assert main([str(path)]) == 0
    assert (tmp_path / "run.png").exists()


def _single(config: str, **settings) -> dict:
    doc = _doc()
    doc["configs"] = {config: doc["configs"][config]}
    doc["settings"] = {"max_total_tokens": 120000, "only": config, "out": f"/tmp/{config}", **settings}
    doc.update(command=f"throughput.py --only {config}", plan={"duration_s": 300}, wall_s=500,
               date=f"2026-11-2{3 + (config == 'evict')}T05:00:00+00:00")
    return doc


def test_merge_runs_of_one_comparison(tmp_path):
    from bench.plot_throughput import main, merge_runs, plot_title

    merged = merge_runs([_single("plain", duration=280), _single("evict", duration=248)])
    assert list(merged["configs"]) == ["plain", "evict"]
    assert [r["command"] for r in merged["runs"]] == ["throughput.py --only plain", "throughput.py --only evict"]
    assert "command" not in merged and "evict / plain requests/s: 3.50x" in markdown_table(merged)
    assert plot_title(merged) == "llama-3.2-1b (test), 2026-11-23, 2026-11-24"
    with pytest.raises(ValueError, match="more than one run"):
        merge_runs([_single("plain"), _single("plain")])
    with pytest.raises(ValueError, match=r"settings \['max_total_tokens'\]"):
        merge_runs([_single("plain"), _single("evict", max_total_tokens=240000)])
    paths = []
    for config in ("plain", "evict"):
        paths.append(tmp_path / f"{config}.json")
        paths[-1].write_text(json.dumps(_single(config)))
    both = tmp_path / "both.json"
    assert main([*map(str, paths), "--merged-json", str(both)]) == 0
    assert set(json.loads(both.read_text())["configs"]) == {"plain", "evict"} and (tmp_path / "both.png").exists()


def test_runs_plain_then_evict_against_a_fake_server(tmp_path):
    """The whole script, with ``python -m sglang.launch_server`` answered by tests/fake_sglang."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "fake_sglang"), str(ROOT),
                                                        os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "bench.gpu.throughput", "--out", str(out),
                           "--duration", "3", "--deadline", "120", "--concurrency", "3", "--turns", "2",
                           "--max-total-tokens", "5000", "--no-progress"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((out / "throughput.json").read_text())
    plain, evict = doc["configs"]["plain"], doc["configs"]["evict"]
    for c in (plain, evict):
        assert c["summary"]["requests_completed"] > 0 and c["summary"]["errors"] == 0
        assert c["summary"]["duration_s"] == pytest.approx(3, abs=0.3)
        assert "--max-total-tokens 5000" in c["server_command"] and "--load-format dummy" in c["server_command"]
        assert c["samples"] and c["alive_at_end"] and c["log_tracebacks"] == 0 and "log_tail" not in c
    assert "--kv-evict-policy snapkv --kv-evict-budget 0.1" in evict["server_command"]
    assert "--kv-evict" not in plain["server_command"]
    assert plain["env"] == {"SGLANG_PLUGINS": "not-sgl-evict"}
    assert evict["evictions"]["evicted_prefills"] > 0 and plain["evictions"]["evicted_prefills"] == 0
    assert evict["summary"]["cache_hit_rate"] > 0  # second turns hit the first turn's prompt + reply

    def times(name):
        lines = [json.loads(x) for x in (out / f"server-{name}.log").read_text().splitlines() if x.startswith("{")]
        return lines[0]["start"], lines[-1]["stop"]

    (_, p_stop), (e_start, _) = times("plain"), times("evict")
    assert p_stop < e_start, "the servers must run one after the other"
    assert json.loads((out / "server-plain.log").read_text().splitlines()[0])["SGLANG_PLUGINS"] == "not-sgl-evict"
    assert (out / "throughput.png").exists()
    assert "evict / plain requests/s" in proc.stdout
