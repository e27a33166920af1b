"""bench/plot_decode_overhead.py: bars in a fixed order, a PNG from a summary, a message instead of a traceback."""

import json

from bench import plot_decode_overhead as plot


def _row(ms):
    return {"rounds": 3, "median_s": ms / 1e3, "min_s": ms / 1e3 - 1e-4, "max_s": ms / 1e3 + 1e-4}


SUMMARY = {"evict-overlap/none/1": _row(6.7), "plain/plain/1": _row(6.5), "evict/none/1": _row(7.9),
           "evict/none/64": _row(15.4), "plain/plain/64": _row(13.1)}


def test_bars_put_plain_first_and_the_overlap_servers_last():
    assert plot.bars(SUMMARY) == (["plain/plain", "evict/none", "evict-overlap/none"], [1, 64])


def test_draws_a_png(tmp_path):
    doc = tmp_path / "d.json"
    doc.write_text(json.dumps({"summary": SUMMARY, "model": "llama-3.1-8b", "device": "H100"}))
    assert plot.main([str(doc), "--png", str(tmp_path / "d.png")]) == 0
    assert (tmp_path / "d.png").read_bytes()[:4] == b"\x89PNG"


def test_unreadable_or_empty_results_are_named(tmp_path, capsys):
    assert plot.main([str(tmp_path / "missing.json"), "--png", str(tmp_path / "x.png")]) == 2
    (tmp_path / "empty.json").write_text(json.dumps({"summary": {}}))
    assert plot.main([str(tmp_path / "empty.json"), "--png", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "cannot read the results" in err and "no measured rounds" in err
