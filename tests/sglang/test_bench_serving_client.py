"""SGLang 0.5.17's own benchmark client as bench/gpu/bench_serving.py runs it, on CPU: the flags its docstring quotes
are in SGLang's argparse; our trace loads through SGLang's AgenticTraceDataset and renders through SGLang's Gemma 3
chat template (``--chat-template gemma-it``) with the token counts the trace estimates; the servers' flags parse
through SGLang's own ``prepare_server_args``; and the real ``python -m sglang.benchmark.serving`` runs each dataset
offline against a stub server, the multi-turn replay sending each round's history with the stub's replies in it.

The Gemma 3 tokenizer is used where it is cached (``~/.cache/sgl-evict/gemma3-270m-hf``; the loader, template and
multi-turn replay tests), else a word-level one built here over the trace's words (then the token-count check is
skipped); the shared-prefix and random-ids runs always use the word-level one (each client run loads its tokenizer
several times: ~20 s a run with Gemma's)."""

import importlib.util
import json
import re
import sys
import tempfile
import threading
import time
from argparse import Namespace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from sglang_guard import sglang_or_skip

from bench import agentic_trace as at
from bench.gpu import bench_serving as bs


def _import_agentic_trace_dataset():
    """SGLang's dataset package imports HF datasets (for mmmu): without it, import through the driver's stub, then
    take the stub off the path again so that nothing else here sees a ``datasets`` module."""
    if importlib.util.find_spec("datasets") is not None:
        from sglang.benchmark.datasets.agentic_trace import AgenticTraceDataset
        return AgenticTraceDataset
    stub = str(bs.datasets_stub(Path(tempfile.mkdtemp()) / "stub"))
    sys.path.insert(0, stub)
    try:
        from sglang.benchmark.datasets.agentic_trace import AgenticTraceDataset
    finally:
        sys.path.remove(stub)
        sys.modules.pop("datasets", None)
    return AgenticTraceDataset


with sglang_or_skip("sglang.benchmark.serving's datasets"):
    AgenticTraceDataset = _import_agentic_trace_dataset()

import transformers
from sglang.srt.entrypoints.openai.protocol import ChatCompletionRequest
from sglang.srt.parser.conversation import chat_template_exists, generate_chat_conv

from bench.gpu import throughput
from bench.gpu.open_loop import config_server
from bench.workloads import AgentMix

GEMMA = Path.home() / ".cache" / "sgl-evict" / "gemma3-270m-hf"
SERVING = Path(__import__("sglang.benchmark", fromlist=["x"]).__file__).parent / "serving.py"
SMALL = AgentMix(system_tokens=(30, 60), group_size=2, turns=(2, 4), tool_tokens=(20, 60), instruction_tokens=(3, 8))


@pytest.fixture(scope="module")
def tokenizer_dir(words_tokenizer):
    """The Gemma 3 tokenizer where it is cached, else the word-level one."""
    return GEMMA if (GEMMA / "tokenizer.json").exists() else words_tokenizer


