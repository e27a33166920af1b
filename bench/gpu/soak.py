"""The soak (bench/soak.py) against evicting servers on the GPU host, one server at a time (issue 24).

    PYTHONPATH=/tmp/site python3 -m bench.gpu.soak --configs page1,page16 --duration 120 --rate 2 \\
        --deadline 550 --commit SHA --out $OUT

(from the repository root; the sgl-evict wheel in /tmp/site gives servers the plugin's entry point). Servers run
``--model tiny-llama`` (default: bench/gpu/smoke.py's 4-layer random Llama, weight std 0.06 so that logits are not
flat, saved as a real checkpoint with a 32K context) or Llama-3.2-1B shapes with random weights (``--load-format
dummy``), FlashInfer unless the config says otherwise, ``--kv-evict-policy snapkv --kv-evict-budget 0.1``, a capped
pool (``--max-total-tokens``) meant to make the scheduler retract requests, and chunked prefill of
``--chunked-prefill-size`` tokens.

**Replay** (``tiny-llama`` only: real weights the harness can load): the server logs its keep-sets
(``SGL_EVICT_LOG_KEEP=1``); once it is stopped, up to ``--replay`` of the requests whose caches the log fully gives
(bench/soak_replay.py says which) are replayed on the HF harness on the GPU with those keep-sets, and every served
token must be the harness's best token within ``--replay-tol`` nats. The defaults come from the
first H100 run (2026-12-06): at 0.6 sessions/s at most 5 requests ran and at most 10% of a 150,000-token pool was in
use (15K tokens), so nothing was retracted; 2 sessions/s (about 7.5 requests/s, the issue's 10,000 requests in 22
minutes) against a 40,000-token pool (above the 32K context) should run out of pool. Not yet run at these settings.

| config | server |
| --- | --- |
| ``page1`` | uniform keep-sets, page size 1 |
| ``page16`` | uniform keep-sets, ``--page-size 16`` (whole pages evicted) |
| ``per_layer`` | ``--kv-evict-granularity per_layer`` (Triton, no CUDA graphs, page size 1) |

Per config the soak's JSON, then the server log's checks: no traceback, no line where SGLang's idle check reports a
leak, the server alive at the end. Writes ``soak.json`` (command, commit, device, versions, per config: server
command, soak result, log checks, replay; answers' token ids only for requests the replay flagged) and the server
logs (keep-set lines dropped once parsed: they would make the logs hundreds of MB).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import sys
import time
from pathlib import Path

from bench.gpu.smoke import _version
from bench.gpu.throughput import (
    MODELS,
    STOP_MARGIN_S,
    ServerProcess,
    check_setup,
    gpu_query,
    stop_and_record,
    write_model_config,
)
from bench.gpu.smoke import write_tiny_llama
from bench.soak import parse_override, prompt_of, run_soak
from bench.soak_replay import DEFAULT_TOL, KEEPS, LOOKS_AHEAD, LoggedEvictions, pick_cases, replay
from bench.workloads import DEFAULT_VOCAB, AgentMix

CONFIGS = {
    "page1": ["--attention-backend", "flashinfer"],
    "page16": ["--attention-backend", "flashinfer", "--page-size", "16"],
    "per_layer": ["--attention-backend", "triton", "--kv-evict-granularity", "per_layer", "--disable-cuda-graph",
                  "--page-size", "1"],
}
#: in SGLang's idle memory check's report when slots are neither free nor cached (a leak)
LEAK_WORD = "leak"
TINY = "tiny-llama"
TINY_VOCAB = (100, 32000)
#: the server's own policy (``--kv-evict-policy``) and laq's default lookahead steps (EvictionConfig)
SERVER_POLICY, LOOKAHEAD_STEPS = "snapkv", 8
#: seconds kept for loading the harness and replaying, on top of the soak
REPLAY_S = 90
#: the judgeq override the soak adds on page-1 servers of the real-weight model (judgeq runs with page size 1 only)
JUDGEQ = "judgeq@0.1"


def log_checks(log: Path) -> dict:
    """What the server log says: tracebacks and leak reports (counted), and whether the plugin evicted at all."""
    text = log.read_text(errors="replace")
    lower = text.lower()
    return {"tracebacks": text.count("Traceback"), "leak_lines": lower.count(LEAK_WORD),
            "evictions_logged": text.count("sgl-evict: request "), "aborted_requests": lower.count("abort")}


def effective_policies(overrides: list[str]) -> dict[str, str]:
    """Override name (``server``, ``none``, ``laq@0.1``) -> the policy its requests ran."""
    out = {}
    for name in overrides:
        parsed = parse_override(name)
        out[name] = SERVER_POLICY if parsed is None else parsed["policy"]
    return out


def write_soft_tokens(model: Path, count: int = 8) -> Path:
    """A judgeq soft-token file for the checkpoint ``model`` (random vectors, untrained: the soak exercises judgeq's
    extra forward and eviction, not its quality), with the model's fingerprint, so the server accepts it."""
    import torch
    from transformers import AutoModelForCausalLM

    from sgl_evict.soft_tokens import SoftTokens, model_fingerprint

    path = model / "soak_soft_tokens.safetensors"
    if not path.exists():
        hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16)
        table = hf.get_input_embeddings().weight
        vectors = torch.randn(count, table.shape[1], generator=torch.Generator().manual_seed(0)) * table.float().std()
        SoftTokens(vectors, model_fingerprint(hf.config, table)).save(path, {"training": "none (bench/gpu/soak.py)"})
    return path


