"""Replays a sample of a soak's answers on the HF harness with the keep-sets the server logged (issue 24).

A served answer is correct when each of its greedy tokens is what the model predicts from the KV the server kept:
the prompt's logged keep-set (``SGL_EVICT_LOG_KEEP=1``), the answer's earlier tokens, and for laq the snapkv view
its lookahead steps decoded on. The harness recomputes those predictions teacher-forced, in another code base
(HF attention over a gathered cache, not SGLang's paged kernels over compacted rows), and a token counts as a
mismatch when the harness puts it more than ``tol`` nats below its own best token: numerical noise moves logits
by hundredths; a slot read from another request, a hole read as a token or a wrong position moves them by whole
nats. Near-ties below ``tol`` are reported as flips, not mismatches.

Which requests replay: finished, not aborted by the client, never retracted, nothing read from the prefix cache
(a cached, compressed prefix was computed by an earlier request: replaying it needs that request's history), and
exactly the evictions their policy makes (none for ``none``; one ``keeps positions`` line of the prompt's length,
and for laq one ``looks ahead on positions`` line). The first token comes from the full prefill (eviction follows
it); laq's next ``lookahead_steps`` come from its snapkv view; the rest from the kept prompt and the answer so far.
"""

from __future__ import annotations

import json
import random
import re
import time
from dataclasses import dataclass, field

KEEPS = re.compile(r"sgl-evict: request (\S+) keeps positions (\[[\d, ]*\])")
#: a per_layer server's line: one position list per layer group
KEEPS_PER_GROUP = re.compile(r"sgl-evict: request (\S+) keeps per group (\[[\d, \[\]]*\])")
LOOKS_AHEAD = re.compile(r"sgl-evict: request (\S+) looks ahead on positions (\[[\d, ]*\])")
KEPT_OF = re.compile(r"sgl-evict: request (\S+) kept \d+ of (\d+) tokens(?:, freed| in some group)")
#: below this gap (nats) under the harness's best token, a served token is a near-tie, not a mismatch
DEFAULT_TOL = 0.5


@dataclass
class LoggedEvictions:
    """Per request id, what a server run with ``SGL_EVICT_LOG_KEEP=1`` logged: kept positions of each eviction
    (a list of positions, or on a ``per_layer`` server one list per layer group), the logical length of each, and
    laq's lookahead views."""

    keeps: dict[str, list[list]] = field(default_factory=dict)
    lengths: dict[str, list[int]] = field(default_factory=dict)
    lookahead: dict[str, list[list[int]]] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> LoggedEvictions:
        out = cls()
        for pattern, into in ((KEEPS, out.keeps), (KEEPS_PER_GROUP, out.keeps), (LOOKS_AHEAD, out.lookahead)):
            for rid, found in pattern.findall(text):
                into.setdefault(rid, []).append(json.loads(found))
        for rid, n in KEPT_OF.findall(text):
            out.lengths.setdefault(rid, []).append(int(n))
        return out


@dataclass
class ReplayCase:
    """One served answer to replay: its prompt and tokens, the kept prompt positions (None: the full cache; a list
    per layer group for ``per_layer``) and, for laq, the positions its lookahead steps saw and how many steps it
    took."""

    rid: str
    policy: str
    prompt: list[int]
    output: list[int]
    keep: list[int] | list[list[int]] | None
    lookahead: list[int] | None = None
    steps: int = 0


def why_not_replayable(row: dict, policy: str, logged: LoggedEvictions) -> str | None:
    """None when ``row`` (a soak request row with ``rid``, ``output_ids``; ``policy`` its effective policy) can be
    replayed from ``logged``; else the reason, counted in the report."""
    rid = row.get("rid")
    if row.get("client_abort") or not row.get("finished") or row.get("error"):
        return "aborted or unfinished"
    if row.get("retractions"):
        return "retracted (prefilled again with part of its answer)"
    if row.get("cached_tokens"):
        return "read a cached prefix"
    if len(row.get("output_ids") or []) < 2:
        return "answer shorter than 2 tokens"
    keeps, lengths = logged.keeps.get(rid, []), logged.lengths.get(rid, [])
    if policy == "none":
        return None if not keeps else "evicted although its policy is none"
    if len(keeps) != 1 or lengths != [row["prompt_tokens"]]:
        return f"{len(keeps)} logged evictions of lengths {lengths}, not one of the prompt's"
    if policy == "laq" and len(logged.lookahead.get(rid, [])) != 1:
        return "laq without one logged lookahead view"
    return None


def pick_cases(rows: list[dict], policies: dict[str, str], logged: LoggedEvictions, prompt_of, sample: int,
               seed: int, lookahead_steps: int) -> tuple[list[ReplayCase], dict[str, int]]:
    """Up to ``sample`` replayable rows, drawn with ``seed``; ``policies``: override name -> effective policy
    (``none``, ``snapkv``, ``laq``, ...); ``prompt_of(row)``: the row's prompt ids. Returns the cases and the count
    of rows left out per reason."""
    skipped: dict[str, int] = {}
    ok = []
    for row in rows:
        policy = policies[row["override"]]
        reason = why_not_replayable(row, policy, logged)
        if reason is None:
            ok.append((row, policy))
        else:
            skipped[reason] = skipped.get(reason, 0) + 1
    random.Random(seed).shuffle(ok)
    cases = []
    for row, policy in ok[:sample]:
        rid = row["rid"]
        is_laq = policy == "laq"
        cases.append(ReplayCase(rid, policy, prompt_of(row), list(row["output_ids"]),
                                None if policy == "none" else logged.keeps[rid][0],
                                logged.lookahead[rid][0] if is_laq else None, lookahead_steps if is_laq else 0))
    return cases, skipped


