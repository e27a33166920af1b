"""Writes the open-loop agent mix as a multi-turn trace for SGLang's own benchmark client (issue 21 item 4).

    python -m bench.agentic_trace --conversations 60 --seed 0 --max-context 30000 --reply-tokens 128 \\
        --out /tmp/agentic_trace.json

then ``python3 -m sglang.benchmark.serving --backend sglang-oai-chat --dataset-name agentic-trace --dataset-path
/tmp/agentic_trace.json --sharegpt-output-len 128 ...`` (bench/gpu/bench_serving.py runs it). Standard library
only, seeded, no download: the text is made-up words.

**The shape SGLang 0.5.17 reads** (``sglang/benchmark/datasets/agentic_trace.py``, ``AgenticTraceDataset.load``)::

    {"metadata": {...},
     "conversations": [[{"messages": [{"role": "system", "content": ...}, {"role": "user", "content": ...}],
                         "prompt_tokens": N0},
                        {"messages": [{"role": "user", "content": ...}], "prompt_tokens": N1}, ...], ...]}

One conversation is a list of turns; a turn's ``messages`` holds only that turn's new messages. The loader makes
one ``DatasetRow`` per conversation (``prompt`` = the list of turns' messages; ``prompt_len`` = the first turn's
``prompt_tokens``, "informational only"; ``output_len`` = ``--sharegpt-output-len``, default 220, the same for
every turn). ``sglang.benchmark.serving`` sees a list of rounds and replays the conversation round by round
(``wrap_multi_turn_request_func``): it appends the round's messages to the history, sends the whole history to
``/v1/chat/completions``, appends the server's real reply as an ``assistant`` message, and goes on to the next
round at once (no think time). ``--request-rate`` is the rate at which conversations start (Poisson). Multi-turn
replay asserts a chat backend (``sglang-oai-chat``), so the server needs a chat template.

**The mix** (bench/workloads.py ``AgentMix``, the distributions of bench/open_loop.py's sessions): groups of
``group_size`` conversations share a system prompt (its length drawn per group from ``system_tokens``); a
conversation has ``turns`` turns, each one user message holding a tool output (``tool_tokens``, JSON lines) and an
instruction (``instruction_tokens``, a plain line). What the trace cannot carry: think time (SGLang's replay sends
the next round at once) and per-turn answer lengths (one output length for every turn): both are kept in each
turn's extra fields ``think_s`` and ``reply_tokens_drawn`` (ignored by the loader) for reference only. Each turn is
ONE user message, so roles alternate user/assistant as Gemma 3's template requires (a ``tool`` role would be
refused by SGLang's ``gemma-it`` template: ``Unknown role``).

**Token counts.** Every word comes from :data:`WORDS`, each one token of the Gemma 3 tokenizer with and without a
leading space; a plain line of k words then costs k + 1 tokens (the newline) and a JSON line
``{"out": "<k words>"}`` k + 6, which is how texts are cut to their drawn lengths (checked against the real
tokenizer in tests/bench/test_agentic_trace.py). ``prompt_tokens`` is each turn's whole prompt as the server will
see it, estimated: the history's messages, ``reply_tokens`` per earlier answer and the template's tokens around
each message (:data:`OPEN_TOKENS`, :data:`CLOSE_TOKENS`), so the replay's real counts differ by how the answers
retokenize (checked against SGLang's template in tests/sglang/test_bench_serving_client.py). With
``--max-context`` a conversation stops before the first turn whose prompt plus answer would not fit (Gemma 3 270M
serves 32768 positions); conversations whose first turn does not fit are left out. The metadata says how many
turns were drawn, kept and cut.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from dataclasses import asdict
from pathlib import Path

from bench.workloads import AgentMix, int_range

# 249 common English words, each a single Gemma 3 token with and without a leading space (tests check this against
# the real tokenizer when it is available offline)
WORDS = tuple("""
the of and to in is that for it as with was on be by this are from at or have an they which one you had not
but what all were when we there can been has more if will their so no would other its into some could them
these two may then do first any my now such like our over only new also used time very after most made where
many well way even back much good long right still own same just file line error value return function
request server cache token list table query result field index build test check path user data model input
output state node tree page block memory size count limit start end open close read write load save send call
run step task plan code type name key item order group batch queue stream event source target config option
default update delete create insert select match found missing failed passed ready empty full small large
fast slow high low next last before under above between while because since until again never always often
each every both few less least several enough about against along among around behind below beyond during
except inside near outside through upon within without add fix move copy sort split merge parse format print
report log trace score keep drop free hold use make take give find show tell ask need want try seem turn help
play live feel leave put mean let begin""".split())
WORDS_PER_LINE = 12
JSON_LINE_TOKENS = 6  # {"out": "  ...  "}\n around the words
# Gemma 3's chat turns (SGLang's gemma-it template): a turn opens with <start_of_turn>, role, \n (3 tokens) and
# closes with <end_of_turn>, \n (2); the system text opens the first user turn and the blank line after it merges
# with its last newline; the encoded prompt starts with <bos>
OPEN_TOKENS, CLOSE_TOKENS, BOS_TOKENS = 3, 2, 1
SYSTEM_HEADER = "you are the model for this group so read these first\n"  # 11 words of WORDS + newline: 12 tokens


def _words(rng: random.Random, k: int) -> str:
    return " ".join(rng.choices(WORDS, k=k))


def plain_text(rng: random.Random, tokens: int) -> str:
    """Lines of words, ``tokens`` tokens in all (a line of k words + its newline is k + 1); one token: a word."""
    if tokens <= 0:
        return ""
    if tokens == 1:
        return _words(rng, 1)
    lines = []
    while tokens > 0:
        k = min(WORDS_PER_LINE, tokens - 1)
        if tokens - (k + 1) == 1:  # never leave a single token: it could not be a line
            k -= 1
        lines.append(_words(rng, k) + "\n")
        tokens -= k + 1
    return "".join(lines)


def json_text(rng: random.Random, tokens: int) -> str:
    """JSON lines ``{"out": "<words>"}``, ``tokens`` tokens in all (k words cost k + 6); plain text below 7."""
    if tokens < JSON_LINE_TOKENS + 1:
        return plain_text(rng, tokens)
    lines = max(1, round(tokens / (WORDS_PER_LINE + JSON_LINE_TOKENS)))
    words = tokens - JSON_LINE_TOKENS * lines
    if words < lines:
        lines = tokens // (JSON_LINE_TOKENS + 1)
        words = tokens - JSON_LINE_TOKENS * lines
    out = []
    for i in range(lines):
        k = words // lines + (1 if i < words % lines else 0)
        out.append('{"out": "' + _words(rng, k) + '"}\n')
    return "".join(out)


def conversation(index: int, seed: int, mix: AgentMix, reply_tokens: int, max_context: int | None) -> dict:
    """Conversation ``index``: ``{"turns": [...], "drawn": n}`` (turns in the trace's shape; ``drawn``: turns before
    the context cap). Seeded per conversation and per group, so it does not depend on how many are written."""
    group = index // mix.group_size
    group_rng = random.Random(f"trace-system:{seed}:{group}")
    system_tokens = group_rng.randint(*mix.system_tokens)
    system = SYSTEM_HEADER + plain_text(group_rng, system_tokens)
    system_cost = len(SYSTEM_HEADER.split()) + 1 + system_tokens
    rng = random.Random(f"trace-agent:{seed}:{index}")
    n_turns = rng.randint(*mix.turns)
    turns: list[dict] = []
    history = BOS_TOKENS + OPEN_TOKENS + system_cost  # <bos>, the first user turn's opening, the system text
    for t in range(n_turns):
        tool, instruction = rng.randint(*mix.tool_tokens), rng.randint(*mix.instruction_tokens)
        content = json_text(rng, tool) + plain_text(rng, instruction)
        reply = round(rng.lognormvariate(math.log(mix.reply_median), mix.reply_sigma))
        think = rng.expovariate(1.0 / mix.think_mean_s) if t > 0 and mix.think_mean_s > 0 else 0.0
        # this turn's prompt: the history, its own message (the first one opened with the system text), and the
        # opening of the answer's turn
        prompt = history + (OPEN_TOKENS if t else 0) + tool + instruction + CLOSE_TOKENS + OPEN_TOKENS
        if max_context is not None and prompt + reply_tokens > max_context:
            break
        messages = [{"role": "user", "content": content}]
        if t == 0:
            messages.insert(0, {"role": "system", "content": system})
        turns.append({"messages": messages, "prompt_tokens": prompt, "new_tokens": tool + instruction,
                      "reply_tokens_drawn": min(max(reply, mix.reply_tokens[0]), mix.reply_tokens[1]),
                      "think_s": round(think, 3)})
        history = prompt + reply_tokens + CLOSE_TOKENS  # the answer and its turn's end
    return {"turns": turns, "drawn": n_turns}


def build_trace(conversations: int, seed: int = 0, mix: AgentMix = AgentMix(), reply_tokens: int = 128,
                max_context: int | None = None, command: str = "") -> dict:
    """The trace document: ``{"metadata", "conversations"}`` (module docstring)."""
    mix.validate()
    if conversations < 1 or reply_tokens < 1:
        raise ValueError("conversations and reply_tokens must be at least 1")
    convs, drawn, dropped = [], 0, 0
    index = 0
    while len(convs) < conversations:
        c = conversation(index, seed, mix, reply_tokens, max_context)
        index += 1
        drawn += c["drawn"]
        if not c["turns"]:
            dropped += 1
            if dropped > 10 * conversations:
                raise ValueError(f"max_context {max_context}: no conversation's first turn fits")
            continue
        convs.append(c["turns"])
    kept = [len(c) for c in convs]
    meta = {"generator": "bench/agentic_trace.py", "command": command, "seed": seed, "mix": asdict(mix),
            "reply_tokens": reply_tokens, "max_context": max_context, "conversations": len(convs),
            "conversations_left_out": dropped, "turns_drawn": drawn, "turns_kept": sum(kept),
            "turns_per_conversation": {"min": min(kept), "max": max(kept), "mean": sum(kept) / len(kept)},
            "last_prompt_tokens_max": max(c[-1]["prompt_tokens"] for c in convs),
            "token_counts": "estimated for the Gemma 3 tokenizer (bench/agentic_trace.py docstring)",
            "not_replayed": "think_s and reply_tokens_drawn: SGLang's replay sends rounds back to back and asks "
                            "every turn for the same --sharegpt-output-len"}
    return {"metadata": meta, "conversations": convs}


def write_trace(path: Path, conversations: int, seed: int = 0, mix: AgentMix = AgentMix(), reply_tokens: int = 128,
                max_context: int | None = None, command: str = "") -> dict:
    """Writes :func:`build_trace`'s document to ``path``; returns its metadata."""
    doc = build_trace(conversations, seed, mix, reply_tokens, max_context, command)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return doc["metadata"]


