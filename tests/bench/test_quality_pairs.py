"""bench/quality_pairs.py: two runs of the same quality-suite prompts, paired prompt by prompt."""

import dataclasses
import json

from bench.quality_pairs import compare, main
from sgl_evict.quality.runner import Record

BASE = Record("doc_qa", 8192, 7, 0, None, 0, "laq@0.1", ["x"], {}, 100, [1, 2], [1], "x", True, None, 0.1, None)


def rec(**changes) -> Record:
    return dataclasses.replace(BASE, **changes)


def write(path, records):
    path.write_text("".join(json.dumps(dataclasses.asdict(r)) + "\n" for r in records))
    return str(path)


def test_pairs_split_first_and_later_turns_and_count_discordant_prompts():
    a = [rec(turn=0), rec(turn=1, correct=False, cached_tokens=80), rec(index=1, turn=1, correct=False,
                                                                         cached_tokens=60)]
    b = [rec(turn=0), rec(turn=1), rec(index=1, turn=1)]
    rows = compare(a, b)
    assert rows["doc_qa/laq@0.1/first"]["n"] == 1 and rows["doc_qa/laq@0.1/first"]["only_a"] == 0
    later = rows["doc_qa/laq@0.1/later"]
    assert (later["n"], later["a"]["k"], later["b"]["k"], later["only_a"], later["only_b"]) == (2, 0, 2, 0, 2)
    assert later["mcnemar_p"] == 0.5 and abs(later["a_cached_fraction"] - 0.7) < 1e-9


def test_prompts_of_other_lengths_errors_and_other_families_are_not_paired():
    a = [rec(turn=1), rec(turn=2), rec(index=3, turn=1), rec(family="single", turn=0)]
    b = [rec(turn=1, prompt_tokens=101), rec(turn=2, error="boom"), rec(index=3, turn=1), rec(family="single")]
    rows = compare(a, b, families={"doc_qa"})
    assert list(rows) == ["doc_qa/laq@0.1/later"] and rows["doc_qa/laq@0.1/later"]["n"] == 1


def test_shared_system_sessions_split_by_their_order_in_the_group():
    a = [rec(family="shared_system", group=0, index=0, meta={"order": 0}),
         rec(family="shared_system", group=0, index=1, meta={"order": 1})]
    rows = compare(a, list(a))
    assert set(rows) == {"shared_system/laq@0.1/first", "shared_system/laq@0.1/later"}


def test_command_prints_a_table_writes_json_and_plot_and_fails_clearly(tmp_path, capsys):
    a = write(tmp_path / "a.jsonl", [rec(turn=0), rec(turn=1, correct=False)])
    b = write(tmp_path / "b.jsonl", [rec(turn=0), rec(turn=1)])
    assert main([a, b, "--labels", "reused", "fresh", "--json", str(tmp_path / "p.json"),
                 "--png", str(tmp_path / "p.png")]) == 0
    assert "| doc_qa/laq@0.1/later | 1 | 0 (0.00" in capsys.readouterr().out
    assert json.loads((tmp_path / "p.json").read_text())["labels"] == ["reused", "fresh"]
    assert (tmp_path / "p.png").stat().st_size > 0
    assert main([a, str(tmp_path / "missing.jsonl")]) == 2
    other = write(tmp_path / "c.jsonl", [rec(index=9)])
    assert main([a, other]) == 1


def test_plot_takes_a_perfect_score_whose_interval_rounds_below_it(tmp_path):
    from bench.quality_pairs import plot

    rows = compare([rec(turn=1)] * 1, [rec(turn=1)])
    rows["doc_qa/laq@0.1/later"]["a"]["high"] = 0.9999999999999998  # as wilson(k=n) returns
    plot(rows, ("a", "b"), tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0
