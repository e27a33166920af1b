"""A stub SGLang server on 127.0.0.1 that streams SGLang 0.5.17-format ``/generate`` events (the bench clients'
tests: tests/bench/test_serve_bench.py, tests/bench/test_open_loop.py)."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ERROR_MARKER = 77777
ABORT_MARKER = 88888
HANGUP_MARKER = 99999


class StubSGLang:
    """``/generate`` streaming like SGLang (chunked ``data:`` events, ``[DONE]``), a prefix cache that reports
    ``cached_tokens`` as the longest prefix shared with an earlier prompt + output, and ``/v1/loads``."""

    def __init__(self, ttft_s=0.05, token_s=0.01, incremental=False, leak_tokens=0):
        self.ttft_s, self.token_s, self.incremental = ttft_s, token_s, incremental
        self.leak_tokens = leak_tokens  # KV tokens /v1/loads reports in use even when idle (a leaking server)
        self.lock = threading.Lock()
        self.calls = []  # (prompt, output, t_start, t_end)
        self.stored = []  # prompt + output of finished requests
        self.active = self.max_active = 0
        self.flushes = 0  # POST /flush_cache calls
        self.prompts_by_rid = {}  # the request id a client gave (``rid``) -> the prompt sent with it
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                if self.path.startswith("/v1/loads"):
                    body = json.dumps({"loads": [{"num_running_reqs": stub.active, "num_waiting_reqs": 0,
                                                  "num_used_tokens": 100 * stub.active + stub.leak_tokens,
                                                  "token_usage": 0.1,
                                                  "max_total_num_tokens": 1000}]}).encode()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                elif self.path == "/health":
                    self.send_response(200)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                else:
                    self.send_error(404)

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path == "/flush_cache":
                    stub.flushes += 1
                    self.send_response(200)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                req = json.loads(body)
                if not req.get("stream"):
                    stub.answer_once(self, req)
                    return
                stub.handle(self, req)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @staticmethod
    def output_for(prompt, n):
        return [1000 + (len(prompt) * 31 + sum(prompt[-5:]) + k) % 50000 for k in range(n)]

    def cached(self, prompt):
        best = 0
        for seq in self.stored:
            k = 0
            while k < min(len(seq), len(prompt)) and seq[k] == prompt[k]:
                k += 1
            best = max(best, k)
        return best

    CONTEXT = 32768  # a long-context server: the agent workloads fit; tests of the limit set their own

    def answer_once(self, h, req):
        """A non-streamed ``/generate`` as SGLang 0.5.17 + sgl-evict answer it: an empty or too long prompt is a
        400; an invalid ``kv_evict`` override is a 200 whose request was aborted with the reason (the plugin's
        ``Req.__init__`` hook, validated here by the real :func:`sgl_evict.engine.runtime.request_config`)."""
        from sgl_evict.config import EvictionConfig
        from sgl_evict.engine.runtime import request_config
        from sgl_evict.selection import Budget

        prompt = req.get("input_ids") or []
        params = req.get("sampling_params") or {}
        status, doc = 200, None
        if not prompt:
            status, doc = 400, {"error": {"message": "The input_ids is empty.", "code": 400}}
        elif len(prompt) > self.CONTEXT:
            status, doc = 400, self.too_long(prompt)
        else:
            try:
                request_config(EvictionConfig(policy="snapkv", budget=Budget.parse("0.1")),
                               params.get("custom_params"))
                out = self.output_for(prompt, params.get("max_new_tokens", 4))
                doc = {"output_ids": out, "meta_info": {"finish_reason": {"type": "length"}}}
            except ValueError as err:
                doc = {"output_ids": [], "meta_info": {"finish_reason": {
                    "type": "abort", "message": f"kv_evict: {err}", "status_code": 400}}}
        self.reply_json(h, status, doc)

    def too_long(self, prompt) -> dict:
        return {"error": {"message": f"The input ({len(prompt)} tokens) is longer than the model's context length "
                                     f"({self.CONTEXT} tokens).", "code": 400}}

    @staticmethod
    def reply_json(h, status, doc):
        data = json.dumps(doc).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def handle(self, h, req):
        prompt = req["input_ids"]
        n = req["sampling_params"]["max_new_tokens"]
        every = req["sampling_params"].get("stream_interval", 1)
        assert req["stream"] is True and req["sampling_params"]["ignore_eos"] is True
        if len(prompt) > self.CONTEXT:  # refused before it streams, as SGLang does
            self.reply_json(h, 400, self.too_long(prompt))
            return
        t_start = time.monotonic()
        with self.lock:
            if "rid" in req:
                self.prompts_by_rid[req["rid"]] = list(prompt)
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            cached = self.cached(prompt)
        out = self.output_for(prompt, n)
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()

        def send(data: bytes):
            h.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            h.wfile.flush()

        finished = []

        def finish():
            # the stub's bookkeeping for this request, done before the event that ends it for the client (which
            # may send the session's next turn at once), or when the stream breaks off
            if not finished:
                finished.append(True)
                with self.lock:
                    self.active -= 1
                    self.calls.append((prompt, out, t_start, time.monotonic()))
                    self.stored.append(prompt + out)

        try:
            sent = 0
            for k in range(1, n + 1):
                time.sleep(self.ttft_s if k == 1 else self.token_s)
                if not (k == n or k % every == 1 or every == 1):  # SGLang: first token, then every `every`
                    continue
                if ERROR_MARKER in prompt:
                    finish()
                    send(b'data: {"error": {"message": "boom", "code": 400}}\n\n')
                    break
                ids = out[sent:k] if self.incremental else out[:k]
                sent = k
                reason = {"type": "length", "length": n} if k == n else None
                if ABORT_MARKER in prompt:
                    reason = {"type": "abort", "message": "too long", "status_code": 400, "err_type": None}
                meta = {"prompt_tokens": len(prompt), "cached_tokens": cached, "completion_tokens": k,
                        "num_retractions": 0, "finish_reason": reason}
                if reason is not None:
                    finish()
                send(b"data: " + json.dumps({"output_ids": ids, "meta_info": meta}).encode() + b"\n\n")
                if reason is not None or HANGUP_MARKER in prompt:
                    break
            if HANGUP_MARKER not in prompt:
                send(b"data: [DONE]\n\n")
            finish()
            send(b"")
        except OSError:
            pass  # the client closed the stream (deadline)
        finally:
            finish()

    def close(self):
        self.server.shutdown()
