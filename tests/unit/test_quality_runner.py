"""sgl_evict.quality runner and report against a fake SGLang server on 127.0.0.1.

The fake speaks SGLang 0.5.17's ``/generate`` (token ids in and out, ``meta_info`` with ``cached_tokens`` and
``finish_reason``, 400 for a refused override). Its "model" reads the answer out of the prompt (a perfect
retriever over a character tokenizer), and "evicts" by answering wrong on a fixed share of the requests of arms
with a budget under 0.2; it reports as cached the longest prefix it has seen in the request's ``extra_key``.
"""

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from sgl_evict.quality import command
from sgl_evict.quality.client import SGLangClient
from sgl_evict.quality.report import load_records, markdown_tables, plot, summarize
from sgl_evict.quality.runner import REFERENCE, Arm, QualityConfig, Tokens, run_quality

BOS, EOS, OFFSET = 1, 2, 10
CTX = 1600  # characters: the fake tokenizer's tokens


class CharTokenizer:
    """The HF tokenizer calls Tokens uses, one id per character."""

    bos_token_id, eos_token_id = BOS, EOS

    def __call__(self, text, add_special_tokens=False):
        class Encoded:
            input_ids = [ord(c) + OFFSET for c in text]
        return Encoded()

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i - OFFSET) for i in ids if i >= OFFSET)


def retrieve(prompt: str) -> str:
    """The answer a perfect reader gives to the prompt's last question (of the forms the test sends)."""
    q = prompt[prompt.rindex("Question:"):] if "Question:" in prompt else prompt[prompt.rindex("\n"):]
    m = re.search(r'The value of "([^"]+)" is "$', q)
    if m:
        return re.search(rf'"{m.group(1)}": "([^"]+)"', prompt).group(1) + '"'
    m = re.search(r"The special magic number for (\S+) is:$", q)
    if m:
        return " " + re.search(rf"special magic numbers for {re.escape(m.group(1))} is: (\d+)\.", prompt).group(1)
    m = re.search(re.escape(q[q.rindex("Answer: ") + len("Answer: "):]) + r" (\S+?)\.(\s|$)", prompt)
    return " " + m.group(1) + "." if m else " ?"  # RULER's multi-value tasks: beyond this reader


class FakeSGLang:
    def __init__(self, fail_after: int | None = None):
        self.requests: list[dict] = []
        self.seen: dict[str, list[list[int]]] = {}
        self.lock = threading.Lock()
        self.fail_after = fail_after
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                self._reply(200, {"version": "0.5.17-fake", "model_path": "fake", "kv_evict_policy": "snapkv",
                                  "attention_backend": "triton"})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
                status, reply = fake.generate(body)
                self._reply(status, reply)

            def _reply(self, status, reply):
                data = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def generate(self, body: dict):
        ids, params = body["input_ids"], body["sampling_params"]
        kv = params.get("custom_params", {}).get("kv_evict")
        key = body.get("extra_key", "")
        with self.lock:
            self.requests.append(body)
            if self.fail_after is not None and len(self.requests) > self.fail_after:
                return 503, {"error": {"message": "gone"}}
            cached = max((_common(ids, p) for p in self.seen.get(key, [])), default=0)
            self.seen.setdefault(key, []).append(ids)
        if kv and kv["policy"] not in ("none", "snapkv", "laq"):
            return 400, {"error": {"message": f"policy: {kv['policy']!r} is not one of none, snapkv, laq"}}
        prompt = CharTokenizer().decode(ids)
        answer = retrieve(prompt)
        if kv and kv["policy"] != "none" and kv["budget"] < 0.2 and len(ids) % 3 == 0:
            answer = " wrong."
        text = (answer + "\nmore text that follows the answer" * 3)[:params["max_new_tokens"]]
        out = [ord(c) + OFFSET for c in text]
        return 200, {"text": text, "output_ids": out,
                     "meta_info": {"prompt_tokens": len(ids), "cached_tokens": cached,
                                   "finish_reason": {"type": "length", "length": len(out)}}}

    def close(self):
        self.httpd.shutdown()


