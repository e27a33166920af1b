"""Task families of the quality suite: seeded conversations sized in tokens of the served model's tokenizer.

A :class:`Conversation` is a list of turns; a turn adds some context (a document, a tool output, or nothing) and
then asks a question that ends with the start of its answer, so a base model continues it directly. Turn ``k``'s
prompt is turn ``k - 1``'s prompt, that turn's answer and turn ``k``'s own text (:func:`segments`): every turn
reuses the previous turn's (compressed) prefix on the server.

- ``single``: one turn of sgl_evict/eval/tasks.py's RULER-style tasks, the tasks in turn.
- ``doc_qa``: a document of varied filler holding one fact per turn (a code, a town, a platform, a password,
  ...), then one question per turn, each about another fact.
- ``agent_trace``: an agent's tool calls and their JSON-and-log outputs; each turn adds an output and asks for a
  field that appeared one to five outputs earlier.
- ``shared_system``: groups of sessions whose prompts start with the same system prompt holding one fact per
  session; each session asks its own fact. On the server the first session of a group evicts, the later ones
  start from its compressed prefix (the radix cache's holes are inherited).

Every fact's value is a made-up word or number: the model cannot guess it, only read it.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from sgl_evict.eval.tasks import TASKS as RULER_TASKS
from sgl_evict.eval.tasks import generate_sample, largest_fitting

FAMILIES = ("single", "doc_qa", "agent_trace", "shared_system")
MULTI_TURN = ("doc_qa", "agent_trace")
#: tokens set aside for each turn's answer when a conversation is sized (answers are cut at this length)
ANSWER_TOKENS = 24

CountTokens = Callable[[str], int]


@dataclass(frozen=True)
class Turn:
    """One turn: the ``text`` it adds (may be empty), then its ``question``, which ends with the start of the
    answer. ``answers``: strings that must all appear in the answer."""

    text: str
    question: str
    answers: tuple[str, ...]
    meta: dict = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Conversation:
    """A seeded conversation of ``family`` sized so that its last turn's prompt is at most ``target`` tokens.

    ``group``: sessions with the same group (``shared_system``) share their first turn's text, and run one after
    the other in the group's ``index`` order."""

    family: str
    target: int
    seed: int
    index: int
    turns: tuple[Turn, ...]
    group: int | None = None

    @property
    def key(self) -> str:
        return f"{self.family}/{self.target}/{self.seed}/{self.index}"


def segments(turn: Turn, first: bool) -> str:
    """The text that ``turn`` appends to the conversation so far (the previous answer already included)."""
    body = turn.text + turn.question
    return body if first else "\n" + body


def conversation_tokens(conv: Conversation, count: CountTokens) -> int:
    """The last turn's prompt length, with :data:`ANSWER_TOKENS` for every earlier answer: what sizing bounds."""
    return sum(count(segments(t, i == 0)) for i, t in enumerate(conv.turns)) + ANSWER_TOKENS * (len(conv.turns) - 1)


# ---------------------------------------------------------------------------------------------------------- words
_SYLLABLES = ("ka", "lo", "mer", "vin", "dra", "tu", "sel", "qua", "bri", "no", "zan", "pe", "rol", "thi", "gor",
              "ves", "mi", "ul", "ter", "ba", "shen", "cor", "li", "fa", "dun", "ix", "ro", "wen", "sta", "gle")
_ADJ = ("quiet", "narrow", "busy", "ancient", "bright", "heavy", "careful", "distant", "plain", "crowded", "early",
        "late", "modest", "sturdy", "rare", "simple", "steady", "humble", "formal", "rapid")
_NOUN = ("report", "bridge", "ledger", "garden", "harbor", "engine", "archive", "market", "council", "workshop",
         "river", "station", "library", "orchard", "warehouse", "festival", "survey", "schedule", "contract",
         "network")
_GROUP = ("committee", "crew", "staff", "board", "team", "guild", "office", "panel", "class", "club")
_VERB = ("reviewed", "repaired", "measured", "discussed", "cleaned", "inspected", "painted", "moved", "counted",
         "delayed")
_WHEN = ("on Monday", "last spring", "in the morning", "after the storm", "before the holiday", "every winter",
         "at noon", "during the audit", "on Friday", "last year")
