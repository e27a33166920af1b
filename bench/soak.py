"""Load and faults against a running evicting SGLang server, with its invariants checked (issue 24).

    python -m bench.soak --port 30000 --duration 600 --rate 0.5 --overrides none,snapkv@0.2,laq@0.1 \\
        --abort-fraction 0.15 --flush-every 45 --bad-input-every 20 --out soak.json

For ``--duration`` seconds, multi-turn agent sessions arrive by a Poisson process (bench/workloads.py's open-loop
mix; groups share system prompts, so compressed prefixes are reused and shared) and, at the same time:

- **overrides**: each session sends every turn with one ``kv_evict`` override drawn from ``--overrides``
  (``none``, ``server`` for the server's own setting, or ``policy@budget``), so several radix namespaces are live;
- **client aborts**: a ``--abort-fraction`` of requests is closed by the client after a random delay (before the
  first token: mid-prefill, or during decode, laq's lookahead steps included); the session ends there;
- **cache flushes**: ``POST /flush_cache`` every ``--flush-every`` seconds while requests run (SGLang refuses it
  while requests are in flight; both outcomes are counted);
- **bad input**: every ``--bad-input-every`` seconds one malformed request from :data:`BAD_INPUTS` (wrong types,
  unknown keys, budgets out of range, an unknown policy, an empty prompt, a prompt longer than the server's
  context): each must fail alone, with a message, and the server must stay healthy.

Checked: ``/health`` every second (failures counted); no request of the normal traffic fails except by its own
abort; no session's first turn takes a prefix cached under another override (:func:`namespace_check`); after the
traffic, once the server is idle and its cache flushed, **no KV slot is in use** (``/v1/loads``:
``num_used_tokens`` back to 0) and the server is healthy. The GPU driver adds the server log's checks (SGLang's own
idle leak check raises there, and no traceback may appear).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.open_loop import arrival_times, flush_cache
from bench.serve_bench import OpenStreams, RequestRecord, read_server_load, stream_generate
from bench.workloads import DEFAULT_VOCAB, AgentMix, int_range, next_prompt, open_agent_session

HOST = "127.0.0.1"
#: (name, request body builder given a valid prompt and the server's context length): each must fail by itself
BAD_INPUTS = (
    ("budget of the wrong type", lambda p, n: _body(p, {"policy": "snapkv", "budget": "lots"})),
    ("budget above 1", lambda p, n: _body(p, {"policy": "snapkv", "budget": 1.5})),
    ("negative budget", lambda p, n: _body(p, {"policy": "snapkv", "budget": -3})),
    ("unknown key", lambda p, n: _body(p, {"policy": "snapkv", "budget": 0.1, "windoww": 8})),
    ("unknown policy", lambda p, n: _body(p, {"policy": "h2o", "budget": 0.1})),
    ("override not an object", lambda p, n: _body(p, "snapkv")),
    ("window of the wrong type", lambda p, n: _body(p, {"policy": "snapkv", "budget": 0.1, "window": [4]})),
    ("granularity per request", lambda p, n: _body(p, {"policy": "snapkv", "budget": 0.1,
                                                        "granularity": "per_layer"})),
    ("empty prompt", lambda p, n: _body([], {"policy": "snapkv", "budget": 0.1})),
    ("prompt longer than the context", lambda p, n: _body(p * (n // max(1, len(p)) + 2), None)),
)


def _body(prompt: list[int], kv_evict) -> dict:
    params = {"max_new_tokens": 4, "temperature": 0}
    if kv_evict is not None:
        params["custom_params"] = {"kv_evict": kv_evict}
    return {"input_ids": prompt, "sampling_params": params}


def parse_override(text: str) -> dict | None:
    """``server`` -> None (the server's setting); ``none`` -> ``{"policy": "none"}``; ``laq@0.1`` -> policy and
    budget; ValueError for anything else."""
    if text == "server":
        return None
    if text == "none":
        return {"policy": "none"}
    policy, sep, budget = text.partition("@")
    try:
        value = float(budget)
    except ValueError:
        value = None
    if not sep or not policy or value is None:
        raise ValueError(f"--overrides: {text!r} is not server, none or policy@budget (e.g. laq@0.1)")
    return {"policy": policy, "budget": int(value) if value >= 1 else value}


def post_json(port: int, path: str, body: dict, timeout_s: float = 60.0) -> tuple[int, str]:
    """(HTTP status, body text) of a non-streamed POST; status 0 when the connection failed."""
    req = urllib.request.Request(f"http://{HOST}:{port}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")
    except OSError as err:
        return 0, repr(err)


def healthy(port: int, timeout_s: float = 5.0) -> bool:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}/health", timeout=timeout_s) as resp:
            return resp.status == 200
    except OSError:
        return False


def bad_input_failed_alone(status: int, text: str) -> bool:
    """A malformed request failed by itself: an HTTP error status with a message, or a 200 whose body is an error
    or an abort (SGLang aborts a request whose ``kv_evict`` is invalid, with the reason)."""
    if status == 0:
        return False
    if status >= 400:
        return bool(text.strip())
    try:
        doc = json.loads(text)
    except ValueError:
        return False
    reason = (doc.get("meta_info") or {}).get("finish_reason") or {}
    return "error" in doc or (isinstance(reason, dict) and reason.get("type") == "abort")


async def run_soak(port: int, duration_s: float, rate: float, seed: int, mix: AgentMix, overrides: list[str],
                   abort_fraction: float, flush_every_s: float, bad_every_s: float, context_len: int,
                   vocab: tuple[int, int] = DEFAULT_VOCAB, idle_timeout_s: float = 120.0, settle_s: float = 30.0,
                   progress=None) -> dict:
    """Runs the soak; returns ``{"summary", "requests", "bad_inputs", "flushes", "health", "idle"}``. Each request
    row holds its ``rid`` (the id SGLang logs it under, :func:`request_id`) and ``output_ids`` (the answer's
    tokens, which later turns' prompts hold: :func:`prompt_of`)."""
    loop = asyncio.get_running_loop()
    pool = ThreadPoolExecutor(max_workers=512, thread_name_prefix="soak")
    kinds = [parse_override(o) for o in overrides]
    t0 = time.monotonic()
    end = t0 + duration_s
    records: list[tuple[RequestRecord, str, bool, str]] = []  # (record, override, aborted by us, request id)
    bad, flushes, health = [], Counter(), Counter()

    async def session(index: int, at: float) -> None:
        await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
        s = open_agent_session(index, seed, mix, vocab)
        pick = random.Random(f"soak-session:{seed}:{index}")
        which = pick.randrange(len(overrides))
        prompt, reply = [], []
        for i, turn in enumerate(s.turns):
            if i:
                await asyncio.sleep(turn.think_s)
            if time.monotonic() >= end:
                return
            prompt = next_prompt(prompt, reply, turn)
            record = RequestRecord(index, i, time.monotonic() - t0, len(prompt), turn.max_new_tokens)
            abort = pick.random() < abort_fraction
            streams = OpenStreams()
            if abort:  # closed by the client: before the first token or during decode
                loop.call_later(pick.uniform(0.0, 2.0), streams.close_all)
            rid = request_id(seed, index, i)
            records.append((record, overrides[which], abort, rid))
            custom = None if kinds[which] is None else {"kv_evict": kinds[which]}
            await loop.run_in_executor(pool, stream_generate, port, record, prompt, float("inf"), streams, 600.0,
                                       1, custom, rid)
            if abort or not record.finished or record.error:
                return
            reply = record.output_ids

    async def faults() -> None:
        next_flush, next_bad, k = t0 + flush_every_s, t0 + bad_every_s, 0
        tick = min([1.0] + [x for x in (flush_every_s, bad_every_s) if x > 0])
        probe = [DEFAULT_VOCAB[0] + i for i in range(64)]
        while time.monotonic() < end:
            now = time.monotonic()
            if flush_every_s > 0 and now >= next_flush:
                ok = await loop.run_in_executor(None, flush_cache, port, 1.0)
                flushes["accepted" if ok else "refused (requests running)"] += 1
                next_flush += flush_every_s
            if bad_every_s > 0 and now >= next_bad:
                name, build = BAD_INPUTS[k % len(BAD_INPUTS)]
                status, text = await loop.run_in_executor(None, post_json, port, "/generate",
                                                          build(probe, context_len))
                alive = await loop.run_in_executor(None, healthy, port)
                bad.append({"input": name, "status": status, "message": text[:300],
                            "failed_alone": bad_input_failed_alone(status, text), "healthy_after": alive})
                k += 1
                next_bad += bad_every_s
            health["ok" if await loop.run_in_executor(None, healthy, port) else "failed"] += 1
            await asyncio.sleep(tick)

    times = arrival_times(rate, duration_s, seed)
    tasks = [asyncio.create_task(session(k, at)) for k, at in enumerate(times)]
    fault_task = asyncio.create_task(faults())
    last = t0
    while not all(t.done() for t in tasks):
        await asyncio.sleep(1.0)
        if progress and time.monotonic() - last > 30:
            last = time.monotonic()
            progress(f"{time.monotonic() - t0:.0f} s: {len(records)} requests sent")
    await fault_task
    pool.shutdown(wait=True)
    idle = await loop.run_in_executor(None, wait_idle, port, idle_timeout_s, settle_s)
    requests = [{**r.to_json(), "override": o, "client_abort": a, "rid": rid, "output_ids": r.output_ids}
                for r, o, a, rid in records]
    namespaces = namespace_check(requests, mix.group_size)
    return {"summary": summarize([x[:3] for x in records], bad, flushes, health, idle, len(times), namespaces),
            "requests": requests, "bad_inputs": bad, "flushes": dict(flushes), "health": dict(health), "idle": idle}


def request_id(seed: int, session: int, turn: int) -> str:
    """The ``rid`` the soak sends turn ``turn`` of session ``session`` under (SGLang logs requests by it)."""
    return f"soak{seed}-{session}-{turn}"


def prompt_of(row: dict, rows: list[dict], seed: int, mix: AgentMix, vocab: tuple[int, int] = DEFAULT_VOCAB
              ) -> list[int]:
    """The prompt a soak request row was sent with: its session's turns so far (rebuilt from ``seed`` and ``mix``)
    and the answers of its earlier turns (``rows``: the run's rows, with ``output_ids``)."""
    session = open_agent_session(row["session_id"], seed, mix, vocab)
    answers = {r["turn"]: r["output_ids"] for r in rows if r["session_id"] == row["session_id"]}
    prompt: list[int] = []
    for i in range(row["turn"] + 1):
        prompt = next_prompt(prompt, answers[i - 1] if i else [], session.turns[i])
    return prompt


#: cached tokens of a first turn beyond a chance match of its first tokens: a hit on a system prompt (256-8K tokens)
PREFIX_HIT_TOKENS = 64


def namespace_check(requests: list[dict], group_size: int) -> dict:
    """No session's first turn reads a prefix cached under another ``kv_evict`` override (another radix namespace).

    ``requests``: the soak's request rows (``session_id``, ``turn``, ``start_s``, ``cached_tokens``, ``override``);
    sessions ``i`` and ``j`` share a system prompt when ``i // group_size == j // group_size``. A first turn may
    take a prefix from the cache only if a session of its group with the same override started before it; one
    that took ``PREFIX_HIT_TOKENS`` or more without such a session read another namespace's prefix (``leaks``).
    ``exposed``: first turns started after another namespace of their group had sent the same system prompt, and
    none of their own: where a leak would show. (An override equal to the server's own setting shares its
    namespace; the soak's default overrides differ from it.)"""
    by_group: dict[int, list[dict]] = {}
    for q in requests:
        by_group.setdefault(q["session_id"] // group_size, []).append(q)
    firsts = [r for r in requests if r["turn"] == 0]
    leaks, exposed = [], 0
    for r in firsts:
        earlier = [q for q in by_group[r["session_id"] // group_size] if q["start_s"] < r["start_s"]]
        own = any(q["override"] == r["override"] for q in earlier)
        exposed += bool(earlier) and not own
        if not own and (r.get("cached_tokens") or 0) >= PREFIX_HIT_TOKENS:
            leaks.append({"session_id": r["session_id"], "override": r["override"],
                          "cached_tokens": r["cached_tokens"]})
    return {"first_turns": len(firsts), "exposed": exposed, "leaks": leaks}


def wait_idle(port: int, timeout_s: float, settle_s: float = 30.0) -> dict:
    """Waits for no running or waiting request, flushes the cache, and reads the KV in use (0 when nothing
    leaked; read for up to ``settle_s``): ``{"idle", "flushed", "used_kv_tokens", "healthy"}``."""
    end = time.monotonic() + timeout_s
    load = None
    while time.monotonic() < end:
        load = read_server_load(port) or {}
        if not load.get("num_running_reqs") and not load.get("num_waiting_reqs"):
            break
        time.sleep(1.0)
    flushed = flush_cache(port, max(1.0, end - time.monotonic()))
    # the load snapshot is republished periodically (--load-snapshot-publish-interval, 15 s by default): wait for one
    # that says 0 tokens in use, or report the last one read
    used, until = None, time.monotonic() + settle_s
    while time.monotonic() < until:
        used = (read_server_load(port) or {}).get("num_used_tokens")
        if used == 0:
            break
        time.sleep(1.0)
    return {"idle": load is not None and not load.get("num_running_reqs"), "flushed": flushed,
            "used_kv_tokens": used, "healthy": healthy(port)}


def summarize(records, bad, flushes, health, idle, sessions: int, namespaces: dict | None = None) -> dict:
    """Counts and the verdicts: no unexpected error, every bad input failed alone, health, KV back to idle, and
    (given :func:`namespace_check`'s result) no first turn read another namespace's prefix."""
    ours = [r for r, _, aborted in records if not aborted]
    unexpected = Counter((r.error or "")[:120] for r in ours if r.error is not None or not r.finished)
    checks = {
        "no request failed but by its own abort": not unexpected,
        "every bad input failed alone, server healthy after": bool(bad) and all(
            b["failed_alone"] and b["healthy_after"] for b in bad),
        "healthy throughout": health.get("failed", 0) == 0,
        "no KV in use once idle and flushed": idle.get("flushed") and idle.get("used_kv_tokens") == 0,
        "healthy at the end": bool(idle.get("healthy")),
    }
    if namespaces is not None:
        checks["no first turn read another namespace's prefix"] = not namespaces["leaks"]
    return {"sessions": sessions, "requests": len(records), "completed": sum(r.finished and not r.error
                                                                          for r, _, _ in records),
            "client_aborts": sum(a for _, _, a in records),
            "by_override": dict(Counter(o for _, o, _ in records)),
            "unexpected_errors": dict(unexpected), "bad_inputs": len(bad), "flushes": dict(flushes),
            **({"namespaces": namespaces} if namespaces is not None else {}),
            "checks": {k: bool(v) for k, v in checks.items()}, "ok": all(bool(v) for v in checks.values())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True, help="server on 127.0.0.1:PORT")
    parser.add_argument("--duration", type=float, default=600, help="seconds of traffic (600)")
    parser.add_argument("--rate", type=float, default=0.5, help="session arrivals per second (0.5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overrides", default="server,none,snapkv@0.2,laq@0.1",
                        help="per-session kv_evict: server, none or policy@budget, comma-separated")
    parser.add_argument("--abort-fraction", type=float, default=0.15, help="requests the client closes early")
    parser.add_argument("--flush-every", type=float, default=45, help="seconds between /flush_cache (0: never)")
    parser.add_argument("--bad-input-every", type=float, default=20, help="seconds between bad requests (0: never)")
    parser.add_argument("--context-len", type=int, default=32768, help="the server's --context-length")
    parser.add_argument("--turns", default="2,12", help="turns per session, LOW,HIGH")
    parser.add_argument("--tool-tokens", default="256,4096", help="tool output tokens, LOW,HIGH")
    parser.add_argument("--think-mean", type=float, default=2.0, help="seconds between turns, mean")
    parser.add_argument("--vocab", default=f"{DEFAULT_VOCAB[0]},{DEFAULT_VOCAB[1]}", help="LO,HI token id range")
    parser.add_argument("--out", help="write the JSON here")
    args = parser.parse_args(argv)
    try:
        overrides = [o for o in args.overrides.split(",") if o]
        for o in overrides:
            parse_override(o)
        turns = int_range(args.turns, "--turns")
        tools = int_range(args.tool_tokens, "--tool-tokens")
        vocab = int_range(args.vocab, "--vocab")
        mix = AgentMix(system_tokens=(256, 2048), group_size=4, turns=turns, tool_tokens=tools,
                       reply_median=32, reply_tokens=(4, 256), think_mean_s=args.think_mean)
        mix.validate()
    except ValueError as err:
        raise SystemExit(f"soak: {err}") from None
    if not overrides or not 0 <= args.abort_fraction <= 1 or args.duration <= 0 or args.rate <= 0:
        raise SystemExit("soak: give overrides, an --abort-fraction in [0, 1], a positive --duration and --rate")
    result = asyncio.run(run_soak(args.port, args.duration, args.rate, args.seed, mix, overrides,
                                  args.abort_fraction, args.flush_every, args.bad_input_every, args.context_len,
                                  vocab, progress=lambda text: print(f"[soak] {text}", file=sys.stderr)))
    result["config"] = {**vars(args), "command": "python -m bench.soak " + " ".join(sys.argv[1:] if argv is None
                                                                                   else argv)}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result["summary"], indent=1))
    return 0 if result["summary"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
