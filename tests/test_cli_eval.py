"""`sgl-evict eval` end to end on a tiny random checkpoint with a word-level tokenizer, written to a temp folder."""

import json

import pytest

transformers = pytest.importorskip("transformers")

from sgl_evict import Budget
from sgl_evict.cli import main


def test_eval_writes_json_plot_and_table(checkpoint, tmp_path, capsys):
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    code = main(["eval", "--model", str(checkpoint), "--tasks", "niah_single,kv_retrieval", "--context", "300",
                 "--samples", "2", "--policies", "snapkv,laq,streaming", "--budgets", "0.1,0.5", "--window", "8",
                 "--max-new-tokens", "4", "--fidelity-tokens", "6", "--out", str(out), "--plot", str(png),
                 "--no-progress"])
    assert code == 0
    doc = json.loads(out.read_text())
    # 2 tasks x 2 samples x (1 full + 3 policies x 2 budgets)
    assert len(doc["records"]) == 4 * 7
    assert set(doc["summary"]) == {"full", "snapkv", "laq", "streaming"}
    assert doc["summary"]["snapkv"]["0.1"]["n"] == 4
    for r in doc["records"]:
        assert r["seq_len"] <= 300
        if r["policy"] != "full":
            expected = max(Budget.parse(r["budget"]).num_tokens(r["seq_len"]), 8 + 4)  # window 8 + 4 sinks
            assert r["kept_tokens"] == [expected] * 2
    assert doc["command"].startswith("sgl-evict eval") and "versions" in doc
    assert png.read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "task accuracy" in printed and "top-1 agreement" in printed and "full cache" in printed
