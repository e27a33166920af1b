"""bench/gpu/bench_serving.py without a server: the client command lines it builds, the flags it relies on being the
ones its docstring quotes from SGLang 0.5.17, the parsing of what the client writes and prints, goodput, the server's
prefill totals, refusals before any server starts. The real client against a stub server, and the quoted flags
against SGLang's own source: tests/sglang/test_bench_serving_client.py."""

import json
import re
import shlex
from pathlib import Path

import pytest

from bench.gpu import bench_serving as bs
from bench.gpu import throughput

TRACE = Path("/tmp/trace.json")


def args_of(*flags):
    return bs.build_parser().parse_args(["--model", "/m/gemma", "--window", "20", *flags])


def flag_values(cmd):
    """{flag: value or True} of a command line (after the module name)."""
    rest = cmd[cmd.index("sglang.benchmark.serving") + 1:]
    out, i = {}, 0
    while i < len(rest):
        if i + 1 < len(rest) and not rest[i + 1].startswith("--"):
            out[rest[i]] = rest[i + 1]
            i += 2
        else:
            out[rest[i]] = True
            i += 1
    return out


def test_agentic_trace_runs_on_the_chat_backend_with_the_trace():
    f = flag_values(bs.client_command("agentic-trace", 0.5, 31600, args_of(), Path("/o/x.jsonl"), "t", TRACE))
    assert f["--backend"] == "sglang-oai-chat"  # the multi-turn replay asserts a chat backend
    assert f["--dataset-name"] == "agentic-trace" and f["--dataset-path"] == str(TRACE)
    assert f["--num-prompts"] == "10" and f["--request-rate"] == "0.5"  # 0.5 conversations/s x 20 s
    assert f["--sharegpt-output-len"] == "128" and f["--tokenizer"] == "/m/gemma"
    assert "--tokenize-prompt" not in f
    with pytest.raises(ValueError, match="trace"):
        bs.client_command("agentic-trace", 0.5, 31600, args_of(), Path("/o/x.jsonl"), "t", None)


def test_shared_prefix_fills_whole_groups_and_sends_text():
    f = flag_values(bs.client_command("generated-shared-prefix", 8, 31600, args_of("--gsp-groups", "16"),
                                      Path("/o/x.jsonl"), "t"))
    assert f["--backend"] == "sglang" and f["--gsp-num-groups"] == "16"
    assert f["--gsp-prompts-per-group"] == "10"  # 8/s x 20 s = 160 requests = 16 groups of 10
    assert f["--gsp-system-prompt-len"] == "4096" and f["--gsp-output-len"] == "128"
    assert "--tokenize-prompt" not in f and "--num-prompts" not in f  # the dataset asserts text prompts


def test_random_ids_sends_ids_of_long_prompts():
    f = flag_values(bs.client_command("random-ids", 2, 31600, args_of("--random-input-len", "24000"),
                                      Path("/o/x.jsonl"), "t"))
    assert f["--backend"] == "sglang" and f["--tokenize-prompt"] is True
    assert f["--num-prompts"] == "40" and f["--random-input-len"] == "24000" and f["--random-range-ratio"] == "0.5"


def test_every_run_is_cold_detailed_and_tagged():
    for dataset in bs.DATASETS:
        cmd = bs.client_command(dataset, 1, 31601, args_of("--client-extra", "--max-concurrency 8"),
                                Path("/o/x.jsonl"), "plain/x@1", TRACE)
        f = flag_values(cmd)
        assert f["--port"] == "31601" and f["--host"] == "127.0.0.1" and f["--output-file"] == "/o/x.jsonl"
        assert all(f.get(k) is True for k in ("--flush-cache", "--output-details", "--cache-report", "--disable-tqdm"))
        assert f["--tag"] == "plain/x@1" and f["--max-concurrency"] == "8" and f["--seed"] == "0"
        assert shlex.split(shlex.join(cmd)) == cmd  # the JSON's command line is the one run


def test_every_client_flag_used_is_one_the_docstring_quotes_from_sglang():
    quoted = set(re.findall(r'add_argument\("(--[a-z0-9-]+)"', bs.__doc__))
    args = args_of()
    used = set()
    for dataset in bs.DATASETS:
        used |= {x for x in bs.client_command(dataset, 1, 1, args, Path("/o"), "t", TRACE) if x.startswith("--")}
    assert used <= quoted, used - quoted


