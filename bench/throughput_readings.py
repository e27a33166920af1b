"""Readings from throughput.py's per-request records that its summary does not give: the runs compared over the same
window, over the same work, and at a steady state of whole sessions.

Why: requests/s of the agent workload depends on which turns a run served. Turn k of a session carries k tool outputs
of history, and a server that re-prefills histories (plain SGLang once they fall out of its pool) slows down turn by
turn until sessions start finishing. A short run of such a server is measured on its cheap early turns; a longer one
on its expensive later turns, and the two servers of a comparison rarely ran equally long or reached the same turns.

Every reading counts a request only if it finished inside the run (not cut at the deadline, no error); a request's
prefilled tokens are its prompt less the tokens the server reported cached (requests without that report are left
out of the prefill readings, as serve_bench's cache hit rate leaves them out).
"""

from __future__ import annotations


def finished_requests(config: dict) -> list[dict]:
    return [r for r in config["requests"] if r["finished"] and not r["cut"] and not r["error"]]


def end_s(request: dict) -> float:
    return request["start_s"] + request["latency_s"]


def prefilled_tokens(request: dict) -> int | None:
    """Prompt tokens the server computed (not served from its prefix cache); None where it reported no cache count."""
    cached = request["cached_tokens"]
    return None if cached is None else request["prompt_tokens"] - cached


def rate_in_window(config: dict, window_s: float) -> float:
    """Requests/s over the first ``window_s`` seconds of the workload (requests that ended by then)."""
    return sum(end_s(r) <= window_s for r in finished_requests(config)) / window_s


def prefilled_per_turn(config: dict, min_share: float = 0.1) -> dict[int, float]:
    """Mean prefilled tokens of each turn served by at least ``min_share`` as many requests as turn 0 (a turn that
    a handful of sessions reached is their outliers, not the turn)."""
    by_turn: dict[int, list[int]] = {}
    for r in finished_requests(config):
        if (tokens := prefilled_tokens(r)) is not None:
            by_turn.setdefault(r["turn"], []).append(tokens)
    floor = min_share * len(by_turn.get(0, ()))
    return {t: sum(v) / len(v) for t, v in sorted(by_turn.items()) if len(v) >= max(floor, 1)}


def prefill_rate(config: dict) -> float:
    """Prefilled tokens/s over the run: what the GPU sustained when it was busy with this server's work."""
    tokens = (prefilled_tokens(r) for r in finished_requests(config))
    return sum(t for t in tokens if t is not None) / config["summary"]["duration_s"]


def steady_state_rate(config: dict, turns: int) -> tuple[float, int]:
    """Requests/s of a steady state where every session runs ``turns`` turns and the server prefills at its measured
    rate: ``turns x prefill_rate / prefilled tokens per session``. Turns the run did not reach continue the last two
    measured turns linearly (each turn adds one tool output). Returns (rate, number of turns extrapolated). Decode
    time is left out, so this holds for a prefill-bound server; check it against a server that ran whole sessions."""
    per_turn = prefilled_per_turn(config)
    measured = [per_turn[t] for t in sorted(per_turn) if t < turns]
    missing = turns - len(measured)
    step = measured[-1] - measured[-2] if len(measured) >= 2 else 0.0
    session_tokens = sum(measured) + sum(measured[-1] + step * (i + 1) for i in range(missing))
    return turns * prefill_rate(config) / session_tokens, missing


def same_work_s(config: dict, sessions: int, last_turn: int) -> float | None:
    """Seconds until turns 0..``last_turn`` of sessions 0..``sessions - 1`` had all finished; None if some did not."""
    done = {(r["session_id"], r["turn"]): end_s(r) for r in finished_requests(config)}
    ends = [done.get((s, t)) for s in range(sessions) for t in range(last_turn + 1)]
    return None if None in ends else max(ends)


def readings_table(doc: dict) -> str:
    """Markdown: per config the rate over the shortest run's window, the prefill rate, prefilled tokens per turn, the
    steady-state rate of whole sessions, and the time for the largest common work; evict / plain ratios below."""
    settings = doc["settings"]
    configs = {n: c for n, c in doc["configs"].items() if c.get("requests") and c.get("summary")}
    if not configs or settings.get("workload", "agent") != "agent":  # single turns: requests/s says it all
        return ""
    turns, sessions = settings["turns"], settings["concurrency"]
    window = min(c["summary"]["duration_s"] for c in configs.values())
    common = max((t for t in range(turns)
                  if all(same_work_s(c, sessions, t) is not None for c in configs.values())), default=None)
    work_head = "same work: none finished by all" if common is None else f"turns 0-{common} of {sessions} sessions (s)"
    head = (f"| config | run (s) | req/s over {window:.0f} s | prefilled tok/s | prefilled tokens per turn | "
            f"steady state, {turns}-turn sessions (req/s) | {work_head} |")
    rows = [head, "|" + " --- |" * (head.count("|") - 1)]
    values = {}
    for name, c in configs.items():
        steady, guessed = steady_state_rate(c, turns)
        work = same_work_s(c, sessions, common) if common is not None else None
        values[name] = (rate_in_window(c, window), steady, work)
        per_turn = " / ".join(f"{v / 1000:.1f}K" for v in prefilled_per_turn(c).values())
        rows.append(f"| {name} | {c['summary']['duration_s']:.0f} | {values[name][0]:.2f} | "
                    f"{prefill_rate(c) / 1000:.1f}K | {per_turn} | {steady:.2f}"
                    f"{f' ({guessed} turns extrapolated)' if guessed else ''} | "
                    f"{'-' if work is None else f'{work:.0f}'} |")
    if {"plain", "evict"} <= values.keys():
        (pw, ps, pt), (ew, es, et) = values["plain"], values["evict"]
        ratios = [f"same window {ew / pw:.2f}x" if pw else None, f"steady state {es / ps:.2f}x" if ps else None,
                  f"same work {pt / et:.2f}x" if pt and et else None]
        rows.append("\nevict / plain: " + ", ".join(r for r in ratios if r))
    return "\n".join(rows)