_FILLER = (
    "The {a} {n} near the {n2} was {v} by the {g} {w}.",
    "Reports from the {n} describe it as {a} but useful.",
    "Nobody in the {g} expected the {n} to be {v} so soon.",
    "A {a} {n} usually needs more care than a {a2} {n2}.",
    "The {g} {v} the {n} {w} and wrote a short note about it.",
    "Most visitors remember the {n} because it is so {a}.",
    "According to the {g}, the {n2} will be {v} again {w}.",
    "The old {n} and the new {n2} are both fairly {a}.",
)


def _word(rng: random.Random, syllables: int = 3) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(syllables)).capitalize()


def _filler_sentence(rng: random.Random) -> str:
    return rng.choice(_FILLER).format(a=rng.choice(_ADJ), a2=rng.choice(_ADJ), n=rng.choice(_NOUN),
                                      n2=rng.choice(_NOUN), g=rng.choice(_GROUP), v=rng.choice(_VERB),
                                      w=rng.choice(_WHEN))


class _Unique:
    """Draws values never drawn before in one conversation (names, codes), so every answer appears once."""

    def __init__(self, rng: random.Random):
        self.rng, self.seen = rng, set()

    def __call__(self, draw: Callable[[random.Random], str]) -> str:
        for _ in range(1000):
            value = draw(self.rng)
            if value not in self.seen and not any(value in s or s in value for s in self.seen):
                self.seen.add(value)
                return value
        raise RuntimeError("could not draw a new value")


# ---------------------------------------------------------------------------------------------------------- facts
#: (fact, question, start of the answer, value drawer); keys and values are filled from the same draw
_FACTS = (
    ("The vault of {key} opens with the code {value}.", "What code opens the vault of {key}?",
     "The vault of {key} opens with the code", lambda r: str(r.randint(1_000_000, 9_999_999))),
    ("{key} was born in the town of {value}.", "In which town was {key} born?",
     "{key} was born in the town of", lambda r: _word(r, 3)),
    ("The night train to {key} leaves from platform {value}.", "From which platform does the night train to {key} "
     "leave?", "The night train to {key} leaves from platform",
     lambda r: f"{r.choice('ABCDEFGHJK')}{r.randint(10, 99)}"),
    ("The password of the {key} account is {value}.", "What is the password of the {key} account?",
     "The password of the {key} account is", lambda r: f"{_word(r, 2).lower()}-{r.randint(100, 999)}"),
    ("The secret ingredient of the {key} soup is {value}.", "What is the secret ingredient of the {key} soup?",
     "The secret ingredient of the {key} soup is", lambda r: _word(r, 3).lower()),
    ("The meeting with the {key} delegation is held in room {value}.", "In which room is the meeting with the "
     "{key} delegation held?", "The meeting with the {key} delegation is held in room",
     lambda r: f"{r.choice('KLMNPRST')}{r.randint(100, 999)}"),
)


def _facts(count: int, unique: _Unique) -> list[tuple[str, str, str]]:
    """``count`` facts as (sentence, question with the start of its answer, value), templates in turn."""
    out = []
    order = list(range(len(_FACTS)))
    unique.rng.shuffle(order)
    for i in range(count):
        fact, question, start, draw = _FACTS[order[i % len(order)]]
        key, value = unique(lambda r: _word(r, 2)), unique(draw)
        out.append((fact.format(key=key, value=value),
                    f"\nQuestion: {question.format(key=key)}\nAnswer: {start.format(key=key)}", value))
    return out


def _document(facts: list[str], filler: list[str], depths: list[float]) -> str:
    sentences = list(filler)
    for fact, depth in sorted(zip(facts, depths), key=lambda p: -p[1]):  # deepest first: positions hold
        sentences.insert(round(depth * len(filler)), fact)
    return " ".join(sentences)


# -------------------------------------------------------------------------------------------------------- families
def single_turn(target: int, count: CountTokens, seed: int, index: int) -> Conversation:
    """One RULER-style turn (sgl_evict/eval/tasks.py), the task chosen by ``index`` in turn."""
    task = RULER_TASKS[index % len(RULER_TASKS)]
    sample = generate_sample(task, target, count, seed * 1_000_003 + index)
    turn = Turn("", sample.prompt, tuple(sample.answers), {"task": task})
    return Conversation("single", target, seed, index, (turn,))


