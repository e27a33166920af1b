"""A stand-in for ``python -m sglang.launch_server`` (tests of bench/gpu/throughput.py and quality.py on CPU).

Serves /health, /v1/loads, /get_server_info and /generate on --port like SGLang 0.5.17 (streamed with cumulative
output_ids, or one JSON answer without ``"stream"``), with a prefix cache that reports cached_tokens; with
--kv-evict-policy it logs the plugin's eviction line per request.
Prints its argv, SGLANG_PLUGINS and start/stop times to stdout (the server log).
"""

import json
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main() -> None:
    argv = sys.argv[1:]
    port = int(argv[argv.index("--port") + 1])
    evicting = "--kv-evict-policy" in argv
    budget = float(argv[argv.index("--kv-evict-budget") + 1]) if evicting else 1.0
    import os

    print(json.dumps({"argv": argv, "SGLANG_PLUGINS": os.environ.get("SGLANG_PLUGINS"), "start": time.time()}),
          flush=True)
    lock = threading.Lock()
    stored: dict[int, set[tuple]] = {}  # length -> prompt + output of finished requests
    state = {"running": 0, "n": 0}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _json(self, obj):
            body = json.dumps(obj).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path == "/health":
                self._json({})
            elif self.path == "/get_server_info":
                self._json({"version": "0.5.17-fake", "kv_evict_policy": "snapkv" if evicting else None})
            elif self.path.startswith("/v1/loads"):
                self._json({"loads": [{"num_running_reqs": state["running"], "num_waiting_reqs": 0,
                                       "num_used_tokens": 10 * state["running"], "token_usage": 0.0,
                                       "max_total_num_tokens": 1000}]})
            else:
                self.send_error(404)

        def do_POST(self):
            req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            prompt, n = req["input_ids"], req["sampling_params"]["max_new_tokens"]
            with lock:
                state["running"] += 1
                state["n"] += 1
                rid = state["n"]
                cached = max((k for k, seqs in stored.items() if k <= len(prompt) and tuple(prompt[:k]) in seqs),
                             default=0)
            custom = req["sampling_params"].get("custom_params")
            with lock:  # whole lines: requests arrive on several threads
                if custom is not None:
                    print(f"[fake] custom_params {json.dumps(custom)} prompt {len(prompt)}", flush=True)
                if evicting:
                    kept = max(1, int(budget * len(prompt)))
                    print(f"[fake] sgl-evict: request r{rid} kept {kept} of {len(prompt)} tokens, freed "
                          f"{len(prompt) - kept} slots, hid 0", flush=True)
            self.close_connection = True  # one request per connection, as the client uses them
            if not req.get("stream"):
                out = [1000 + (len(prompt) + k) % 5000 for k in range(1, n + 1)]
                with lock:
                    state["running"] -= 1
                    stored.setdefault(len(prompt) + len(out), set()).add(tuple(prompt + out))
                self._json({"output_ids": out, "meta_info": {"prompt_tokens": len(prompt), "cached_tokens": cached,
                                                             "completion_tokens": n,
                                                             "finish_reason": {"type": "length"}}})
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            out = []
            try:
                for k in range(1, n + 1):
                    time.sleep(0.002)
                    out.append(1000 + (len(prompt) + k) % 5000)
                    meta = {"prompt_tokens": len(prompt), "cached_tokens": cached, "completion_tokens": k,
                            "finish_reason": {"type": "length"} if k == n else None}
                    data = b"data: " + json.dumps({"output_ids": out, "meta_info": meta}).encode() + b"\n\n"
                    self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                done = b"data: [DONE]\n\n"
                self.wfile.write(f"{len(done):x}\r\n".encode() + done + b"\r\n0\r\n\r\n")
            except OSError:
                pass
            finally:
                with lock:
                    state["running"] -= 1
                    stored.setdefault(len(prompt) + len(out), set()).add(tuple(prompt + out))

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True

    def stop(*_):
        print(json.dumps({"stop": time.time()}), flush=True)
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    time.sleep(0.5)  # a server takes a while to become healthy
    server.serve_forever()


if __name__ == "__main__":
    main()
