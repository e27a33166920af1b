"""GPU smoke test of the offline SGLang install: launches servers, waits for health, sends requests, times them.

Run on the GPU host after `bench/gpu/install.sh` put bundles a, b, c (and optionally the Gemma parts) in /tmp/site:

    PYTHONPATH=/tmp/site python3 -m bench.gpu.smoke [--gemma] [--llama8b] [--out DIR]

Servers (127.0.0.1 only, launched side by side so the whole test fits one call):
- a 4-layer random-weight Llama with `--attention-backend flashinfer` and with `triton` (`--skip-tokenizer-init`,
  /generate with input_ids);
- with `--llama8b`: Llama-3.1-8B shapes, random weights (`--load-format dummy`), FlashInfer;
- with `--gemma`: Gemma 3 270M converted on the host from the GGUF parts, a text prompt.
Prints one verdict line per server and writes smoke.json (+ server logs) to --out (default $OUT or /tmp).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

SITE = Path(os.environ.get("SGL_EVICT_SITE", "/tmp/site"))

# Llama-3.1-8B, from its public model card / config
LLAMA_31_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
    "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 128000,
    "eos_token_id": 128001,
}


def write_llama_8b_config(path: Path) -> Path:
    """A config-only checkpoint folder with Llama-3.1-8B shapes, for `--load-format dummy`."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(LLAMA_31_8B, indent=1))
    return path


def write_tiny_llama(path: Path, initializer_range: float = 0.02, max_positions: int = 16384) -> Path:
    """A 4-layer random-weight Llama (hidden 512, GQA 8:4, vocabulary 32000) saved in bf16 (``initializer_range``:
    weight std; ``max_positions``: its context)."""
    if (path / "config.json").exists():
        return path
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                      num_key_value_heads=4, vocab_size=32000, max_position_embeddings=max_positions,
                      initializer_range=initializer_range)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)
    return path


def convert_gemma(parts: Path, path: Path) -> Path:
    """Gemma 3 270M from the carried GGUF parts to an HF bf16 checkpoint (tokenizer included)."""
    if (path / "config.json").exists():
        return path
    # transformers 5.12.1 splits this GGUF's tokenizer into characters: the 5.23 one travels as bundle gemma-tok
    carried = SITE / "gemma-tok"
    if not (carried / "tokenizer.json").exists():
        raise ValueError(f"{carried}/tokenizer.json is missing: install bundle gemma-tok (the host's tokenizer is wrong)")
    import hashlib

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = b"".join(p.read_bytes() for p in sorted(parts.glob("gemma.gguf.part*")))
    expected = (parts / "gemma.gguf.sha256").read_text().strip()
    if hashlib.sha256(data).hexdigest() != expected:
        raise ValueError(f"GGUF parts in {parts} do not match their sha256: a part is missing; carry every gemmaN")
    gguf = Path("/tmp/gemma-3-270m-q4_k_m.gguf")
    gguf.write_bytes(data)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    model.config.quantization_config = None
    model.save_pretrained(path)
    tok.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (path / name).write_bytes((carried / name).read_bytes())
    return path


def print_checks(checks: dict) -> int:
    """Prints one PASS/FAIL line per check (``{name: {"ok": bool, ...details}}``); the exit status: 0 when there
    are checks and all passed."""
    for name, check in checks.items():
        print(f"{'PASS' if check['ok'] else 'FAIL'}  {name}  {({k: v for k, v in check.items() if k != 'ok'})}")
    return 0 if checks and all(c["ok"] for c in checks.values()) else 1