def doc_qa(target: int, count: CountTokens, seed: int, index: int, turns: int = 6) -> Conversation:
    """A document with ``turns`` facts at seeded depths, then one question per turn in a seeded order."""
    rng = random.Random(f"doc_qa:{target}:{seed}:{index}")
    facts = _facts(turns, _Unique(rng))
    depths = [rng.uniform(0.05, 0.95) for _ in facts]
    order = rng.sample(range(turns), turns)
    filler = [_filler_sentence(rng) for _ in range(target)]  # a sentence is several tokens: an upper bound
    intro = "Read the following document carefully. Questions about it follow.\n\n"

    def build(n: int) -> Conversation:
        doc = intro + _document([f for f, _, _ in facts], filler[:n], depths)
        out = []
        for k, i in enumerate(order):
            _, question, value = facts[i]
            out.append(Turn(doc if k == 0 else "", question, (value,), {"fact": i, "depth": depths[i]}))
        return Conversation("doc_qa", target, seed, index, tuple(out))
    return build(largest_fitting(lambda n: conversation_tokens(build(n), count), target, len(filler)))


_TOOLS = ("search_flights", "lookup_customer", "create_ticket", "query_inventory", "fetch_logs", "run_sql",
          "get_invoice", "list_files", "check_shipment", "read_config", "get_weather", "book_room")
_FIELDS = ("confirmation_code", "session_token", "invoice_number", "tracking_id", "ticket_ref", "batch_label",
           "approval_key", "order_ref", "build_tag", "voucher_code", "case_number", "lot_number")
_LOG = ("{ts} INFO worker-{n} request {hex} finished in {ms} ms",
        "{ts} DEBUG cache miss for key {word}:{n}",
        "{ts} WARN retrying {tool} after {ms} ms (attempt {k})",
        "{ts} INFO user {word} fetched {n} rows from table {table}",
        "{ts} DEBUG connection pool size={k} idle={n}",
        "{ts} INFO {tool} returned status=ok bytes={ms}")


def _log_line(rng: random.Random, step: int, line: int) -> str:
    ts = f"2026-03-{1 + step % 28:02d}T{(8 + line // 3600) % 24:02d}:{line // 60 % 60:02d}:{line % 60:02d}Z"
    return rng.choice(_LOG).format(ts=ts, n=rng.randint(1, 64), hex=f"{rng.getrandbits(32):08x}",
                                   ms=rng.randint(3, 900), word=rng.choice(_NOUN), tool=rng.choice(_TOOLS),
                                   k=rng.randint(1, 5), table=rng.choice(_NOUN) + "s")


