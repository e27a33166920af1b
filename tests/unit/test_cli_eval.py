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


ARGS = ["--tasks", "niah_single", "--context", "300", "--samples", "2", "--policies", "snapkv,streaming",
        "--budgets", "0.1,0.5", "--window", "8", "--max-new-tokens", "4", "--fidelity-tokens", "6", "--no-progress"]


def test_an_interrupted_eval_resumes_from_its_records(checkpoint, tmp_path, capsys):
    out = tmp_path / "e.json"
    base = ["eval", "--model", str(checkpoint), *ARGS, "--out", str(out), "--plot", str(tmp_path / "e.png")]
    assert main(base) == 0
    journal = tmp_path / "e.records.jsonl"
    lines = journal.read_text().splitlines()
    assert len(lines) == 1 + 2 * 5 and json.loads(lines[0])["config"]["samples_per_task"] == 2
    first = json.loads(out.read_text())["records"]
    journal.write_text("\n".join(lines[:4]) + "\n")  # interrupted after 3 runs
    capsys.readouterr()
    assert main(base + ["--resume"]) == 0
    assert "resuming: 3 runs already done" in capsys.readouterr().err
    assert json.loads(out.read_text())["records"] == first and len(journal.read_text().splitlines()) == 11
    with pytest.raises(SystemExit) as exit_info:
        main(base + ["--resume", "--seed", "9"])
    assert exit_info.value.code == 2 and "written with other settings (seed)" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--model", "/"], "holds no config.json: not a Hugging Face checkpoint folder"),
    (["--device", "nonsense"], "--device: 'nonsense' is not a torch device"),
])
def test_bad_model_and_device_are_named(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", *ARGS, "--out", str(tmp_path / "x.json"), *flags])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and "Traceback" not in err


@pytest.mark.parametrize("flag, example", [("--out", "eval.json"), ("--plot", "eval.png")])
def test_an_output_path_that_is_a_folder_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch, flag,
                                                                           example):
    import sgl_evict.cli as cli

    monkeypatch.setattr(cli, "_load_model", lambda *a: pytest.fail("the model loaded before the check"))
    paths = {"--out": str(tmp_path / "x.json"), "--plot": str(tmp_path / "x.png"), flag: str(tmp_path)}
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", *ARGS, "--out", paths["--out"], "--plot", paths["--plot"]])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert f"{flag}: {tmp_path} is a folder; give a file in it, e.g. {tmp_path / example}" in err


def test_cuda_without_cuda_is_named(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit):
        main(["eval", *ARGS, "--out", str(tmp_path / "x.json"), "--device", "cuda"])
    assert "this machine has no CUDA device" in capsys.readouterr().err


def test_report_of_a_file_that_is_no_results_file_says_so(tmp_path, capsys):
    path = tmp_path / "notes.md"
    path.write_text("# not json\n")
    with pytest.raises(SystemExit):
        main(["report", str(path)])
    assert "is not a results file written by `sgl-evict eval`" in capsys.readouterr().err


def test_eval_help_gives_every_default(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "task seed (default: 0)" in text and "(default: uniform)" in text


def test_a_policy_variant_runs_with_its_options_under_its_own_name(checkpoint, tmp_path):
    out = tmp_path / "v.json"
    code = main(["eval", "--model", str(checkpoint), *ARGS[:6], "--policies", "laq,laq+reserve=1.5+lookahead_steps=2",
                 "--budgets", "0.1", "--window", "8", "--max-new-tokens", "4", "--fidelity-tokens", "6",
                 "--out", str(out), "--no-progress"])
    assert code == 0
    doc = json.loads(out.read_text())
    assert set(doc["summary"]) == {"full", "laq", "laq+reserve=1.5+lookahead_steps=2"}


@pytest.mark.parametrize("variant, message", [("laq+reserve=0.5", "reserve 0 (off) or at least 1"),
                                              ("laq+bogus=1", "has no option bogus"),
                                              ("laq+reserve", "an option is key=value")])
def test_a_bad_policy_variant_is_named_before_the_model_loads(tmp_path, capsys, variant, message):
    with pytest.raises(SystemExit):
        main(["eval", "--model", str(tmp_path / "missing"), "--policies", variant, "--out", str(tmp_path / "x.json")])
    assert message in capsys.readouterr().err