def test_requests_per_run_and_the_plan():
    assert bs.requests_for(0.5, 30) == 15 and bs.requests_for(0.01, 30) == 2 and bs.requests_for(2.2, 10) == 22
    args = args_of("--datasets", "random-ids,agentic-trace", "--random-rates", "6,2", "--trace-rates", "1")
    assert bs.run_plan(args) == [("random-ids", 2.0), ("random-ids", 6.0), ("agentic-trace", 1.0)]


PRINTED = """benchmark_args=Namespace(backend='sglang')
Starting warmup with 1 sequences...

============ Serving Benchmark Result ============
Backend:                                 sglang
Traffic request rate:                    8.0
Max request concurrency:                 not set
Successful requests:                     160
Benchmark duration (s):                  21.53
Request throughput (req/s):              7.43
Mean TTFT (ms):                          35.10
P90 TPOT (ms):                           6.20
---------------Time to First Token----------------
Cache hit rate:                          88.4%
==================================================
Trailing: 1
"""


def test_the_printed_result_block_is_parsed():
    got = bs.parse_printed(PRINTED)
    assert got == {"Backend": "sglang", "Traffic request rate": 8.0, "Max request concurrency": "not set",
                   "Successful requests": 160.0, "Benchmark duration (s)": 21.53, "Request throughput (req/s)": 7.43,
                   "Mean TTFT (ms)": 35.1, "P90 TPOT (ms)": 6.2, "Cache hit rate": 88.4}
    assert bs.parse_printed("no result here") == {}


def test_the_last_jsonl_record_is_read(tmp_path):
    p = tmp_path / "r.jsonl"
    assert bs.read_jsonl(p) is None
    p.write_text(json.dumps({"a": 1}) + "\n" + json.dumps({"a": 2}) + "\n")
    assert bs.read_jsonl(p) == {"a": 2}


def test_goodput_counts_requests_within_both_slos():
    record = {"duration": 10.0, "completed": 3, "request_throughput": 0.3,
              "errors": ["", "", "", "boom"], "ttfts": [0.5, 3.0, 0.5, 0.0], "output_lens": [11, 11, 11, 0],
              "itls": [[0.01] * 10, [0.01] * 10, [0.06] * 10, []], "cached_tokens": [5, 0, 7, 0],
              "cache_report": {"cache_hit_rate_pct": 12.0}}
    s = bs.summarize(record, slo_ttft_s=2.0, slo_tpot_s=0.05)
    # request 0 meets both; 1 is late to its first token; 2 decodes too slowly; 3 failed
    assert s["slo_met_requests"] == 1 and s["goodput_requests_per_s"] == pytest.approx(0.1)
    assert s["requests"] == 4 and s["failed"] == 1 and s["first_error"] == "boom" and s["cached_tokens"] == 12
    assert s["completed"] == 3 and s["cache_report"] == {"cache_hit_rate_pct": 12.0}
    assert bs.summarize({"errors": []}, 2.0, 0.05)["goodput_requests_per_s"] is None


def test_server_prefill_totals_from_its_log_lines():
    log = ("[2026] Prefill batch, #new-seq: 2, #new-token: 300, #cached-token: 100, token usage: 0.01, x\n"
           "[2026] Decode batch, #running-req: 2\n"
           "[2026] Prefill batch [12], #new-seq: 1, #new-token: 100, #cached-token: 500, token usage: 0.02\n")
    assert bs.prefill_totals(log) == {"batches": 2, "new_seqs": 3, "new_tokens": 400, "cached_tokens": 600,
                                      "hit_rate": 0.6}
    assert bs.prefill_totals("")["hit_rate"] is None


def test_evictions_from_the_plugins_log_lines():
    log = ("sgl-evict: request a1 kept 600 of 6000 tokens, freed 5400 slots\n"
           "sgl-evict: request b2 kept 516 of 900 tokens, freed 384 slots\nother line\n")
    assert bs.evictions_in(log) == {"evicted_prefills": 2, "kept_tokens": 1116, "logical_tokens": 6900,
                                    "kept_fraction": 1116 / 6900}
    assert bs.evictions_in("")["kept_fraction"] is None


def test_trace_prompt_tokens_sum_the_rounds_replayed():
    trace = {"conversations": [[{"prompt_tokens": 10}, {"prompt_tokens": 30}], [{"prompt_tokens": 5}], [{"x": 0}]]}
    assert bs.trace_prompt_tokens(trace, 2) == 45


