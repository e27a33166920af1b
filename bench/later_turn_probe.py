"""Is the later-turn loss of ``per_layer`` in its keep-sets? Gemma 3 270M in the HF harness, no server.

    python -m bench.later_turn_probe --target 4096 --samples 24 --seed 20261209 --budget 0.2 \\
        --policies snapkv,laprox --json OUT.json

Through the server, ``per_layer`` answered first turns of ``doc_qa`` as ``uniform`` did and later turns 18-26 points
worse (docs/quality.md). This asks the same kind of conversations with the server's settings (window 32, 4 sinks,
the model's 512-token sliding window protected, one keep-set per layer or one for all) where nothing but the
keep-set differs: turn 1's prompt is prefilled and compressed once per policy and granularity; every later turn
(the full cache's previous answer, then the next question) is appended to that cache and kept whole, as the server
keeps it (a reused prefix is not re-cut per layer, and a turn's new tokens fall in the protected tail). Answers are
greedy, cut at a new line, scored as the quality suite scores them. Prints first and later turns per arm, with
Wilson intervals and the paired count between the two granularities.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

#: arms are policy/granularity; the reference is the full cache
REFERENCE = "full"
GRANULARITIES = ("uniform", "per_layer")


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


@functools.cache
def newline_tokens(tokens) -> frozenset[int]:
    """Ids whose text holds a new line: :meth:`Tokens.answer` cuts an answer at the first of them."""
    vocab = tokens.tok.convert_ids_to_tokens(list(range(len(tokens.tok))))
    return frozenset(i for i, piece in enumerate(vocab) if piece and "\n" in
                     tokens.tok.convert_tokens_to_string([piece]))


def ask_conversation(harness, tokens, conv, arms: dict, answer_tokens: int) -> list[dict]:
    """Every turn of ``conv`` under the full cache and each arm ``{name: (policy, budget, granularity)}``.

    Returns one row per (turn, arm): ``{"turn", "arm", "correct", "answer"}``. Turn ``k``'s prompt is turn
    ``k - 1``'s, the full cache's answer to it and the next question, for every arm (as the quality runner asks)."""
    import torch

    from sgl_evict.quality.metrics import exact_match
    from sgl_evict.quality.tasks import segments

    ids = list(tokens.bos) + tokens.encode(segments(conv.turns[0], True))
    state = harness.prefill(torch.tensor([ids], device=harness.device))
    caches = {REFERENCE: harness._shallow_copy(state.cache)}
    for name, (policy, budget, granularity) in arms.items():
        caches[name], _, _ = harness._run_cache(state, policy, budget, granularity)
    first = {name: int(state.last_logits.argmax()) for name in caches}
    length, rows = len(ids), []
    stop = tokens.eos | newline_tokens(tokens)  # the answer ends there: decoding further changes nothing scored
    for k, turn in enumerate(conv.turns):
        answers = {}
        for name, cache in caches.items():
            out = harness._greedy(harness._shallow_copy(cache), first[name], length, answer_tokens, stop)
            answers[name] = tokens.answer(out, answer_tokens)
            text = tokens.decode(answers[name])
            rows.append({"turn": k, "arm": name, "correct": exact_match(turn.answers, text), "answer": text})
        if k + 1 == len(conv.turns):
            break
        new = answers[REFERENCE] + tokens.encode(segments(conv.turns[k + 1], False))
        positions = torch.arange(length, length + len(new))
        for name, cache in caches.items():
            logits = harness._extend(cache, positions, input_ids=torch.tensor([new], device=harness.device))
            first[name] = int(logits[-1].argmax())
        length += len(new)
    return rows


def summarize(rows: list[dict], arms: list[str]) -> dict:
    """Per arm, first and later turns: ``k`` correct of ``n`` with the Wilson interval; retention on what the full
    cache solved; and per policy the later turns only one granularity answered (exact McNemar p)."""
    from sgl_evict.quality.metrics import mcnemar_p, wilson

    by = {(r["conv"], r["turn"], r["arm"]): r["correct"] for r in rows}
    keys = sorted({(r["conv"], r["turn"]) for r in rows})
    out: dict = {"arms": {}, "paired_later": {}}
    for arm in [REFERENCE, *arms]:
        for part, sel in (("first", [k for k in keys if k[1] == 0]), ("later", [k for k in keys if k[1] > 0])):
            hits = sum(by[(c, t, arm)] for c, t in sel)
            solved = [(c, t) for c, t in sel if by[(c, t, REFERENCE)]]
            kept = sum(by[(c, t, arm)] for c, t in solved)
            out["arms"][f"{arm}/{part}"] = {"accuracy": wilson(hits, len(sel)).as_dict(),
                                            "retention": wilson(kept, len(solved)).as_dict()}
    for policy in sorted({a.split("/")[0] for a in arms}):
        u, p = f"{policy}/uniform", f"{policy}/per_layer"
        if u in arms and p in arms:
            later = [k for k in keys if k[1] > 0]
            only_u = sum(by[(c, t, u)] and not by[(c, t, p)] for c, t in later)
            only_p = sum(by[(c, t, p)] and not by[(c, t, u)] for c, t in later)
            out["paired_later"][policy] = {"n": len(later), "only_uniform": only_u, "only_per_layer": only_p,
                                           "mcnemar_p": mcnemar_p(only_u, only_p)}
    return out


def table(summary: dict) -> str:
    lines = ["| arm | first turns | later turns | later-turn retention |", "| --- | --- | --- | --- |"]
    arms = sorted({k.rsplit("/", 1)[0] for k in summary["arms"]}, key=lambda a: (a != REFERENCE, a))
    for arm in arms:
        f, lt = summary["arms"][f"{arm}/first"], summary["arms"][f"{arm}/later"]
        cell = lambda i: f"{i['k']}/{i['n']} ({i['value']:.2f} [{i['low']:.2f}, {i['high']:.2f}])"  # noqa: E731
        lines.append(f"| {arm} | {cell(f['accuracy'])} | {cell(lt['accuracy'])} | "
                     f"{'-' if arm == REFERENCE else cell(lt['retention'])} |")
    for policy, p in summary["paired_later"].items():
        lines.append(f"\n{policy}, later turns only uniform / only per_layer: {p['only_uniform']} / "
                     f"{p['only_per_layer']} (p = {p['mcnemar_p']:.2g})")
    return "\n".join(lines)


def gemma_harness(probe: str, policy_names: str):
    """``(harness, tokens, policies)``: Gemma 3 270M in the harness with the server's settings (window 32, 4 sinks,
    the model's sliding window protected), its quality-runner ``Tokens`` and ``{name: policy}``; a bad policy name
    exits naming ``probe``'s ``--policies``."""
    from sgl_evict.eval.runner import variant_policy
    from sgl_evict.harness import EvictionHarness
    from sgl_evict.harness.models import load_gemma3_270m
    from sgl_evict.quality.runner import Tokens

    try:  # a name, or a variant such as laprox+continuation=3
        policies = {text: variant_policy(text) for text in policy_names.split(",") if text}
    except ValueError as err:
        raise SystemExit(f"{probe}: --policies: {err}") from None
    model, tokenizer = load_gemma3_270m()
    sliding = int(getattr(model.config.get_text_config(), "sliding_window", 0) or 0)
    return EvictionHarness(model, window=32, sinks=4, protected_recent=sliding), Tokens(tokenizer), policies


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--target", type=int, default=4096, help="tokens of a conversation's last turn")
    parser.add_argument("--samples", type=int, default=24, help="doc_qa conversations")
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--seed", type=int, default=20261209, help="task seed (evaluation seeds differ from tests')")
    parser.add_argument("--budget", type=float, default=0.2, help="fraction of turn 1's prompt kept")
    parser.add_argument("--policies", default="snapkv,laprox")
    parser.add_argument("--answer-tokens", type=int, default=24)
    parser.add_argument("--json", default="", help="write records and summary here")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.samples < 1 or args.turns < 2:
        raise SystemExit("later_turn_probe: --samples must be >= 1 and --turns >= 2")
    if not 0 < args.budget <= 1:
        raise SystemExit(f"later_turn_probe: --budget must be in (0, 1], got {args.budget}")

    from sgl_evict.quality.tasks import doc_qa
    from sgl_evict.selection import Budget

    harness, tokens, policies = gemma_harness("later_turn_probe", args.policies)
    budget = Budget(fraction=args.budget)
    arms = {f"{name}/{g}": (policy, budget, g) for name, policy in policies.items() for g in GRANULARITIES}
    rows, started = [], time.monotonic()
    from tqdm import tqdm

    for index in tqdm(range(args.samples), desc="conversations", disable=args.no_progress):
        conv = doc_qa(args.target, tokens.count, args.seed, index, turns=args.turns)
        rows += [{"conv": index, **r} for r in ask_conversation(harness, tokens, conv, arms, args.answer_tokens)]
    summary = summarize(rows, list(arms))
    print(table(summary))
    if args.json:
        import torch
        import transformers

        doc = {"what": "later turns of doc_qa on one compressed turn-1 cache, uniform vs per_layer keep-sets "
                       "(HF harness, CPU)", "command": " ".join(["python -m bench.later_turn_probe", *sys.argv[1:]]),
               "commit": _commit(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "device": f"{harness.device} ({torch.get_num_threads()} threads), "
                         f"{next(harness.model.parameters()).dtype}",
               "versions": {"python": platform.python_version(), "torch": torch.__version__,
                            "transformers": transformers.__version__},
               "settings": vars(args), "window": harness.window, "sinks": harness.sinks,
               "protected_recent": harness.protected_recent, "wall_s": round(time.monotonic() - started, 1),
               "summary": summary, "records": rows}
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