@pytest.fixture(scope="module")
def words_tokenizer(tmp_path_factory):
    """A word-level tokenizer over the trace's words: loads in milliseconds where Gemma's takes seconds, which the
    client does several times a run."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    path = tmp_path_factory.mktemp("words_tokenizer")
    vocab = ["[UNK]", "</s>", "<s>", *at.WORDS, *'{"out": "}\n,.:'.split()]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(dict.fromkeys(vocab))}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="</s>",
                                         bos_token="<s>").save_pretrained(path)
    return path


def test_every_flag_the_driver_quotes_is_in_sglangs_argparse():
    source = SERVING.read_text()
    quoted = re.findall(r'add_argument\("(--[a-z0-9-]+)"', bs.__doc__)
    assert len(quoted) >= 25
    for flag in quoted:
        assert re.search(r'add_argument\(\s*"' + re.escape(flag) + '"', source), flag
    # and the backends and dataset names it uses
    for name in ('"sglang": async_request_sglang_generate', '"sglang-oai-chat": async_request_openai_chat',
                 '"agentic-trace",', '"random-ids",', '"generated-shared-prefix",'):
        assert name in source, name


def test_sglang_loads_our_trace_as_generated(tmp_path, tokenizer_dir):
    path = tmp_path / "trace.json"
    at.write_trace(path, 5, seed=7, mix=SMALL, reply_tokens=24, max_context=2000)
    trace = json.loads(path.read_text())
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    args = Namespace(dataset_path=str(path), num_prompts=4, sharegpt_output_len=24, dataset_offset=0,
                     agentic_max_turns=None)
    rows = AgenticTraceDataset.from_args(args).load(tokenizer=tokenizer)
    assert len(rows) == 4
    for row, conv in zip(rows, trace["conversations"]):
        assert row.prompt == [turn["messages"] for turn in conv]  # one round per turn, the messages as written
        assert row.prompt_len == conv[0]["prompt_tokens"] and row.output_len == 24


def test_the_gemma_template_renders_every_replayed_round(tokenizer_dir):
    """The history the multi-turn replay sends (its messages, an assistant reply after each round) goes through
    SGLang's gemma-it template; with the Gemma tokenizer, its prompt has the tokens the trace estimated."""
    assert chat_template_exists("gemma-it")
    gemma = tokenizer_dir == GEMMA
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    reply = " ".join(at.WORDS[:24])  # 24 tokens for Gemma
    for conv in at.build_trace(3, seed=1, mix=SMALL, reply_tokens=24)["conversations"]:
        history = []
        for turn in conv:
            history += turn["messages"]
            prompt = generate_chat_conv(ChatCompletionRequest(model="m", messages=history), "gemma-it").get_prompt()
            assert prompt.startswith("<start_of_turn>user\n" + conv[0]["messages"][0]["content"])
            assert prompt.endswith(turn["messages"][-1]["content"] + "<end_of_turn>\n<start_of_turn>model\n")
            if gemma:
                assert len(tokenizer.encode(prompt)) == turn["prompt_tokens"]
            history.append({"role": "assistant", "content": reply})


@pytest.mark.parametrize("config", ["plain", "plain-fp8", "plain-hicache", "plain-evict-sched", "plain-capped",
                                    "evict-laq-0.1"])
def test_the_server_flags_parse_through_sglang(config, tmp_path):
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import prepare_server_args

    transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=256, architectures=["LlamaForCausalLM"]
                             ).save_pretrained(tmp_path)
    load_plugins()
    a = bs.build_parser().parse_args([])
    flags, _ = config_server(config, a.capped_tokens)
    common = ["--model-path", str(tmp_path), "--attention-backend", a.attention_backend, "--mem-fraction-static",
              str(a.mem_fraction_static), "--max-running-requests", str(a.max_running_requests),
              "--chat-template", a.chat_template]
    server = prepare_server_args([*common, *flags, "--device", "cpu"])
    assert server.chat_template == "gemma-it" and server.attention_backend == "triton"


# ---- the real client against a stub server ------------------------------------------------------------------------