def test_the_datasets_stub_and_the_client_environment(tmp_path, monkeypatch):
    root = bs.datasets_stub(tmp_path / "stub", force=True)
    assert (root / "datasets" / "__init__.py").exists()
    monkeypatch.setenv("PYTHONPATH", "/tmp/site")
    env = bs.client_env(root)
    assert env["PYTHONPATH"] == f"{root}:/tmp/site" and env["HF_HUB_OFFLINE"] == "1"
    assert "PYTHONPATH" not in bs.client_env(None) or bs.client_env(None)["PYTHONPATH"] == "/tmp/site"
    namespace = {}
    exec((root / "datasets" / "__init__.py").read_text(), namespace)
    with pytest.raises(RuntimeError, match="not installed"):
        namespace["load_dataset"]("x")


@pytest.mark.parametrize("flags,match", [
    (["--configs", "plain,evict-LAQ"], "evict-LAQ"),
    (["--datasets", "sharegpt"], "--datasets"),
    (["--gsp-rates", "0"], "--gsp-rates"),
    (["--trace-rates", "inf"], "--trace-rates"),
    (["--trace-turns", "3"], "--trace-turns"),
])
def test_bad_flags_are_refused_before_any_server_starts(flags, match, monkeypatch, tmp_path):
    monkeypatch.setattr(bs, "check_setup", lambda: pytest.fail("reached the server setup"))
    monkeypatch.setattr(bs, "ServerProcess", lambda *a, **k: pytest.fail("started a server"))
    with pytest.raises(SystemExit, match=match):
        bs.main([*flags, "--out", str(tmp_path)])


def test_a_client_that_does_not_start_stops_the_script_before_any_server(monkeypatch, tmp_path):
    monkeypatch.setattr(bs, "check_setup", lambda: None)
    monkeypatch.setattr(bs, "ServerProcess", lambda *a, **k: pytest.fail("started a server"))
    monkeypatch.setattr(bs, "prepare_client", lambda work: ({}, {"rc": 1, "datasets_stub": None, "tail": "boom"}))
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    rc = bs.main(["--model", str(model), "--trace", str(tmp_path / "w" / "t.json"), "--trace-rates", "0.2",
                  "--window", "10", "--out", str(tmp_path / "out")])
    doc = json.loads((tmp_path / "out" / "bench_serving.json").read_text())
    assert rc == 1 and "no server started" in doc["error"] and doc["client_preflight"]["tail"] == "boom"
    assert doc["trace"]["metadata"]["conversations"] == 2 and len(doc["trace"]["sha256"]) == 64


# ---- the driver's loop with a fake server and a fake client -------------------------------------------------------

class FakeServer:
    """Stands in for ServerProcess: healthy at once, a log the fake client appends prefill lines to."""

    started: list = []

    def __init__(self, name, port, args, env, out):
        self.name, self.port, self.args, self.env = name, port, args, env
        self.log_path = out / f"server-{name}.log"
        self.log_path.write_text("[t] KV Cache is allocated. #tokens: 5000, K size: 1 GB\n"
                                 "[t] Prefill batch, #new-seq: 9, #new-token: 9999, #cached-token: 0, x\n")
        self.cmd = "python3 -m sglang.launch_server " + " ".join(args)
        self.proc = type("P", (), {"poll": lambda self: None})()
        self.stopped = False
        FakeServer.started.append(self)

    def wait_healthy(self, timeout_s):
        return 1.5

    def stop(self):
        self.stopped = True


def fake_client(calls):
    def run_client(cmd, env, timeout_s, log_path):
        calls.append(cmd)
        f = flag_values(cmd)
        n = 3
        record = {"tag": f["--tag"], "backend": f["--backend"], "duration": 2.0, "completed": n,
                  "request_throughput": 1.5, "p90_ttft_ms": 10.0, "server_info": {"max_total_num_tokens": 5000},
                  "errors": [""] * n, "ttfts": [0.1] * n, "output_lens": [4] * n, "itls": [[0.01] * 3] * n,
                  "generated_texts": ["x"] * n}
        Path(f["--output-file"]).write_text(json.dumps(record) + "\n")
        log_path.write_text(PRINTED)
        server = FakeServer.started[-1]
        with open(server.log_path, "a") as log:
            log.write("[t] Prefill batch, #new-seq: 3, #new-token: 30, #cached-token: 10, token usage: 0.1\n")
        return {"rc": 0, "wall_s": 0.1, "timed_out": False}
    return run_client