def _keep_set(positions: list[int] | list[list[int]], seq_len: int, harness):
    """A :class:`~sgl_evict.selection.KeepSet` of logged positions: one list for every layer, or one per group of
    consecutive layers (``per_layer``: G groups of L / G layers each)."""
    import torch

    from sgl_evict.layer_groups import GroupLayout
    from sgl_evict.selection import KeepSet

    groups = positions if positions and isinstance(positions[0], list) else [positions]
    layout = GroupLayout(harness.config.num_hidden_layers, len(groups))  # the server's grouping
    heads = harness.config.num_key_value_heads
    out = []
    for layer in harness.layers:
        idx = torch.tensor(groups[layout.group_of(layer)], dtype=torch.long, device=harness.device)
        out.append(idx[None].expand(heads, -1).contiguous())
    return KeepSet(out, seq_len)


def _cat_answer(harness, cache, source, start: int):
    """``cache`` (compressible layers) with ``source``'s entries from index ``start`` on appended: the KV of answer
    tokens computed on another view of the prompt (laq's lookahead steps)."""
    import torch

    for layer in harness.layers:
        entry, src = cache.layers[layer], source.layers[layer]
        entry.keys = torch.cat([entry.keys, src.keys[:, :, start:]], dim=2)
        entry.values = torch.cat([entry.values, src.values[:, :, start:]], dim=2)
    return cache


def reference_logprobs(harness, case: ReplayCase):
    """``[len(output), vocab]`` float32 log-probabilities the harness gives each served token's step, with the
    server's caches: full prefill for token 0; for laq, the lookahead view for the next ``steps``; then the kept
    prompt (full for ``none``) plus the answer so far."""
    import torch

    state = harness.prefill(torch.tensor([case.prompt]))
    n, out = state.seq_len, case.output
    rows = [torch.log_softmax(state.last_logits, dim=-1)]
    done, view = 0, None  # answer tokens fed so far; the lookahead view's cache, for its answer KV
    if case.lookahead is not None and case.steps:
        if len(harness.layers) != harness.config.num_hidden_layers:
            raise ValueError("laq replay needs every layer compressible (no sliding-window layers)")
        view = harness._compressed_cache(state, _keep_set(case.lookahead, n, harness))
        done = min(case.steps, len(out) - 1)
        ids = torch.tensor([out[:done]], device=harness.device)
        rows.append(torch.log_softmax(harness._extend(view, torch.arange(n, n + done), input_ids=ids), dim=-1))
    if done < len(out) - 1:
        if case.keep is None:
            cache = harness._shallow_copy(state.cache)
        else:
            cache = harness._compressed_cache(state, _keep_set(case.keep, n, harness))
        if view is not None:
            # the lookahead steps' own KV was computed on the view; their layers' cache ends with those entries
            view_len = view.layers[harness.layers[0]].keys.shape[2]
            cache = _cat_answer(harness, cache, view, view_len - done)
        ids = torch.tensor([out[done:-1]], device=harness.device)
        positions = torch.arange(n + done, n + len(out) - 1)
        rows.append(torch.log_softmax(harness._extend(cache, positions, input_ids=ids), dim=-1))
    return torch.cat([r.reshape(-1, r.shape[-1]) for r in rows])


def _kept_count(keep: list) -> int | list[int]:
    return [len(g) for g in keep] if keep and isinstance(keep[0], list) else len(keep)


def replay_case(harness, case: ReplayCase, tol: float = DEFAULT_TOL) -> dict:
    """Gap (nats) of each served token under the harness's best token; mismatches above ``tol``."""
    import torch

    logp = reference_logprobs(harness, case)
    tokens = torch.tensor(case.output, device=logp.device)
    gaps = (logp.max(dim=-1).values - logp[torch.arange(len(case.output)), tokens]).tolist()
    bad = [i for i, g in enumerate(gaps) if g > tol]
    return {"rid": case.rid, "policy": case.policy, "prompt_tokens": len(case.prompt), "tokens": len(gaps),
            "kept": None if case.keep is None else _kept_count(case.keep), "max_gap": max(gaps),
            "flips": sum(0 < g <= tol for g in gaps), "mismatches": len(bad),
            "first_mismatch": bad[0] if bad else None}


def replay(harness, cases: list[ReplayCase], tol: float = DEFAULT_TOL, deadline: float | None = None,
           progress=None) -> dict:
    """Replays ``cases`` (until ``time.monotonic()`` passes ``deadline``); the report and its verdict."""
    results, t0 = [], time.monotonic()
    for i, case in enumerate(cases):
        if deadline is not None and time.monotonic() > deadline:
            break
        results.append(replay_case(harness, case, tol))
        if progress and (i + 1) % 25 == 0:
            progress(f"replayed {i + 1}/{len(cases)} in {time.monotonic() - t0:.0f} s")
    tokens = sum(r["tokens"] for r in results)
    gaps = sorted(r["max_gap"] for r in results)
    by_policy: dict[str, int] = {}
    for r in results:
        by_policy[r["policy"]] = by_policy.get(r["policy"], 0) + 1
    return {"tol": tol, "requests": len(results), "of_sampled": len(cases), "tokens": tokens,
            "by_policy": by_policy, "flips": sum(r["flips"] for r in results),
            "mismatched_tokens": sum(r["mismatches"] for r in results),
            "mismatched_requests": [r for r in results if r["mismatches"]],
            "max_gap_per_request": {"median": gaps[len(gaps) // 2] if gaps else None,
                                    "max": gaps[-1] if gaps else None},
            "seconds": round(time.monotonic() - t0, 1), "ok": bool(results) and not any(
                r["mismatches"] for r in results)}
