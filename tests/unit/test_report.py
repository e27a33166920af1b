"""Summaries, tables, plots and CLI argument errors (no model needed)."""

import json

import pytest

from sgl_evict.cli import main
from sgl_evict.eval.report import format_table, plot, summarize, write_json
from sgl_evict.eval.runner import FULL, RunRecord


def _records():
    rs = [RunRecord("niah_single", s, FULL, FULL, 1.0, 1.0, 0.0, 100, [100], "x") for s in (0, 1)]
    for s in (0, 1):
        for b, score in (("0.1", 0.0), ("0.5", 1.0)):
            rs.append(RunRecord("niah_single", s, "snapkv", b, score if s == 0 else 1.0, 0.5, 0.2 * s, 100,
                                [10 if b == "0.1" else 50], "y"))
    return rs


def test_summary_means_over_samples():
    summary = summarize(_records())
    assert summary["snapkv"]["0.1"]["score"] == pytest.approx(0.5)
    assert summary["snapkv"]["0.5"]["score"] == pytest.approx(1.0)
    assert summary["snapkv"]["0.1"]["kl"] == pytest.approx(0.1)
    assert summary["snapkv"]["0.1"]["kept_fraction"] == pytest.approx(0.1)
    assert summary["snapkv"]["0.1"]["n"] == 2
    assert summary[FULL][FULL]["score"] == 1.0


def test_table_orders_budgets_and_shows_ceiling():
    table = format_table(summarize(_records()), "score")
    lines = table.splitlines()
    assert lines[1].split() == ["policy", "0.1", "0.5"]
    assert lines[3].split() == ["snapkv", "0.500", "1.000"]
    assert lines[4].split() == ["full", "cache", "1.000", "1.000"]


def test_json_and_plot_written(tmp_path):
    records = _records()
    write_json(tmp_path / "r.json", {"context_tokens": 100}, records, {"command": "x"})
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["command"] == "x" and len(doc["records"]) == len(records)
    plot(summarize(records), tmp_path / "p.png", "test")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv,message", [
    (["eval", "--budgets", "0.1,2.5"], "invalid budget '2.5'"),
    (["eval", "--tasks", "qa"], "unknown task 'qa'"),
    (["eval", "--policies", "snapkv,h2o"], "unknown policy 'h2o'"),
    (["eval", "--policies", "judgeq"], "needs --soft-tokens"),
    (["eval", "--samples", "0"], "samples per task must be >= 1"),
    (["eval", "--layer-groups", "2"], "layer groups (2) need granularity per_layer"),
    (["eval", "--model", "/nonexistent/model"], "neither 'gemma3-270m' nor a local checkpoint folder"),
])
def test_cli_rejects_bad_arguments_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_lists_policies(capsys):
    assert main(["policies", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in rows} >= {"snapkv", "laq", "dapq", "laprox", "judgeq"}
    assert next(r for r in rows if r["name"] == "laq")["needs"] == ["lookahead_queries", "window_queries"]


def test_report_redraws_from_json(tmp_path, capsys):
    write_json(tmp_path / "r.json", {"context_tokens": 100, "tasks": ["niah_single"], "granularity": "uniform"},
               _records(), {"model": "tiny"})
    assert main(["report", str(tmp_path / "r.json"), "--plot", str(tmp_path / "again.png")]) == 0
    assert "snapkv      0.500  1.000" in capsys.readouterr().out
    assert (tmp_path / "again.png").read_bytes()[:4] == b"\x89PNG"


def test_report_missing_file_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["report", str(tmp_path / "nope.json")])
    assert "results file not found" in capsys.readouterr().err