class StubServer:
    """Answers what sglang.benchmark.serving asks: /v1/models, /model_info, /server_info, /flush_cache, streamed
    /generate (text or input_ids) and /v1/chat/completions; records every request and when the cache was flushed."""

    def __init__(self, tokenizer_path: str, reply_tokens: int = 6, port: int = 0):
        self.requests, self.flushed_at = [], []
        self.reply_tokens = reply_tokens
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # the body ends when the connection closes

            def log_message(self, *a):
                pass

            def _json(self, obj, status=200):
                body = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if self.path.startswith("/v1/models"):
                    self._json({"data": [{"id": tokenizer_path}]})
                elif self.path.startswith("/model_info"):
                    self._json({"model_path": tokenizer_path, "tokenizer_path": tokenizer_path})
                elif self.path.startswith("/server_info"):
                    self._json({"max_total_num_tokens": 1234, "internal_states": [{}]})
                else:
                    self._json({}, 200 if self.path.startswith("/health") else 404)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                if self.path == "/flush_cache":
                    stub.flushed_at.append(len(stub.requests))
                    return self._json({})
                stub.requests.append((self.path, body))
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                words = stub.reply(body)
                for k in range(1, len(words) + 1):
                    time.sleep(0.002)
                    if self.path == "/generate":
                        event = {"text": " ".join(words[:k]),
                                 "meta_info": {"completion_tokens": k, "cached_tokens": 3, "prompt_tokens": 9}}
                    else:
                        event = {"choices": [{"index": 0, "delta": {"content": " " + words[k - 1]}}]}
                    self.wfile.write(b"data: " + json.dumps(event).encode() + b"\n\n")
                if self.path != "/generate":
                    self.wfile.write(b'data: {"choices": [], "usage": {"completion_tokens": %d}}\n\n' % len(words))
                self.wfile.write(b"data: [DONE]\n\n")

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def reply(self, body: dict) -> list[str]:
        n = body.get("max_completion_tokens") or body.get("sampling_params", {}).get("max_new_tokens") or 1
        users = sum(m["role"] == "user" for m in body.get("messages", []))
        return [at.WORDS[(users * 7 + k) % len(at.WORDS)] for k in range(n)]

    def measured(self):
        """Requests after the flush that follows the client's warm-up."""
        return self.requests[self.flushed_at[0]:] if self.flushed_at else []

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def client_env(tmp_path_factory):
    env, preflight = bs.prepare_client(tmp_path_factory.mktemp("work"))
    assert preflight["rc"] == 0, preflight["tail"]
    return env, preflight


def run(dataset, rate, tmp_path, tokenizer_dir, client_env, trace=None, *flags):
    stub = StubServer(str(tokenizer_dir))
    try:
        args = bs.build_parser().parse_args(["--model", str(tokenizer_dir), "--window", "0.2", *flags])
        out = tmp_path / f"{dataset}.jsonl"
        cmd = bs.client_command(dataset, rate, stub.port, args, out, f"test/{dataset}", trace)
        ran = bs.run_client(cmd, client_env[0], 150, out.with_suffix(".log"))
        log = out.with_suffix(".log").read_text()
        assert ran["rc"] == 0, log[-3000:]
        record = bs.read_jsonl(out)
        return stub, record, bs.summarize(record, 2.0, 0.05), bs.parse_printed(log)
    finally:
        stub.close()


def test_the_client_imports_offline_with_or_without_hf_datasets(client_env):
    env, preflight = client_env
    if preflight["datasets_stub"]:
        assert env["PYTHONPATH"].split(":")[0] == preflight["datasets_stub"]


def test_the_multi_turn_replay_of_our_trace(tmp_path, tokenizer_dir, client_env):
    trace = tmp_path / "trace.json"
    at.write_trace(trace, 4, seed=3, mix=SMALL, reply_tokens=5)
    conversations = json.loads(trace.read_text())["conversations"]
    stub, record, summary, printed = run("agentic-trace", 20, tmp_path, tokenizer_dir, client_env, trace,
                                         "--trace-reply-tokens", "5")
    rounds = sum(len(c) for c in conversations)
    assert summary["completed"] == rounds == summary["requests"] and summary["failed"] == 0
    assert printed["Successful requests"] == rounds and printed["Backend"] == "sglang-oai-chat"
    sent = stub.measured()
    assert len(sent) == rounds and all(path == "/v1/chat/completions" for path, _ in sent)
    for path, body in sent:
        assert body["max_completion_tokens"] == 5 and body["ignore_eos"] is True and body["stream"] is True
        messages = body["messages"]
        # which conversation and round: the first user message and the number of user messages
        conv = next(c for c in conversations if c[0]["messages"] == messages[:2])
        users = [m for m in messages if m["role"] == "user"]
        expected = []
        for r, turn in enumerate(conv[:len(users)]):
            expected += turn["messages"]
            if r < len(users) - 1:  # the stub's own reply to that round, as the client read it back
                expected.append({"role": "assistant", "content": " " + " ".join(stub.reply(
                    {"max_completion_tokens": 5, "messages": [{"role": "user"}] * (r + 1)}))})
        assert messages == expected
    assert summary["goodput_requests_per_s"] > 0 and record["tag"] == "test/agentic-trace"