def agent_trace(target: int, count: CountTokens, seed: int, index: int, turns: int = 6,
                max_distance: int = 5) -> Conversation:
    """``turns + 1`` tool outputs; turn 1 adds outputs 1 and 2 and asks about output 1, turn ``k`` adds output
    ``k + 1`` and asks about the output ``d`` before it (``d`` seeded in ``[1, min(max_distance, k)]``). Each
    output holds a field no other output has, and log lines whose number sets its size (seeded weights, one scale
    fitted to ``target``)."""
    rng = random.Random(f"agent_trace:{target}:{seed}:{index}")
    unique = _Unique(rng)
    outputs = turns + 1
    tools = rng.sample(_TOOLS, outputs) if outputs <= len(_TOOLS) else [rng.choice(_TOOLS) for _ in range(outputs)]
    fields = rng.sample(_FIELDS, outputs) if outputs <= len(_FIELDS) else [f"field_{i}" for i in range(outputs)]
    values = [unique(lambda r: f"{_word(r, 2).upper()}-{r.randint(10000, 99999)}") for _ in range(outputs)]
    weights = [rng.uniform(0.2, 1.0) for _ in range(outputs)]
    logs = [[_log_line(rng, step, line) for line in range(target // 8)] for step in range(outputs)]
    extras = [{"status": "ok", "latency_ms": rng.randint(5, 900), "region": rng.choice(("eu-west", "us-east",
                                                                                        "ap-south"))}
              for _ in range(outputs)]
    asked = [0] + [k + 1 - rng.randint(1, min(max_distance, k)) for k in range(1, turns)]
    intro = ("You are an operations agent. Your tool calls and their outputs follow; answer questions about them "
             "exactly.\n")

    def output(step: int, lines: int) -> str:
        record = {**extras[step], fields[step]: values[step]}
        body = ", ".join(f'"{k}": "{v}"' if isinstance(v, str) else f'"{k}": {v}' for k, v in record.items())
        arg = f'{{"id": {1000 + step}}}'
        return (f"\n[call {step + 1}] {tools[step]}({arg})\n[output {step + 1}]\n{{{body}}}\n"
                + "".join(line + "\n" for line in logs[step][:lines]))

    def build(scale: int) -> Conversation:
        lines = [round(scale * w) for w in weights]
        out = []
        for k in range(turns):
            text = (intro + output(0, lines[0]) + output(1, lines[1])) if k == 0 else output(k + 1, lines[k + 1])
            j = asked[k]
            question = (f'\nQuestion: In the output of call {j + 1} ({tools[j]}), what is the value of '
                        f'"{fields[j]}"?\nAnswer: The value of "{fields[j]}" is "')
            out.append(Turn(text, question, (values[j],), {"asked_output": j + 1, "distance": k + 1 - j}))
        return Conversation("agent_trace", target, seed, index, tuple(out))
    return build(largest_fitting(lambda n: conversation_tokens(build(n), count), target, len(logs[0])))


def shared_system(target: int, count: CountTokens, seed: int, group: int, sessions: int = 4) -> list[Conversation]:
    """``sessions`` one-turn conversations sharing a system prompt that holds one fact for each; session ``i``
    asks fact ``i``. Their indices are ``group * sessions + i``."""
    rng = random.Random(f"shared_system:{target}:{seed}:{group}")
    facts = _facts(sessions, _Unique(rng))
    depths = [rng.uniform(0.05, 0.95) for _ in facts]
    filler = [_filler_sentence(rng) for _ in range(target)]
    intro = "System: you are the assistant of a large company. Facts you must know:\n\n"

    def build(n: int) -> list[Conversation]:
        doc = intro + _document([f for f, _, _ in facts], filler[:n], depths) + "\n\nUser:"
        return [Conversation("shared_system", target, seed, group * sessions + i,
                             (Turn(doc, q, (v,), {"fact": i, "depth": depths[i], "order": i}),), group)
                for i, (_, q, v) in enumerate(facts)]

    # the group fits when its longest session does
    size = lambda n: max(conversation_tokens(c, count) for c in build(n))  # noqa: E731
    return build(largest_fitting(size, target, len(filler)))


def job_count(family: str, samples: int, group_size: int = 4) -> int:
    """How many units of work ``samples`` conversations of ``family`` make: one per conversation, one per group of
    ``group_size`` sessions for ``shared_system`` (rounded up)."""
    return -(-samples // group_size) if family == "shared_system" else samples


def conversations(family: str, target: int, count: CountTokens, seed: int, index: int, turns: int = 6,
                  group_size: int = 4) -> list[Conversation]:
    """Unit of work ``index`` of ``family``: one conversation, or for ``shared_system`` the sessions of group
    ``index``, which run one after the other."""
    if family not in FAMILIES:
        raise ValueError(f"unknown task family {family!r}; choose from: {', '.join(FAMILIES)}")
    if turns < 1 or group_size < 1:
        raise ValueError("turns and group size must be at least 1")
    if family == "single":
        return [single_turn(target, count, seed, index)]
    if family == "doc_qa":
        return [doc_qa(target, count, seed, index, turns)]
    if family == "agent_trace":
        return [agent_trace(target, count, seed, index, turns)]
    return shared_system(target, count, seed, index, group_size)


def generate(family: str, target: int, count: CountTokens, seed: int, samples: int, turns: int = 6,
             group_size: int = 4) -> list[Conversation]:
    """``samples`` conversations of ``family`` at ``target`` tokens (``shared_system``: rounded up to whole
    groups of ``group_size`` sessions)."""
    if samples < 1:
        raise ValueError("samples, turns and group size must be at least 1")
    return [c for i in range(job_count(family, samples, group_size))
            for c in conversations(family, target, count, seed, i, turns, group_size)]
