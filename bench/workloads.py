"""Seeded request workloads for benchmarking a server, as token ids (no tokenizer: random-weight models).

A workload is an iterable of sessions; a session is a list of turns that must run one after the other. The client
(bench/serve_bench.py) builds each turn's prompt with ``next_prompt``: the previous turn's prompt, the server's reply
to it, then this turn's new tokens, so a server with a prefix cache can reuse everything before the new tokens.

- ``agent_sessions``: multi-turn tool-using agents. A shared system prompt, then per turn a tool output of 1-8K
  tokens and a short instruction (20-60 tokens) appended to the growing history; replies of 50-300 tokens
  (generated to exactly that length: ``ignore_eos``). Models coding/browsing agents whose context grows by
  thousands of tokens a turn while each answer is short.
- ``long_context_requests``: single-turn prompts of 8K-64K tokens with short answers (16-32 tokens). Models
  document QA / retrieval over a long context, where the prompt's KV dominates memory.
- ``open_agent_sessions``: the open-loop mix (bench/open_loop.py, issue 21): groups of sessions share a 2-8K
  system prompt, a session has 6-30 turns, each adding a 0.5-8K tool output and an instruction; a user or tool
  thinks between turns (exponential, ``think_mean_s``); answer lengths are log-normal (median ``reply_median``).

Every draw comes from ``random.Random`` seeded per session, so a session's content does not depend on how many
sessions are generated or in which order the client consumes them.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass

# Llama-3 vocabulary (128256 ids) minus the low ids and the special tokens at the top.
DEFAULT_VOCAB = (100, 128000)


@dataclass(frozen=True)
class Turn:
    """One request of a session: ``new_tokens`` are appended to the history, ``max_new_tokens`` are generated;
    ``think_s``: seconds the client waits after the previous reply before sending it (open loop only)."""

    new_tokens: list[int]
    max_new_tokens: int
    think_s: float = 0.0


@dataclass(frozen=True)
class Session:
    """Turns sent in order; turn i+1's prompt contains turn i's prompt and reply (see ``next_prompt``)."""

    session_id: int
    turns: list[Turn]


def next_prompt(previous_prompt: list[int], previous_reply: list[int], turn: Turn) -> list[int]:
    """The prompt of ``turn``: the history so far (previous prompt + the server's reply) followed by its new tokens."""
    return [*previous_prompt, *previous_reply, *turn.new_tokens]


def _ids(rng: random.Random, n: int, vocab: tuple[int, int]) -> list[int]:
    # choices() is ~4x faster than a randrange() loop; a session holds tens of thousands of ids
    return rng.choices(range(*vocab), k=n)


def agent_session(index: int, turns: int, seed: int = 0, tool_tokens: tuple[int, int] = (1024, 8192),
                  instruction_tokens: tuple[int, int] = (20, 60), reply_tokens: tuple[int, int] = (50, 300),
                  system_tokens: int = 512, vocab: tuple[int, int] = DEFAULT_VOCAB) -> Session:
    """Agent session number ``index`` of ``turns`` turns; ranges are inclusive token counts.

    Turn 0's new tokens are the system prompt (``system_tokens``, identical in every session: agents of one product
    share it), then a tool output and an instruction; later turns add a tool output and an instruction.
    """
    system = _ids(random.Random(f"system:{seed}"), system_tokens, vocab)
    rng = random.Random(f"agent:{seed}:{index}")
    ts = []
    for t in range(turns):
        tool = _ids(rng, rng.randint(*tool_tokens), vocab)
        instruction = _ids(rng, rng.randint(*instruction_tokens), vocab)
        ts.append(Turn(new_tokens=(system if t == 0 else []) + tool + instruction,
                       max_new_tokens=rng.randint(*reply_tokens)))
    return Session(session_id=index, turns=ts)


def agent_sessions(n_sessions: int, turns: int, seed: int = 0, **ranges) -> Iterator[Session]:
    """Sessions 0..n_sessions-1 (``agent_session``'s keyword ranges), built lazily: a few hundred sessions hold
    ~10M ids, too many to keep in memory at once when the client only has ``concurrency`` of them open."""
    return (agent_session(i, turns, seed, **ranges) for i in range(n_sessions))


def long_context_request(index: int, seed: int = 0, prompt_tokens: tuple[int, int] = (8192, 65536),
                         answer_tokens: tuple[int, int] = (16, 32), vocab: tuple[int, int] = DEFAULT_VOCAB) -> Session:
    """Request number ``index`` as a one-turn session: ``prompt_tokens`` of prompt, ``answer_tokens`` of answer."""
    rng = random.Random(f"long:{seed}:{index}")
    prompt = _ids(rng, rng.randint(*prompt_tokens), vocab)
    return Session(session_id=index, turns=[Turn(prompt, rng.randint(*answer_tokens))])


def long_context_requests(n_requests: int, seed: int = 0, **ranges) -> Iterator[Session]:
    """Requests 0..n_requests-1 (``long_context_request``'s keyword ranges), built lazily."""
    return (long_context_request(i, seed, **ranges) for i in range(n_requests))


def int_range(text: str, flag: str) -> tuple[int, int]:
    """A ``LOW,HIGH`` flag value (e.g. ``--turns 6,30``) as two integers; ValueError naming ``flag`` otherwise."""
    try:
        lo, hi = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{flag}: LOW,HIGH, got {text!r}") from None
    return lo, hi


@dataclass(frozen=True)
class AgentMix:
    """The open-loop agent workload's distributions (ranges are inclusive token counts)."""

    system_tokens: tuple[int, int] = (2048, 8192)
    group_size: int = 8  # sessions sharing one system prompt (one product, one agent)
    turns: tuple[int, int] = (6, 30)
    tool_tokens: tuple[int, int] = (512, 8192)
    instruction_tokens: tuple[int, int] = (20, 60)
    reply_median: int = 128
    reply_sigma: float = 0.8  # of the log-normal answer length
    reply_tokens: tuple[int, int] = (16, 1024)  # answer lengths are clipped to this
    think_mean_s: float = 5.0

    def validate(self) -> None:
        """ValueError naming the field that makes no workload."""
        for name in ("system_tokens", "turns", "tool_tokens", "instruction_tokens", "reply_tokens"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ValueError(f"{name}: need 0 <= low <= high, got {lo}, {hi}")
        if self.turns[0] < 1 or self.group_size < 1 or self.reply_tokens[0] < 1:
            raise ValueError("turns, group_size and reply tokens must be at least 1")
        if self.think_mean_s < 0 or self.reply_sigma < 0 or self.reply_median < 1:
            raise ValueError("think_mean_s and reply_sigma must be >= 0, reply_median >= 1")


def open_agent_session(index: int, seed: int = 0, mix: AgentMix = AgentMix(),
                       vocab: tuple[int, int] = DEFAULT_VOCAB) -> Session:
    """Session number ``index`` of the open-loop mix: group ``index // group_size``'s system prompt (same ids in
    every session of the group, its length drawn per group), then per turn a tool output and an instruction."""
    group = index // mix.group_size
    group_rng = random.Random(f"open-system:{seed}:{group}")
    system = _ids(group_rng, group_rng.randint(*mix.system_tokens), vocab)
    rng = random.Random(f"open-agent:{seed}:{index}")
    ts = []
    for t in range(rng.randint(*mix.turns)):
        tool = _ids(rng, rng.randint(*mix.tool_tokens), vocab)
        instruction = _ids(rng, rng.randint(*mix.instruction_tokens), vocab)
        reply = round(rng.lognormvariate(math.log(mix.reply_median), mix.reply_sigma))
        think = rng.expovariate(1.0 / mix.think_mean_s) if t > 0 and mix.think_mean_s > 0 else 0.0
        ts.append(Turn(new_tokens=(system if t == 0 else []) + tool + instruction,
                       max_new_tokens=min(max(reply, mix.reply_tokens[0]), mix.reply_tokens[1]), think_s=think))
    return Session(session_id=index, turns=ts)


def open_agent_sessions(n_sessions: int, seed: int = 0, mix: AgentMix = AgentMix(),
                        vocab: tuple[int, int] = DEFAULT_VOCAB) -> Iterator[Session]:
    """Sessions 0..n_sessions-1 of the open-loop mix, built lazily."""
    mix.validate()
    return (open_agent_session(i, seed, mix, vocab) for i in range(n_sessions))
