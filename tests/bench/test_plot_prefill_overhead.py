"""bench/plot_prefill_overhead.py: merged medians, overhead over none, table, plot, bad input."""

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
from bench import plot_prefill_overhead as ppo


def _doc(latencies: dict[str, float]) -> dict:
    summary = {k: {"n": 2, "ttft_s": v / 2, "latency_s": v} for k, v in latencies.items()}
    summary["cold"] = {k: [10 * v] for k, v in latencies.items()}
    return {"model": "m", "device": "d", "settings": {"budget": "0.1"}, "summary": summary}


EVICT = _doc({"none/4096/2": 0.1, "snapkv/4096/2": 0.11, "none/8192/2": 0.2, "snapkv/8192/2": 0.21})
PLAIN = _doc({"plain/4096/2": 0.095, "plain/8192/2": 0.2})


def test_overheads_and_table_from_two_runs():
    rows = ppo.medians(EVICT, PLAIN)
    assert "cold" not in rows  # warm-up rounds never enter the medians
    assert ppo.axes_of(rows) == (["none", "snapkv", "plain"], [4096, 8192], [2])
    assert ppo.overhead(rows, "snapkv", 4096, 2) == pytest.approx(0.1)
    assert ppo.overhead(rows, "plain", 4096, 2) == pytest.approx(-0.05)
    assert ppo.overhead(rows, "laq", 4096, 2) is None
    table = ppo.markdown_table(ppo.with_overheads(rows), *ppo.axes_of(rows)[:2], 2).splitlines()
    assert table[2] == "| none | 100 | 200 |" and table[3] == "| snapkv | 110 (+10.0%) | 210 (+5.0%) |"
    assert table[4] == "| plain | 95 (-5.0%) | 200 (+0.0%) |"


def test_cli_writes_the_png_and_refuses_bad_input(tmp_path, capsys):
    evict, plain = tmp_path / "e.json", tmp_path / "p.json"
    evict.write_text(json.dumps(EVICT))
    plain.write_text(json.dumps(PLAIN))
    png = tmp_path / "img" / "o.png"
    assert ppo.main([str(evict), "--plain", str(plain), "--png", str(png)]) == 0
    assert png.stat().st_size > 1000 and "| snapkv |" in capsys.readouterr().out
    (tmp_path / "bad.json").write_text("{")
    assert ppo.main([str(tmp_path / "bad.json")]) == 2
    assert "cannot read" in capsys.readouterr().err