class Server:
    """One `python -m sglang.launch_server` subprocess on 127.0.0.1."""

    def __init__(self, name: str, port: int, args: list[str], out: Path):
        self.name, self.port = name, port
        self.log_path = out / f"server-{name}.log"
        cmd = [sys.executable, "-m", "sglang.launch_server", "--host", "127.0.0.1", "--port", str(port), *args]
        self.cmd = " ".join(cmd)
        self.start = time.time()
        self.proc = subprocess.Popen(cmd, stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT)
        self.healthy_after: float | None = None

    def wait_healthy(self, timeout_s: float, every_s: float = 2.0) -> bool:
        """Polls ``/health`` until the server answers, exits, or ``timeout_s`` pass; whether it is healthy."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not self.poll_health() and self.proc.poll() is None:
            time.sleep(every_s)
        return self.healthy_after is not None

    def poll_health(self) -> bool:
        if self.healthy_after is not None:
            return True
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2)
            self.healthy_after = time.time() - self.start
            return True
        except Exception:
            return False

    def generate(self, payload: dict) -> tuple[float, dict]:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/generate", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        t = time.time()
        body = json.loads(urllib.request.urlopen(req, timeout=600).read())
        return time.time() - t, body

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gemma", action="store_true", help="also serve Gemma 3 270M from the parts in /tmp/site/gemma-parts")
    parser.add_argument("--llama8b", action="store_true", help="also serve Llama-3.1-8B shapes with dummy weights")
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    parser.add_argument("--timeout", type=float, default=420, help="seconds to wait for all servers to be healthy")
    parser.add_argument("--skip-tiny", action="store_true", help="skip the tiny Llama servers")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    missing = [b for b in "abc" if not (SITE / f".installed-{b}").exists()]
    if missing:
        print(f"smoke: bundles {', '.join(missing)} missing from {SITE}: the machine went cold; reinstall a, b, c")
        return 3

    common = ["--mem-fraction-static", "0.2", "--log-level", "warning"]  # the two tiny servers share the GPU
    tiny = str(write_tiny_llama(Path("/tmp/tiny-llama")))
    servers = [] if args.skip_tiny else [Server("flashinfer", 30000, ["--model-path", tiny, "--skip-tokenizer-init",
                                            "--attention-backend", "flashinfer", *common], out),
               Server("triton", 30001, ["--model-path", tiny, "--skip-tokenizer-init",
                                        "--attention-backend", "triton", *common], out)]
    if args.llama8b:
        cfg = str(write_llama_8b_config(Path("/tmp/llama-3.1-8b-dummy")))
        servers.append(Server("llama8b-dummy", 30002, ["--model-path", cfg, "--load-format", "dummy",
                                                       "--skip-tokenizer-init", "--attention-backend", "flashinfer",
                                                       "--mem-fraction-static", "0.6", "--log-level", "warning"], out))
    gemma_convert_s = None
    if args.gemma:
        t = time.time()
        gemma = convert_gemma(SITE / "gemma-parts", Path("/tmp/gemma3-270m-hf"))
        gemma_convert_s = time.time() - t
        # FlashInfer's ragged prefill rejects Gemma 3's sliding-window batch in SGLang 0.5.17 (q/qo_indptr mismatch)
        servers.append(Server("gemma3-270m", 30003, ["--model-path", str(gemma), "--attention-backend", "triton",
                                                     "--mem-fraction-static", "0.5", "--log-level", "warning"], out))

    deadline = time.time() + args.timeout
    while time.time() < deadline and not all(s.poll_health() or s.proc.poll() is not None for s in servers):
        time.sleep(2)

    results = []
    for s in servers:
        r = {"name": s.name, "command": s.cmd, "healthy_after_s": s.healthy_after, "exit_code": s.proc.poll()}
        if s.healthy_after is not None:
            try:
                if s.name.startswith("gemma"):
                    payload = {"text": "The capital of France is", "sampling_params": {"max_new_tokens": 12,
                                                                                       "temperature": 0}}
                else:
                    payload = {"input_ids": list(range(1, 101)), "sampling_params": {"max_new_tokens": 16,
                                                                                     "temperature": 0}}
                times, body = [], None
                for _ in range(3):
                    dt, body = s.generate(payload)
                    times.append(round(dt, 3))
                r.update(first_request_s=times[0], later_requests_s=times[1:],
                         output=body.get("text", body.get("output_ids")))
                if s.name.startswith("gemma"):
                    # the same prompt as explicit ids with <bos> first, to tell tokenization from the model
                    ids = _gemma_prompt_ids(Path("/tmp/gemma3-270m-hf"), payload["text"])
                    _, body = s.generate({"input_ids": ids, "sampling_params": payload["sampling_params"]})
                    r.update(prompt_ids_with_bos=ids, output_from_ids=body.get("text"))
                r["ok"] = True
            except Exception as err:  # the verdict must say what failed, not stop the other servers' report
                r.update(ok=False, error=repr(err))
        else:
            r["ok"] = False
            r["log_tail"] = s.log_path.read_text()[-3000:]
        results.append(r)
    for s in servers:
        s.stop()

    import torch

    doc = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
           "versions": {m: _version(m) for m in ("sglang", "flashinfer", "sgl_kernel", "transformers", "triton")},
           "gemma_convert_s": gemma_convert_s, "servers": results}
    (out / "smoke.json").write_text(json.dumps(doc, indent=1))
    for r in results:
        verdict = "PASS" if r["ok"] else "FAIL"
        detail = (f"healthy {r['healthy_after_s']:.0f}s, first request {r['first_request_s']:.1f}s, "
                  f"later {r['later_requests_s']}, out={str(r['output'])[:80]!r}") if r["ok"] else \
            r.get("error", "not healthy")
        print(f"[smoke] {r['name']}: {verdict} {detail}")
        if "output_from_ids" in r:
            print(f"[smoke] {r['name']}: ids {r['prompt_ids_with_bos']} -> {r['output_from_ids']!r}")
    return 0 if all(r["ok"] for r in results) else 1


def _gemma_prompt_ids(path: Path, prompt: str) -> list[int]:
    """The prompt's token ids from the served checkpoint's tokenizer, with exactly one <bos> in front."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    return [tok.bos_token_id, *ids]


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:
        return None


if __name__ == "__main__":
    sys.exit(main())