def config_overrides(name: str, overrides: list[str], soft_tokens: Path | None) -> tuple[list[str], list[str]]:
    """The overrides a config's soak sends and the server flags they need: judgeq ones (``JUDGEQ`` added) with
    ``soft_tokens`` on ``page1``, the one config of page size 1 and uniform keep-sets; none elsewhere."""
    others = [o for o in overrides if not o.startswith("judgeq@")]
    if soft_tokens is None or name != "page1":
        return others, []
    judgeq = [o for o in overrides if o.startswith("judgeq@")] or [JUDGEQ]
    return [*others, *judgeq], ["--kv-evict-soft-tokens", str(soft_tokens)]


def slim_log(log: Path) -> int:
    """Drops the keep-set lines from ``log`` (parsed already); returns how many."""
    lines = log.read_text(errors="replace").splitlines(keepends=True)
    kept = [line for line in lines if not (KEEPS.search(line) or LOOKS_AHEAD.search(line))]
    log.write_text("".join(kept))
    return len(lines) - len(kept)


def replay_served(model: Path, soak: dict, log_text: str, overrides: list[str], seed: int, mix: AgentMix,
                  sample: int, tol: float, deadline: float, progress=None, device: str | None = None) -> dict:
    """Replays up to ``sample`` of the soak's requests on the HF harness with the keep-sets in ``log_text``
    (``device``: None picks the GPU when there is one)."""
    import torch
    from transformers import AutoModelForCausalLM

    from sgl_evict.harness import EvictionHarness

    rows = soak["requests"]
    logged = LoggedEvictions.parse(log_text)
    cases, skipped = pick_cases(rows, effective_policies(overrides), logged,
                                lambda row: prompt_of(row, rows, seed, mix, TINY_VOCAB), sample, seed,
                                LOOKAHEAD_STEPS)
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16)
    harness = EvictionHarness(hf, device=device or ("cuda" if torch.cuda.is_available() else "cpu"))
    report = replay(harness, cases, tol, deadline, progress)
    report["left_out"] = skipped
    report["logged"] = {"evictions": sum(len(v) for v in logged.keeps.values()),
                        "lookahead_views": sum(len(v) for v in logged.lookahead.values())}
    del harness, hf
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="page1,page16", help=f"comma-separated, from: {', '.join(CONFIGS)}")
    parser.add_argument("--model", choices=[TINY, *sorted(MODELS)], default=TINY,
                        help=f"{TINY} (default: real random weights, answers replayed) or dummy-weight shapes")
    parser.add_argument("--replay", type=int, default=200, help="requests replayed per config (tiny-llama; 0: none)")
    parser.add_argument("--replay-tol", type=float, default=DEFAULT_TOL,
                        help=f"nats a served token may sit below the harness's best (default {DEFAULT_TOL})")
    parser.add_argument("--duration", type=float, default=240, help="seconds of soak per config")
    parser.add_argument("--rate", type=float, default=2.0, help="session arrivals per second")
    parser.add_argument("--overrides", default="server,none,snapkv@0.2,laq@0.1,dapq@0.1")
    parser.add_argument("--abort-fraction", type=float, default=0.15)
    parser.add_argument("--max-total-tokens", type=int, default=40_000, help="KV pool, small enough to retract")
    parser.add_argument("--chunked-prefill-size", type=int, default=4096)
    parser.add_argument("--context-len", type=int, default=32768)
    parser.add_argument("--start-timeout", type=float, default=300)
    parser.add_argument("--deadline", type=float, default=560, help="seconds for the whole script")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--commit", default="")
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/soak"))
    args = parser.parse_args(argv)
    names = [c for c in args.configs.split(",") if c]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown or not names:
        raise SystemExit(f"soak: --configs: unknown {', '.join(unknown) or '(none given)'}; choose from "
                         f"{', '.join(CONFIGS)}")
    try:
        overrides = [o for o in args.overrides.split(",") if o]
        for o in overrides:
            parse_override(o)
    except ValueError as err:
        raise SystemExit(f"soak: {err}") from None
    check_setup()
    t_start = time.monotonic()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tiny = args.model == TINY
    replaying = tiny and args.replay > 0
    soft_tokens = None
    if tiny:
        model = write_tiny_llama(Path("/tmp/tiny-llama-32k"), initializer_range=0.06, max_positions=args.context_len)
        weights, vocab = [], TINY_VOCAB
        soft_tokens = write_soft_tokens(model)
    else:
        model, weights, vocab = write_model_config(args.model), ["--load-format", "dummy"], DEFAULT_VOCAB
    # the longest session (4K system prompt, 10 turns of 2K) stays below the 32K context
    mix = AgentMix(system_tokens=(512, 4096), group_size=4, turns=(2, 10), tool_tokens=(256, 2048),
                   reply_median=48, reply_tokens=(4, 512), think_mean_s=2.0)
    doc = {"command": " ".join([sys.executable, "-m", "bench.gpu.soak", *(sys.argv[1:] if argv is None else argv)]),
           "commit": args.commit, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": gpu_query("name"), "versions": {m: _version(m) for m in ("sglang", "torch", "sgl-evict")},
           "settings": vars(args), "configs": {}}
    for i, name in enumerate(names):
        left = args.deadline - (time.monotonic() - t_start)
        # 120 s: a server's start, 62-150 s seen on the H100
        need = args.duration + 120 + STOP_MARGIN_S + (REPLAY_S if replaying else 0)
        if left < need:
            doc["configs"][name] = {"error": f"skipped: {left:.0f} s left, the soak needs {need:.0f} s "
                                             f"({args.duration:.0f} s of soak, 120 s to start the server, "
                                             f"{STOP_MARGIN_S} s to stop it, "
                                             f"{REPLAY_S if replaying else 0} s to replay)"}
            print(f"[soak] {name}: {doc['configs'][name]['error']}", file=sys.stderr, flush=True)
            continue
        sent, judgeq_flags = config_overrides(name, overrides, soft_tokens)
        server_args = ["--model-path", str(model), *weights, "--skip-tokenizer-init",
                       "--context-length", str(args.context_len), "--max-total-tokens", str(args.max_total_tokens),
                       "--chunked-prefill-size", str(args.chunked_prefill_size), "--mem-fraction-static", "0.8",
                       "--kv-evict-policy", "snapkv", "--kv-evict-budget", "0.1", *CONFIGS[name], *judgeq_flags]
        env = {"SGL_EVICT_LOG_KEEP": "1"} if replaying else {}
        server = ServerProcess(name, 31600 + i, server_args, env, out)
        result: dict = {"server_command": server.cmd}
        try:
            ready = server.wait_healthy(min(args.start_timeout, left - args.duration - STOP_MARGIN_S))
            result["healthy_after_s"] = ready
            if ready is None:
                result["error"] = "not healthy in time"
            else:
                result["soak"] = asyncio.run(run_soak(
                    server.port, args.duration, args.rate, args.seed, mix, sent, args.abort_fraction,
                    flush_every_s=45, bad_every_s=20, context_len=args.context_len, vocab=vocab,
                    progress=lambda text: print(f"[soak] {name}: {text}", file=sys.stderr, flush=True)))
        except Exception as err:  # noqa: BLE001 - the JSON must say what failed
            result["error"] = repr(err)
        finally:
            stop_and_record(server, result)
            result["log"] = log_checks(server.log_path)
        summary = result.get("soak", {}).get("summary", {})
        result["ok"] = bool(summary.get("ok")) and result["alive_at_end"] and result["log"]["tracebacks"] == 0 \
            and result["log"]["leak_lines"] == 0
        if replaying and "soak" in result:
            try:
                result["replay"] = replay_served(
                    model, result["soak"], server.log_path.read_text(errors="replace"), sent, args.seed, mix,
                    args.replay, args.replay_tol, t_start + args.deadline - STOP_MARGIN_S,
                    lambda text: print(f"[soak] {name}: {text}", file=sys.stderr, flush=True))
            except Exception as err:  # noqa: BLE001 - the JSON must say what failed
                result["replay"] = {"ok": False, "error": repr(err)}
            result["log"]["keep_lines_dropped"] = slim_log(server.log_path)
            result["ok"] = result["ok"] and result["replay"]["ok"]
        if "soak" in result:  # answers' ids: only those the replay flagged stay in the JSON
            flagged = {r["rid"] for r in result.get("replay", {}).get("mismatched_requests", [])}
            for row in result["soak"]["requests"]:
                if row["rid"] not in flagged:
                    row.pop("output_ids", None)
        doc["configs"][name] = result
        print(f"[soak] {name}: ok={result['ok']} {json.dumps(summary)}", file=sys.stderr, flush=True)
        (out / "soak.json").write_text(json.dumps(doc, indent=1))
    doc["wall_s"] = time.monotonic() - t_start
    (out / "soak.json").write_text(json.dumps(doc, indent=1))
    return 0 if all(c.get("ok") for c in doc["configs"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