def test_shared_prefix_requests(tmp_path, words_tokenizer, client_env):
    stub, record, summary, printed = run("generated-shared-prefix", 20, tmp_path, words_tokenizer, client_env, None,
                                         "--gsp-groups", "2", "--gsp-system-len", "40", "--gsp-question-len", "8",
                                         "--gsp-output-len", "4")
    sent = stub.measured()
    assert summary["completed"] == len(sent) == 4 and summary["failed"] == 0  # 20/s x 0.2 s, 2 groups of 2
    texts = [body["text"] for _, body in sent]
    assert all(path == "/generate" and body["sampling_params"]["max_new_tokens"] == 4 for path, body in sent)
    prefixes = {t.split("\n\n")[0] for t in texts}
    assert len(prefixes) == 2  # two system prompts, each shared by two requests
    assert record["cache_report"]["total_cached_tokens"] == 12 and printed["Backend"] == "sglang"


def test_random_ids_requests(tmp_path, words_tokenizer, client_env):
    stub, record, summary, _ = run("random-ids", 20, tmp_path, words_tokenizer, client_env, None,
                                   "--random-input-len", "300", "--random-output-len", "3")
    sent = stub.measured()
    assert summary["completed"] == len(sent) == 4 and summary["failed"] == 0
    for _, body in sent:
        assert 150 <= len(body["input_ids"]) <= 300 and body["sampling_params"]["max_new_tokens"] <= 3
    assert record["random_input_len"] == 300


def test_the_driver_end_to_end_with_a_stub_in_place_of_the_server(tmp_path, words_tokenizer, monkeypatch):
    """bench/gpu/bench_serving.main as on the GPU host, the SGLang server replaced by the stub on the driver's port:
    the trace written, the client started offline, two datasets run, the JSON written with every command line."""
    stubs = []

    class StubProcess:
        def __init__(self, name, port, args, env, out):
            self.stub = StubServer(str(words_tokenizer), port=port)
            stubs.append(self.stub)
            self.log_path = out / f"server-{name}.log"
            self.log_path.write_text("")
            self.cmd = "python3 -m sglang.launch_server " + " ".join(args)
            self.proc = type("P", (), {"poll": lambda self: None})()

        def wait_healthy(self, timeout_s):
            return 0.1

        def stop(self):
            self.stub.close()

    monkeypatch.setattr(bs, "ServerProcess", StubProcess)
    monkeypatch.setattr(bs, "warm_up", lambda port, vocab: 0.0)
    monkeypatch.setattr(throughput, "wait_gpu_released", lambda: None)  # used by stop_and_record
    out = tmp_path / "out"
    rc = bs.main(["--configs", "plain", "--model", str(words_tokenizer), "--datasets",
                  "agentic-trace,generated-shared-prefix", "--trace-rates", "20", "--gsp-rates", "20",
                  "--window", "0.2", "--run-overhead", "5", "--deadline", "400", "--trace", str(tmp_path / "w/t.json"),
                  "--trace-system-tokens", "30,60", "--trace-turns", "2,3", "--trace-tool-tokens", "20,40",
                  "--trace-max-context", "2000", "--trace-reply-tokens", "4", "--gsp-groups", "2",
                  "--gsp-system-len", "40", "--gsp-question-len", "8", "--gsp-output-len", "4", "--out", str(out)])
    doc = json.loads((out / "bench_serving.json").read_text())
    assert rc == 0, json.dumps(doc)[-3000:]
    assert doc["client_preflight"]["rc"] == 0 and doc["trace"]["metadata"]["conversations"] == 4
    trace_run, gsp_run = doc["configs"]["plain"]["runs"]
    rounds = doc["trace"]["metadata"]["turns_kept"]
    assert trace_run["summary"]["completed"] == rounds and trace_run["rc"] == 0
    assert gsp_run["summary"]["completed"] == 4
    assert "--backend sglang-oai-chat" in trace_run["command"] and "--backend sglang " in gsp_run["command"]
    assert (out / "client" / "plain" / "agentic-trace-r20.jsonl").exists()
    assert len(stubs[0].requests) >= rounds + 4