@pytest.fixture
def fake(monkeypatch, tmp_path):
    FakeServer.started = []
    calls = []
    monkeypatch.setattr(bs, "ServerProcess", FakeServer)
    monkeypatch.setattr(bs, "run_client", fake_client(calls))
    monkeypatch.setattr(bs, "warm_up", lambda port, vocab: 0.5)
    monkeypatch.setattr(throughput, "wait_gpu_released", lambda: None)  # used by stop_and_record
    monkeypatch.setattr(bs, "check_setup", lambda: None)
    monkeypatch.setattr(bs, "prepare_client", lambda work: ({"E": "1"}, {"rc": 0, "datasets_stub": None, "tail": ""}))
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    common = ["--model", str(model), "--trace", str(tmp_path / "w" / "t.json"), "--out", str(tmp_path / "out"),
              "--window", "2", "--run-overhead", "1", "--commit", "abc1234"]
    return calls, common, tmp_path / "out"


def test_one_server_per_config_every_run_against_it_and_one_json(fake):
    calls, common, out = fake
    rc = bs.main(["--configs", "plain,evict-laq-0.1", "--trace-rates", "1,0.5", "--gsp-rates", "4",
                  "--random-rates", "2", "--server-extra", "--max-total-tokens 200000", *common])
    assert rc == 0
    doc = json.loads((out / "bench_serving.json").read_text())
    assert doc["commit"] == "abc1234" and "--configs plain,evict-laq-0.1" in doc["command"]
    assert doc["trace"]["metadata"]["conversations"] == 2  # the most any trace run needs: 1/s x 2 s
    plain, evict = FakeServer.started
    assert plain.env == {"SGLANG_PLUGINS": "not-sgl-evict"} and evict.env == {}
    for server in (plain, evict):
        assert server.stopped
        joined = " ".join(server.args)
        assert "--attention-backend triton" in joined and "--chat-template gemma-it" in joined
        assert "--max-total-tokens 200000" in joined and "--skip-tokenizer-init" not in joined
    assert "--kv-evict-policy laq --kv-evict-budget 0.1" in " ".join(evict.args)
    assert [c.index("--port") and c[c.index("--port") + 1] for c in calls] == ["31600"] * 4 + ["31601"] * 4
    for name in ("plain", "evict-laq-0.1"):
        c = doc["configs"][name]
        assert c["server_command"].startswith("python3 -m sglang.launch_server") and c["healthy_after_s"] == 1.5
        assert [(r["dataset"], r["rate"]) for r in c["runs"]] == [
            ("agentic-trace", 0.5), ("agentic-trace", 1.0), ("generated-shared-prefix", 4.0), ("random-ids", 2.0)]
        assert c["server_info"] == {"max_total_num_tokens": 5000}
        assert c["pool_lines"] == ["[t] KV Cache is allocated. #tokens: 5000, K size: 1 GB"]
        for run in c["runs"]:
            assert run["command"].split()[1:3] == ["-m", "sglang.benchmark.serving"]
            assert "itls" not in run["record"] and "generated_texts" not in run["record"]
            assert run["summary"]["slo_met_requests"] == 3 and run["printed"]["Successful requests"] == 160
            # only the run's own prefill lines, not the warm-up before it
            assert run["server_prefill"] == {"batches": 1, "new_seqs": 3, "new_tokens": 30, "cached_tokens": 10,
                                             "hit_rate": 0.25}
        trace_run = c["runs"][0]
        assert trace_run["trace_prompt_tokens_estimated"] > 0
        assert trace_run["input_throughput_estimated"] == trace_run["trace_prompt_tokens_estimated"] / 2.0


def test_runs_that_do_not_fit_the_deadline_are_skipped_and_recorded(fake):
    calls, common, out = fake
    # a run needs --window 2 + --run-overhead 1 s, plus the 25 s stop margin: 28 s. Two configs in 50 s: the first
    # gets half (25 s: its run is skipped), the second what is left when it starts (here all 50 s: no time passed)
    rc = bs.main(["--configs", "plain,plain-fp8", "--datasets", "random-ids", "--random-rates", "1",
                  "--deadline", "50", *common])
    doc = json.loads((out / "bench_serving.json").read_text())
    (skipped,) = doc["configs"]["plain"]["runs"]
    assert "share of the deadline" in skipped["skipped"] and "command" not in skipped
    (ran,) = doc["configs"]["plain-fp8"]["runs"]
    assert ran["summary"]["completed"] == 3 and len(calls) == 1
    assert rc == 1  # not every planned run ran
    assert bs.main(["--configs", "plain", "--datasets", "random-ids", "--random-rates", "1,2", "--deadline", "60",
                    *common]) == 0
    assert len(calls) == 3