def add_mix_args(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """The mix's flags (``prefix`` e.g. ``trace-`` for a driver that has flags of its own)."""
    d = AgentMix()
    p = f"--{prefix}"
    parser.add_argument(f"{p}system-tokens", default=f"{d.system_tokens[0]},{d.system_tokens[1]}")
    parser.add_argument(f"{p}group-size", type=int, default=d.group_size, help="conversations sharing a system prompt")
    parser.add_argument(f"{p}turns", default=f"{d.turns[0]},{d.turns[1]}", help="turns drawn, LOW,HIGH")
    parser.add_argument(f"{p}tool-tokens", default=f"{d.tool_tokens[0]},{d.tool_tokens[1]}")
    parser.add_argument(f"{p}instruction-tokens", default=f"{d.instruction_tokens[0]},{d.instruction_tokens[1]}")


def mix_from_args(args, prefix: str = "") -> AgentMix:
    """The :class:`AgentMix` of :func:`add_mix_args`'s flags; SystemExit naming a bad one."""
    a = prefix.replace("-", "_")
    try:
        mix = AgentMix(
            system_tokens=int_range(getattr(args, f"{a}system_tokens"), f"--{prefix}system-tokens"),
            group_size=getattr(args, f"{a}group_size"),
            turns=int_range(getattr(args, f"{a}turns"), f"--{prefix}turns"),
            tool_tokens=int_range(getattr(args, f"{a}tool_tokens"), f"--{prefix}tool-tokens"),
            instruction_tokens=int_range(getattr(args, f"{a}instruction_tokens"), f"--{prefix}instruction-tokens"))
        mix.validate()
    except ValueError as err:
        raise SystemExit(f"agentic_trace: {err}") from None
    return mix


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reply-tokens", type=int, default=AgentMix().reply_median,
                        help="answer tokens per turn assumed by prompt_tokens (the client's --sharegpt-output-len)")
    parser.add_argument("--max-context", type=int, default=None, help="cut conversations to fit this many tokens")
    add_mix_args(parser)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    command = "python -m bench.agentic_trace " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        meta = write_trace(Path(args.out), args.conversations, args.seed, mix_from_args(args), args.reply_tokens,
                           args.max_context, command)
    except ValueError as err:
        raise SystemExit(f"agentic_trace: {err}") from None
    print(json.dumps({k: meta[k] for k in ("conversations", "conversations_left_out", "turns_drawn", "turns_kept",
                                           "turns_per_conversation", "last_prompt_tokens_max")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
