"""What could reversible eviction win? Later turns on the HF harness, before the server has it.

    python -m bench.reversible_probe --families doc_qa --target 4096 --samples 20 --seed 20261207 \\
        --budgets 0.1,0.2 --policies snapkv,laq --json OUT.json

Multi-turn conversations of the quality suite (``doc_qa``, ``agent_trace``) with the server's
settings (window 32, 4 sinks, the model's sliding window protected, one keep-set for all layers).
Besides ``full`` (the uncompressed cache, whose answers are the reference and go into every arm's
next turn), each policy and budget runs three modes. In all of them a turn's new tokens (the
previous answer and the next question) are prefilled over a compressed prefix, then the turn is
scored with its own window queries and cut to the budget of its full logical length; the answer is
decoded on that keep-set (its first token comes from the prefill, before the cut, as in the server):

- ``irreversible``: the prefix is the previous turn's keep-set, and only its tokens and the new ones
  are candidates: every dropped token is gone, and a conversation holds at most its budget.
- ``server``: what ``--kv-evict-history rescore`` does with the radix cache: the prefix is what the
  tree holds, each turn's tokens as that turn kept them (the tree keeps the first insert), and those
  and the new tokens are candidates. A later turn drops a tree token only from its own view (a
  hide), so the next turn sees it again; the tree holds more than the budget.
- ``reversible``: the prefix is the previous keep-set, as ``irreversible``; then every logical
  token, dropped ones included (their KV as first computed, assumed held in host memory), is a
  candidate: restored tokens keep their original KV and logical positions.
- ``reversible-k4``, ``reversible-k2`` (with ``--modes``; issue 25's "keys of held-out tokens
  fetched from host, or scored from a compact key summary kept on the GPU"): as ``reversible``,
  but the held-out tokens are scored from their keys rounded to 4 or 2 bits (symmetric, one scale
  per token and KV head), what a GPU-resident summary would hold; the chosen ones come back with
  their exact KV. Their records say how much of the exact ``reversible`` keep-set they chose.
- ``reversible-tree`` (with ``--modes``): what a server restoring from host memory can do without
  changing the radix tree's shared nodes: the prefix is the tree's, as ``server`` (each turn's
  tokens as that turn kept them), and every logical token is a candidate, as ``reversible``.
- ``reversible-carry`` (with ``--modes``): as ``reversible-tree``, but the next turn's prefix also
  holds what this turn restored (a finishing request records it on the leaf it inserts, and the
  next turn brings it back before its prefill): the tree and the previous keep-set together.
- ``reversible-carry-rerun`` (with ``--modes``): as ``reversible-carry``, but on a later turn the
  prompt's last token is run again over the restored keep-set, and its logits give the answer's
  first token (a server would prefill that token as a chunk of its own after the restore). The
  other modes take the first token from the prefill over the prefix, before anything comes back.

Answers are greedy, cut at a new line, scored as the quality suite scores them. Arms whose views and
prefixes were equal at every turn hold equal caches, so they prefill and decode once.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.later_turn_probe import REFERENCE, newline_tokens
from sgl_evict.harness.engine import PrefillState
from sgl_evict.selection import Budget, KeepSet, protected_mask

MODES = ("irreversible", "server", "reversible")
#: reversible eviction scoring held-out tokens from keys rounded to this many bits
SUMMARY_BITS = {"reversible-k4": 4, "reversible-k2": 2}
#: every logical token a candidate, prefilled over the radix tree's prefix (as ``server``)
TREE = "reversible-tree"
#: as TREE, the next turn prefilled over the tree and what this turn restored
CARRY = "reversible-carry"
#: as CARRY, the answer's first token from the prompt's last token run again after the restore
RERUN = "reversible-carry-rerun"
#: modes whose next turn is prefilled over the tree and what this turn restored
CARRY_PREFIX = (CARRY, RERUN)
#: modes whose next turn is prefilled over what the tree holds, not over the keep-set
TREE_PREFIX = ("server", TREE)
#: (a, b) mode pairs compared on the same later turns
PAIRS = (("irreversible", "reversible"), ("server", "reversible"), ("irreversible", "server"),
         *(("reversible", mode) for mode in SUMMARY_BITS), ("reversible", TREE), ("reversible", CARRY),
         (CARRY, TREE), (CARRY, RERUN))
#: every mode ``--modes`` takes
ALL_MODES = (*MODES, *SUMMARY_BITS, TREE, CARRY, RERUN)


def rounded_keys(keys: torch.Tensor, bits: int) -> torch.Tensor:
    """``keys`` (``[..., head_dim]``) rounded to ``bits``-bit integers with one symmetric scale per
    vector (its largest magnitude maps to the largest positive level), returned dequantized."""
    top = 2 ** (bits - 1) - 1
    scale = keys.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(keys.dtype).tiny) / top
    return (keys / scale).round().clamp(-top - 1, top) * scale


def _positions() -> torch.Tensor:
    return torch.zeros(0, dtype=torch.long)


@dataclass
class Arm:
    """One policy, budget and mode (:data:`MODES`), and where its conversation stands.

    Attributes:
        cache: the transformers cache it answers with; its compressed layers hold ``resident``.
        resident: ``[R]`` int64 logical positions of this turn's keep-set (its view), ascending.
        prefix: ``[P]`` int64 logical positions the next turn is prefilled over, ascending: the
            keep-set, or (``server``, ``reversible-tree``) what the radix tree holds, or
            (``reversible-carry``) both.
        tree: ``[T]`` int64 logical positions the radix tree holds live: each turn's new tokens as
            that turn kept them (the tree keeps the first insert).
        store: every mode but ``irreversible``: per compressed layer ``(keys, values)``, each
            ``[1, num_kv_heads, seq_len, head_dim]``, of every logical token as it was computed
            when first prefilled (the tree's or host memory's copy).
        trail: ``(resident, prefix)`` of every turn so far: equal trails hold equal caches.
        first: the answer's first token, from the turn's prefill (before its eviction).
    """

    policy_name: str
    policy: object
    budget: Budget
    mode: str
    cache: object = None
    resident: torch.Tensor = field(default_factory=_positions)
    prefix: torch.Tensor = field(default_factory=_positions)
    tree: torch.Tensor = field(default_factory=_positions)
    store: list | None = None
    trail: tuple = ()
    first: int = 0

    @property
    def name(self) -> str:
        return f"{self.policy_name}/{self.budget}/{self.mode}"

    def prefix_cache(self, harness):
        """The cache the next turn is prefilled over: the answer's cache, or (:data:`TREE_PREFIX`
        and :data:`CARRY`, when the prefix holds more) one whose compressed layers hold the prefix's
        tokens from the store."""
        if torch.equal(self.prefix, self.resident):
            return self.cache
        cache = harness._shallow_copy(self.cache)
        for i, (k, v) in zip(harness.layers, self.store):
            layer = cache.layers[i]
            layer.keys, layer.values = k[:, :, self.prefix], v[:, :, self.prefix]
        return cache


def make_arms(policies: dict, budgets: list[Budget], modes=MODES) -> list[Arm]:
    """Every mode of every ``{name: policy}`` and budget, in that order."""
    return [Arm(name, policy, budget, mode) for name, policy in policies.items()
            for budget in budgets for mode in modes]


def prefill_turn(harness, cache, start: int, new: list[int]) -> tuple[torch.Tensor, dict]:
    """Extends ``cache`` (mutated) with ``new`` tokens at logical positions ``start ..``.

    Returns the last token's ``[vocab]`` logits and the window queries, layer ->
    ``[num_q_heads, min(window, len(new)), head_dim]``."""
    harness.ctx.queries = {}
    positions = torch.arange(start, start + len(new))
    ids = torch.tensor([new], device=harness.device)
    logits = harness._extend(cache, positions, input_ids=ids, record=True)
    recorded = harness.ctx.take()
    return logits[-1], {layer: q[:, -harness.window:] for layer, q in recorded.items()}


def protected(harness, held: int) -> torch.Tensor:
    """``[held]`` bool: the sinks and the protected tail (the larger of the window and
    ``protected_recent``) of ``held`` tokens, which every keep-set keeps."""
    return protected_mask(held, harness.sinks, max(harness.window, harness.protected_recent))


def choose(harness, state: PrefillState, policy, budget: Budget) -> KeepSet:
    """The policy's ``uniform`` keep-set over the tokens that ``state.cache``'s compressed layers
    hold (indices into them), to the budget of the full logical length ``state.seq_len``.

    A budget that the sinks and the protected tail fill alone keeps exactly them, as the selector
    would, without scoring (laq's lookahead steps are skipped)."""
    keys = state.cache.layers[harness.layers[0]].keys
    count, always = budget.num_tokens(state.seq_len), protected(harness, keys.shape[2])
    if count > int(always.sum()):
        return harness.select(state, policy, Budget(tokens=count), "uniform")
    local = always.nonzero().flatten()
    return KeepSet([local.expand(keys.shape[1], -1) for _ in harness.layers], keys.shape[2])


def _held(harness, cache) -> int:
    return cache.layers[harness.layers[0]].keys.shape[2]


def evict(harness, arm: Arm, cache, last_logits: torch.Tensor, window: dict, ids: list[int],
          start: int, memo: dict | None = None) -> dict:
    """One turn's eviction of ``arm``; its ``cache`` (not mutated) holds its prefix, then the turn's
    new tokens (logical ``start .. len(ids) - 1``). Updates the arm.

    Returns ``{"resident", "held", "restored", "evicted", "protected_only"}``: held counts the
    tokens the next turn is prefilled over (its ``prefix``: the keep-set, the tree's tokens, or with
    ``reversible-carry`` those and what this turn restored); restored,
    tokens not in the previous keep-set, nor new, that are in this one; evicted, tokens of the
    previous keep-set or new that are not; protected_only, a budget that the sinks and the protected
    tail fill alone. ``memo``: keep-sets chosen this turn (equal trails and candidates share one).
    """
    new = torch.arange(start, len(ids))
    if arm.mode != "irreversible":
        added = [(cache.layers[i].keys[:, :, -len(new):], cache.layers[i].values[:, :, -len(new):])
                 for i in harness.layers]
        arm.store = added if arm.store is None else [
            (torch.cat([k, nk], 2), torch.cat([v, nv], 2))
            for (k, v), (nk, nv) in zip(arm.store, added)]
    everything = arm.mode.startswith("reversible") and start > 0
    candidates, scored = torch.cat([arm.prefix, new]), cache
    exact = scored
    if everything:  # every logical token, from the store
        candidates, exact = torch.arange(len(ids)), harness._shallow_copy(cache)
        for i, (k, v) in zip(harness.layers, arm.store):
            exact.layers[i].keys, exact.layers[i].values = k, v
        scored = exact
        if arm.mode in SUMMARY_BITS:  # held-out tokens scored from their rounded keys
            held_out = torch.ones(len(ids), dtype=torch.bool)
            held_out[torch.cat([arm.prefix, new])] = False
            scored = harness._shallow_copy(exact)
            for i, (k, v) in zip(harness.layers, arm.store):
                rounded = k.clone()
                rounded[:, :, held_out] = rounded_keys(k[:, :, held_out], SUMMARY_BITS[arm.mode])
                scored.layers[i].keys, scored.layers[i].values = rounded, v
    if _held(harness, scored) != len(candidates):
        raise ValueError(f"{arm.name}: the cache holds {_held(harness, scored)} tokens, its "
                         f"candidates are {len(candidates)}")
    state = PrefillState(torch.tensor([ids]), scored, last_logits, window)
    key = (arm.trail, arm.policy_name, str(arm.budget), everything, SUMMARY_BITS.get(arm.mode))
    memo = {} if memo is None else memo
    if key not in memo:
        memo[key] = choose(harness, state, arm.policy, arm.budget)
    keep = memo[key]
    resident = candidates[keep.indices[0][0].cpu()]
    was, now = torch.zeros(len(ids), dtype=torch.bool), torch.zeros(len(ids), dtype=torch.bool)
    was[torch.cat([arm.resident, new])], now[resident] = True, True
    exact_state = state if exact is scored else PrefillState(state.input_ids, exact, last_logits, window)
    arm.cache, arm.resident = harness._compressed_cache(exact_state, keep), resident
    # the tree keeps what it holds and takes the new tokens this turn kept (every mode tracks it)
    arm.tree = torch.cat([arm.tree, resident[resident >= start]])
    if arm.mode in TREE_PREFIX:
        arm.prefix = arm.tree
    elif arm.mode in CARRY_PREFIX:  # torch.unique sorts
        arm.prefix = torch.unique(torch.cat([arm.tree, resident]))
    else:
        arm.prefix = resident
    arm.trail += ((tuple(resident.tolist()), tuple(arm.prefix.tolist())),)
    arm.first = int(last_logits.argmax())
    if arm.mode == RERUN and everything:
        arm.cache, logits = rerun_last(harness, arm.cache, ids)
        arm.first = int(logits.argmax())
        arm.trail += (RERUN,)  # its cache differs from its twin's: no shared prefill or answer
    always = int(protected(harness, len(candidates)).sum())
    return {"resident": int(resident.numel()), "held": int(arm.prefix.numel()),
            "restored": int((now & ~was).sum()), "evicted": int((was & ~now).sum()),
            "protected_only": arm.budget.num_tokens(len(ids)) <= always < len(candidates)}


def rerun_last(harness, cache, ids: list[int]) -> tuple[object, torch.Tensor]:
    """``cache`` (not mutated) without the last of ``ids``, which is then run again over it.

    Returns the new cache and the token's ``[vocab]`` logits. Sliding-window layers must record
    their past (:func:`record_past`), so that they can give the token back."""
    cache = harness._shallow_copy(cache)
    compressed = set(harness.layers)
    for i, layer in enumerate(cache.layers):
        if i in compressed:  # the keep-set ends with the last token (the protected tail)
            layer.keys, layer.values = layer.keys[:, :, :-1], layer.values[:, :, :-1]
        else:
            layer.crop(-1)
    logits = harness._extend(cache, torch.tensor([len(ids) - 1]),
                             input_ids=torch.tensor([[ids[-1]]], device=harness.device))
    return cache, logits[-1]


def record_past(cache) -> None:
    """Lets ``cache``'s sliding-window layers (and their shallow copies) give tokens back:
    they keep every token (attention still sees the window) until cropped."""
    for layer in cache.layers:
        if getattr(layer, "is_sliding", False) and hasattr(layer, "activate_past_recording"):
            layer.activate_past_recording()


class Session:
    """One conversation under the full cache and every arm: turns are added, arms evicted, answers
    decoded."""

    def __init__(self, harness, arms: list[Arm]):
        self.harness, self.arms, self.ids = harness, arms, []
        self.full, self.full_first = None, 0

    @torch.inference_mode()
    def add(self, new: list[int]) -> dict[str, dict]:
        """Appends ``new`` tokens (the first call: the whole first prompt) and evicts every arm;
        returns each arm's :func:`evict` record by name."""
        h, start = self.harness, len(self.ids)
        self.ids = self.ids + list(new)
        if start == 0:
            state = h.prefill(torch.tensor([self.ids], device=h.device))
            if any(arm.mode == RERUN for arm in self.arms):
                record_past(state.cache)
            self.full = h._shallow_copy(state.cache)
            self.full_first = int(state.last_logits.argmax())
            extended = {(): (state.cache, state.last_logits, state.window_queries)}
        else:
            self.full_first = int(prefill_turn(h, self.full, start, new)[0].argmax())
            extended = {}
            for arm in self.arms:  # equal trails hold equal caches: one prefill for them
                if arm.trail not in extended:
                    cache = h._shallow_copy(arm.prefix_cache(h))
                    extended[arm.trail] = (cache, *prefill_turn(h, cache, start, new))
        memo: dict = {}
        records = {arm.name: evict(h, arm, *extended[arm.trail], self.ids, start, memo)
                   for arm in self.arms}
        exact = {(arm.policy_name, str(arm.budget)): arm.resident for arm in self.arms
                 if arm.mode == "reversible"}
        for arm in self.arms:  # how much of the exact reversible keep-set a summary chose
            ref = exact.get((arm.policy_name, str(arm.budget)))
            if arm.mode in SUMMARY_BITS and ref is not None and start > 0:
                ours, theirs = set(arm.resident.tolist()), set(ref.tolist())
                records[arm.name]["jaccard_vs_exact"] = len(ours & theirs) / max(1, len(ours | theirs))
        return records

    @torch.inference_mode()
    def answers(self, steps: int, stop=frozenset()) -> dict[str, list[int]]:
        """Greedy continuations of at most ``steps`` tokens (ending at a ``stop`` token) of the full
        cache (:data:`REFERENCE`) and every arm, on throw-away copies of their caches."""
        h, start, stop = self.harness, len(self.ids), tuple(stop)
        full = h._shallow_copy(self.full)
        out = {REFERENCE: h._greedy(full, self.full_first, start, steps, stop)}
        by_trail: dict = {}
        for arm in self.arms:
            if arm.trail not in by_trail:
                cache = h._shallow_copy(arm.cache)
                by_trail[arm.trail] = h._greedy(cache, arm.first, start, steps, stop)
            out[arm.name] = by_trail[arm.trail]
        return out


def ask_conversation(harness, tokens, conv, arms: list[Arm], answer_tokens: int) -> list[dict]:
    """Every turn of ``conv`` under the full cache and ``arms``: one row per (turn, arm).

    A row holds ``correct``, the answer, the prompt's logical length, whether the answer's first
    token is the full cache's and (arms) the turn's :func:`evict` record. Turn ``k``'s new tokens
    are the full cache's answer to turn ``k - 1`` and turn ``k``'s text, for every arm (as the
    quality runner asks)."""
    from sgl_evict.quality.metrics import exact_match
    from sgl_evict.quality.tasks import segments

    session, rows = Session(harness, arms), []
    stop = tokens.eos | newline_tokens(tokens)
    new = list(tokens.bos) + tokens.encode(segments(conv.turns[0], True))
    for k, turn in enumerate(conv.turns):
        evictions = session.add(new)
        outputs = session.answers(answer_tokens, stop)
        answers = {name: tokens.answer(out, answer_tokens) for name, out in outputs.items()}
        for name, answer in answers.items():
            text = tokens.decode(answer)
            rows.append({"turn": k, "arm": name, "correct": exact_match(turn.answers, text),
                         "answer": text, "prompt_len": len(session.ids),
                         "first_as_full": outputs[name][0] == outputs[REFERENCE][0],
                         **evictions.get(name, {})})
        if k + 1 < len(conv.turns):
            new = answers[REFERENCE] + tokens.encode(segments(conv.turns[k + 1], False))
    return rows


def _task(row: dict) -> str:
    """``family/target``: what the summary groups conversations by."""
    return f"{row['family']}/{row['target']}"


def _share(group: list[dict], key: str) -> float:
    return sum(bool(r[key]) for r in group) / len(group)


def summarize(rows: list[dict]) -> dict:
    """Per family and target, arm and turn: accuracy and retention (the share of the full cache's
    correct answers the arm also gives) with Wilson intervals, the share of answers whose first
    token is the full cache's, and resident, restored and evicted tokens (mean, max, total); the
    same pooled over later turns; per family, target, policy and budget over later turns, the
    answers only one mode got right (exact McNemar p)."""
    from sgl_evict.quality.metrics import mcnemar_p, wilson

    by = {(_task(r), r["conv"], r["turn"], r["arm"]): r for r in rows}
    cells: dict = defaultdict(list)
    for r in rows:
        cells[(_task(r), r["arm"], r["turn"])].append(r)
        if r["turn"] > 0:
            cells[(_task(r), r["arm"], "later")].append(r)

    def cell(group: list[dict]) -> dict:
        solved = [r for r in group if by[(_task(r), r["conv"], r["turn"], REFERENCE)]["correct"]]
        out = {"accuracy": wilson(sum(r["correct"] for r in group), len(group)).as_dict(),
               "retention": wilson(sum(r["correct"] for r in solved), len(solved)).as_dict(),
               "first_as_full": _share(group, "first_as_full")}
        for what in ("resident", "held", "restored", "evicted", "jaccard_vs_exact"):
            values = [r[what] for r in group if what in r]
            if values:
                out[what] = {"mean": sum(values) / len(values), "max": max(values),
                             "total": sum(values)}
        if "protected_only" in group[0]:
            out["protected_only"] = _share(group, "protected_only")
        return out

    def order(item):  # turns in order, then the later turns pooled
        (task, arm, turn), _ = item
        return task, arm, turn == "later", 0 if turn == "later" else turn

    ordered = sorted(cells.items(), key=order)
    out: dict = {"turns": {f"{f}/{a}/{t}": cell(g) for (f, a, t), g in ordered}, "paired_later": {}}
    for (task, arm, turn), later in ordered:
        for a, b in PAIRS:
            if turn != "later" or not arm.endswith("/" + a):
                continue
            twin = arm[: -len(a)] + b
            pairs = [(r["correct"], by[(task, r["conv"], r["turn"], twin)]["correct"])
                     for r in later if (task, r["conv"], r["turn"], twin) in by]
            if not pairs:  # the twin mode did not run
                continue
            only_a, only_b = sum(x and not y for x, y in pairs), sum(y and not x for x, y in pairs)
            out["paired_later"][f"{task}/{arm[: -len(a) - 1]}/{a}_vs_{b}"] = {
                "n": len(pairs), f"only_{a}": only_a, f"only_{b}": only_b,
                "mcnemar_p": mcnemar_p(only_a, only_b)}
    return out


def table(summary: dict) -> str:
    """The summary as markdown: one row per family and target, arm and turn (and later turns
    pooled), then the paired later turns."""
    def cell(i: dict) -> str:
        return f"{i['k']}/{i['n']} {i['value']:.2f} [{i['low']:.2f}, {i['high']:.2f}]"

    lines = ["| family / target / arm | turn | accuracy | retention vs full | 1st token as full | "
             "resident | restored (mean, max) | evicted |", "|" + " --- |" * 8]
    for key, c in summary["turns"].items():
        name, turn = key.rsplit("/", 1)
        tokens = [f"{c[w]['mean']:.0f}" if w in c else "-" for w in ("resident", "evicted")]
        restored = "-"
        if "restored" in c:
            restored = f"{c['restored']['mean']:.1f}, {c['restored']['max']}"
        reference = name.endswith("/" + REFERENCE) or c["retention"]["n"] == 0
        turn = turn if turn == "later" else int(turn) + 1
        lines.append(f"| {name} | {turn} | {cell(c['accuracy'])} | "
                     f"{'-' if reference else cell(c['retention'])} | {c['first_as_full']:.2f} | "
                     f"{tokens[0]} | {restored} | {tokens[1]} |")
    lines += ["", "| family / target / policy / budget / a_vs_b | later turns | only a | only b "
              "| p |", "|" + " --- |" * 5]
    for key, p in summary["paired_later"].items():
        a, b = key.rsplit("/", 1)[1].split("_vs_")
        lines.append(f"| {key} | {p['n']} | {p[f'only_{a}']} | {p[f'only_{b}']} | "
                     f"{p['mcnemar_p']:.2g} |")
    return "\n".join(lines)


def _git(*args: str) -> str:
    try:
        run = subprocess.run(["git", *args], capture_output=True, text=True, check=True)
        return run.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def _numbers(text: str, name: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise SystemExit(f"reversible_probe: --{name}: positive integers, comma-separated")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--families", default="doc_qa", help="quality-suite multi-turn families")
    parser.add_argument("--target", default="4096",
                        help="tokens of a conversation's last turn (comma-separated: each of them)")
    parser.add_argument("--samples", default="20",
                        help="conversations per family and target (or one count per target)")
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--seed", type=int, default=20261207, help="task seed (tests use 0-11)")
    parser.add_argument("--budgets", default="0.1,0.2",
                        help="fractions of each turn's logical length kept")
    parser.add_argument("--policies", default="snapkv,laq")
    parser.add_argument("--modes", default=",".join(MODES), help=f"of {', '.join(ALL_MODES)}")
    parser.add_argument("--answer-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--max-minutes", type=float, default=0,
                        help="start no conversation that would end later (at the mean time of "
                             "those done); 0: no limit")
    parser.add_argument("--json", default="", help="write records and summary here (after each "
                                                   "conversation)")
    args = parser.parse_args(argv)
    from sgl_evict.quality.tasks import MULTI_TURN

    families = [f for f in args.families.split(",") if f]
    if args.turns < 2 or not families or set(families) - set(MULTI_TURN):
        raise SystemExit(f"reversible_probe: --turns >= 2, --families of {', '.join(MULTI_TURN)}")
    targets, counts = _numbers(args.target, "target"), _numbers(args.samples, "samples")
    if len(counts) not in (1, len(targets)):
        raise SystemExit("reversible_probe: --samples: one count, or one per target")
    samples = dict(zip(targets, counts * len(targets) if len(counts) == 1 else counts))
    modes = tuple(m for m in args.modes.split(",") if m)
    if not modes or set(modes) - set(ALL_MODES):
        raise SystemExit(f"reversible_probe: --modes of {', '.join(ALL_MODES)}")
    try:
        budgets = [Budget(fraction=float(b)) for b in args.budgets.split(",") if b]
    except ValueError as err:
        raise SystemExit(f"reversible_probe: --budgets: {err}") from None

    from bench.later_turn_probe import gemma_harness
    from sgl_evict.quality.tasks import conversations

    torch.set_num_threads(args.threads)
    harness, tokens, policies = gemma_harness("reversible_probe", args.policies)
    doc = {"what": "later-turn answers under irreversible, server (rescore with the radix tree) "
                   "and reversible eviction vs the full cache (HF harness, CPU, uniform keep-sets)",
           "command": " ".join(["python -m bench.reversible_probe", *sys.argv[1:]]),
           "commit": _git("rev-parse", "HEAD"),
           "tracked_files_modified": bool(_git("status", "--porcelain", "--untracked-files=no")),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": f"{harness.device} ({torch.get_num_threads()} threads), "
                     f"{next(harness.model.parameters()).dtype}",
           "versions": {"python": platform.python_version(), "torch": torch.__version__,
                        "transformers": __import__("transformers").__version__},
           "settings": {**vars(args), "window": harness.window, "sinks": harness.sinks,
                        "protected_recent": harness.protected_recent, "granularity": "uniform"}}
    # families and targets interleaved, so that --max-minutes cuts them alike
    jobs = [(f, t, i) for i in range(max(samples.values())) for t in targets for f in families
            if i < samples[t]]
    rows, started, done = [], time.monotonic(), 0
    for family, target, index in jobs:
        elapsed = time.monotonic() - started
        if args.max_minutes and done and elapsed * (done + 1) / done > 60 * args.max_minutes:
            print(f"reversible_probe: stopping after {done} conversations ({elapsed / 60:.1f} min)",
                  file=sys.stderr)
            break
        conv = conversations(family, target, tokens.count, args.seed, index, args.turns)[0]
        t0 = time.monotonic()
        arms = make_arms(policies, budgets, modes)
        got = ask_conversation(harness, tokens, conv, arms, args.answer_tokens)
        rows += [{"family": family, "target": target, "conv": index, **r} for r in got]
        done += 1
        right = defaultdict(int)
        for r in got:
            right[r["arm"]] += r["correct"]
        print(f"[{done}/{len(jobs)}] {family}/{target} #{index}: first turn "
              f"{got[0]['prompt_len']} tokens, last {got[-1]['prompt_len']}, "
              f"{time.monotonic() - t0:.0f} s; correct of {args.turns}: "
              + ", ".join(f"{a} {k}" for a, k in right.items()), file=sys.stderr, flush=True)
        if args.json:
            doc.update(wall_s=round(time.monotonic() - started, 1), conversations=done,
                       complete=done == len(jobs), summary=summarize(rows), records=rows)
            Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    print(table(summarize(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