def _common(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@pytest.fixture
def server():
    s = FakeSGLang()
    yield s
    s.close()


def config(**kw):
    base = dict(families=["single", "doc_qa", "agent_trace", "shared_system"], contexts=[CTX], samples=4,
                arms=[Arm.parse("snapkv@0.1"), Arm.parse("laq@0.2+history=keep")], seed=11, turns=3,
                group_size=2, horizon=48, concurrency=4)
    base.update(kw)
    return QualityConfig(**base)


def test_every_request_once_turns_extend_the_reference_history(server, tmp_path):
    cfg = config()
    records = run_quality(cfg, SGLangClient(server.url), Tokens(CharTokenizer()), tmp_path)
    turns = 4 * 1 + 4 * 3 + 4 * 3 + 4 * 1  # single, doc_qa, agent_trace, shared_system (2 groups of 2)
    assert len(records) == len(server.requests) == turns * 3
    assert not [r for r in records if r.error]
    ref = {(r.family, r.index, r.turn): r for r in records if r.arm == REFERENCE}
    by_key = {}
    for body in server.requests:
        by_key.setdefault(body["extra_key"], []).append(body["input_ids"])
    for r in records:
        if r.family in ("doc_qa", "agent_trace") and r.turn > 0:
            prev = ref[(r.family, r.index, r.turn - 1)]
            # this turn's prompt = the previous prompt + the reference's answer + this turn's text
            sent = [b["input_ids"] for b in server.requests if len(b["input_ids"]) == r.prompt_tokens]
            assert any(ids[:prev.prompt_tokens + len(prev.answer_ids)][-len(prev.answer_ids):] == prev.answer_ids
                       for ids in sent)
            assert r.cached_tokens >= prev.prompt_tokens  # the server matched the previous turn's prompt
    # the perfect reader answers everything under the full cache (RULER's multi-value tasks aside)
    assert all(r.correct for r in records if r.arm == REFERENCE and r.family != "single")
    assert sum(r.correct for r in records if r.arm == REFERENCE and r.family == "single") == 2


def test_requests_carry_their_arm_and_each_conversation_its_own_namespace(server, tmp_path):
    run_quality(config(families=["doc_qa", "shared_system"]), SGLangClient(server.url), Tokens(CharTokenizer()),
                tmp_path)
    sent = {(json.dumps(b["sampling_params"].get("custom_params")), b["extra_key"]) for b in server.requests}
    kinds = {json.loads(p)["kv_evict"]["policy"] for p, _ in sent}
    assert kinds == {"none", "snapkv", "laq"}
    laq = [json.loads(p)["kv_evict"] for p, _ in sent if '"laq"' in p]
    assert all(k == {"policy": "laq", "budget": 0.2, "history": "keep"} for k in laq)
    assert all(b["sampling_params"]["max_new_tokens"] == 48 and b["sampling_params"]["ignore_eos"]
               and b["sampling_params"]["temperature"] == 0 for b in server.requests)
    keys = {k for _, k in sent}
    # doc_qa: 4 conversations x 3 arms; shared_system: 2 groups x 3 arms
    assert len(keys) == 4 * 3 + 2 * 3
    assert all(k.count(":") >= 6 for k in keys)


def test_shared_system_sessions_inherit_the_first_sessions_prefix(server, tmp_path):
    records = run_quality(config(families=["shared_system"]), SGLangClient(server.url), Tokens(CharTokenizer()),
                          tmp_path)
    for r in records:
        if r.meta["order"] == 0:
            assert r.cached_tokens == 0
        else:  # the whole system prompt came from the group's first session, in the same namespace
            assert r.cached_tokens > 0.9 * r.prompt_tokens - 120


def test_summary_counts_retention_pairs_and_fidelity(server, tmp_path):
    records = run_quality(config(), SGLangClient(server.url), Tokens(CharTokenizer()), tmp_path)
    summary = summarize(load_records(tmp_path / "records.jsonl"), horizon=48)
    snap = summary["cells"][f"doc_qa/{CTX}/snapkv@0.1"]
    ref = summary["cells"][f"doc_qa/{CTX}/reference"]
    wrong = sum(1 for r in records if r.family == "doc_qa" and r.arm == "snapkv@0.1" and not r.correct)
    assert ref["accuracy"]["value"] == 1.0 and snap["n"] == 12
    assert wrong > 0 and snap["paired"]["only_reference"] == wrong and snap["paired"]["only_arm"] == 0
    assert snap["retention"]["k"] == 12 - wrong and snap["retention"]["n"] == 12
    assert snap["retention"]["low"] < snap["retention"]["value"] <= snap["retention"]["high"]
    laq = summary["cells"][f"doc_qa/{CTX}/laq@0.2+history=keep"]
    assert laq["retention"]["value"] == 1.0 and laq["fidelity"]["identical"] == 1.0
    assert snap["fidelity"]["identical"] < 1.0
    assert set(summary["turns"]) >= {f"doc_qa/{CTX}/snapkv@0.1/turn{k}" for k in (1, 2, 3)}
    assert set(summary["order"]) >= {f"shared_system/{CTX}/reference/first", f"shared_system/{CTX}/reference/later"}
    best = summary["smallest_budgets"]["doc_qa/laq+history=keep"]
    assert best["reached"] == "0.2" and best["tried"] == ["0.2"]
    table = markdown_tables(summary, protected_tail=0)
    assert f"### doc_qa, {CTX} tokens" in table and "| reference | 1.00" in table
    smallest = table[table.index("### Smallest budget tried"):]
    assert f"| doc_qa, {CTX} tokens | laq+history=keep | 0.2 | 1.00 [" in smallest
    assert f"| doc_qa, {CTX} tokens | snapkv | none | - | no | 0.1 |" in smallest  # some answers lost at 0.1
    plot(summary, tmp_path / "q.png")
    assert (tmp_path / "q.png").stat().st_size > 0


def test_a_refused_arm_is_recorded_as_errors_not_as_wrong_answers(server, tmp_path):
    cfg = config(families=["single"], arms=[Arm.parse("bogus@0.1")])
    run_quality(cfg, SGLangClient(server.url), Tokens(CharTokenizer()), tmp_path)
    summary = summarize(load_records(tmp_path / "records.jsonl"))
    cell = summary["cells"][f"single/{CTX}/bogus@0.1"]
    assert cell["errors"] == 4 and cell["n"] == 0 and "is not one of" in cell["first_error"]


def test_resume_sends_only_the_missing_requests(server, tmp_path):
    cfg = config(families=["single"], samples=4)
    run_quality(cfg, SGLangClient(server.url), Tokens(CharTokenizer()), tmp_path)
    path = tmp_path / "records.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-5]) + "\n")
    second = FakeSGLang()
    try:
        records = run_quality(cfg, SGLangClient(second.url), Tokens(CharTokenizer()), tmp_path, resume=True)
        assert len(second.requests) == 5 and len(records) == len(lines)
    finally:
        second.close()


def test_resume_generates_only_the_prompts_it_asks(server, tmp_path, monkeypatch):
    from sgl_evict.quality import runner

    cfg = config(families=["single"], samples=4)
    run_quality(cfg, SGLangClient(server.url), Tokens(CharTokenizer()), tmp_path)
    path = tmp_path / "records.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows if not (r["index"] == 2 and r["arm"] == "snapkv@0.1")))
    generated = []
    real = runner.Job.conversations
    monkeypatch.setattr(runner.Job, "conversations", lambda job, *a: generated.append(job.index) or real(job, *a))
    second = FakeSGLang()
    try:
        records = run_quality(cfg, SGLangClient(second.url), Tokens(CharTokenizer()), tmp_path, resume=True)
        assert len(second.requests) == 1 and len(records) == len(rows)
        assert sorted(generated) == [0, 2]  # index 0: the up-front length check; 2: the one prompt asked
    finally:
        second.close()


def test_resume_asks_an_unfinished_conversation_again_from_its_first_turn(server, tmp_path):
    """An arm's later turn must start from its own compressed prefix, which a new server does not hold."""
    cfg = config(families=["doc_qa"], samples=1)
    run_quality(cfg, SGLangClient(server.url), Tokens(CharTokenizer()), tmp_path)
    path = tmp_path / "records.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    cut = [r for r in rows if not (r["arm"] == "snapkv@0.1" and r["turn"] == cfg.turns - 1)]
    assert len(cut) == len(rows) - 1
    other_seed = [dict(r, seed=r["seed"] + 1) for r in cut if r["arm"] == "snapkv@0.1"]  # not this run's to ask
    path.write_text("".join(json.dumps(r) + "\n" for r in cut + other_seed))
    second = FakeSGLang()
    try:
        records = run_quality(cfg, SGLangClient(second.url), Tokens(CharTokenizer()), tmp_path, resume=True)
        asked = second.requests
        assert len(asked) == cfg.turns  # the arm's three turns; the reference and the other arm not again
        assert {r["sampling_params"]["custom_params"]["kv_evict"]["policy"] for r in asked} == {"snapkv"}
        n = len(rows) + len(other_seed)
        assert len(records) == n and len({r.key for r in records}) == n
        again = [r for r in load_records(path) if r.arm == "snapkv@0.1" and r.seed == cfg.seed]
        assert sorted(r.turn for r in again) == list(range(cfg.turns))
        assert all(r.cached_tokens > 0 for r in again if r.turn > 0)  # each from the turn before it
        assert len(path.read_text().splitlines()) == n  # the stale turns left the file, the other seed's stayed
    finally:
        second.close()


def test_a_server_that_stops_answering_is_a_clear_error(tmp_path):
    gone = FakeSGLang(fail_after=3)
    try:
        with pytest.raises(RuntimeError, match="reference request failed"):
            run_quality(config(families=["doc_qa"], samples=1, concurrency=1), SGLangClient(gone.url),
                        Tokens(CharTokenizer()), tmp_path)
    finally:
        gone.close()


def test_the_command_runs_reports_and_refuses_bad_flags(server, tmp_path, monkeypatch, capsys):
    from sgl_evict.cli import main

    monkeypatch.setattr(command, "_tokens", lambda name: Tokens(CharTokenizer()))
    out = tmp_path / "q"
    args = ["quality", "--url", server.url, "--tokenizer", "x", "--families", "doc_qa", "--contexts", str(CTX),
            "--samples", "2", "--turns", "2", "--arms", "snapkv@0.1", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    doc = json.loads((out / "quality.json").read_text())
    assert doc["command"].startswith("sgl-evict quality") and doc["server_args"]["kv_evict_policy"] == "snapkv"
    assert doc["versions"]["sglang"] == "0.5.17-fake" and f"doc_qa/{CTX}/snapkv@0.1" in doc["summary"]["cells"]
    assert (out / "quality.md").exists() and (out / "quality.png").exists()
    assert main(["quality", "--report", "--out", str(out)]) == 0
    assert json.loads((out / "quality.json").read_text())["command"] == doc["command"]
    for bad, message in ((["--arms", "snapkv"], "write policy@budget"), (["--families", "nope"], "unknown family"),
                         (["--arms", "snapkv@x"], "invalid budget"), (["--samples", "0"], "at least 1")):
        with pytest.raises(SystemExit) as exit_info:
            main(args + bad)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["quality", "--url", "http://127.0.0.1:9", "--tokenizer", "x", "--out", str(tmp_path / "n")])
    assert "no SGLang server answers" in capsys.readouterr().err


def test_records_load_back_from_a_gzipped_copy(server, tmp_path):
    import gzip

    run_quality(config(families=["doc_qa"], samples=1), SGLangClient(server.url), Tokens(CharTokenizer()), tmp_path)
    plain = tmp_path / "records.jsonl"
    packed = tmp_path / "records.jsonl.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    assert load_records(packed) == load_records(plain) and len(load_records(packed)) == 3 * 3
    with pytest.raises(ValueError, match="no such file"):
        load_records(tmp_path / "missing.jsonl")


def test_no_turn_starts_after_the_deadline(server, tmp_path):
    assert run_quality(config(deadline_s=0.0), SGLangClient(server.url), Tokens(CharTokenizer()), tmp_path) == []
    assert server.requests == []


def test_a_single_panel_plot_is_wide_enough_for_its_title_and_legend(server, tmp_path):
    from PIL import Image

    run_quality(config(families=["single"]), SGLangClient(server.url), Tokens(CharTokenizer()), tmp_path)
    summary = summarize(load_records(tmp_path / "records.jsonl"))
    assert not summary["turns"]  # one accuracy panel, no per-turn panel
    plot(summary, tmp_path / "q.png")
    assert Image.open(tmp_path / "q.png").width >= 9 * 110  # 9 inches at the plot's 110 dpi


def test_report_merges_records_files_one_answer_per_request(server, tmp_path, capsys):
    import dataclasses

    from sgl_evict.cli import main

    run_quality(config(families=["doc_qa"], samples=1), SGLangClient(server.url), Tokens(CharTokenizer()), tmp_path)
    records = load_records(tmp_path / "records.jsonl")
    failed = tmp_path / "failed.jsonl"  # a run whose first request failed, and one that holds the rest again
    failed.write_text(json.dumps(dataclasses.asdict(dataclasses.replace(records[0], error="boom"))) + "\n")
    merged = load_records(failed, tmp_path / "records.jsonl", tmp_path / "records.jsonl")
    assert sorted(r.key for r in merged) == sorted(r.key for r in records) and all(r.error is None for r in merged)
    out = tmp_path / "report"
    assert main(["quality", "--report", "--records", f"{failed},{tmp_path / 'records.jsonl'}", "--out", str(out)]) == 0
    whole = summarize(records)
    assert json.loads((out / "quality.json").read_text())["summary"] == json.loads(json.dumps(whole))
    for bad, message in ((["--records", str(failed)], "goes with --report"),
                         (["--report", "--records", str(tmp_path / "nope.jsonl")], "no such file")):
        with pytest.raises(SystemExit):
            main(["quality", *bad, "--out", str(out)])
        assert message in capsys.readouterr().err
