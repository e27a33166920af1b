"""Runs the quality suite against a running SGLang server: every conversation under the reference (the full cache)
and under each evicting arm, turn by turn, with records written as they finish.

Per conversation (a *job*), turn by turn: the reference answers first (``{"policy": "none"}`` on the same server,
or a plain server given by URL), then every arm. Each arm's turn ``k`` prompt is turn ``k - 1``'s prompt, the
**reference's** answer to it and turn ``k``'s text, so that all arms are asked the same prompts and every answer
pairs with the reference's; on the server each turn still starts from that arm's compressed prefix (its own radix
namespace, ``extra_key``). A ``shared_system`` group is one job whose sessions share a namespace per arm and run in
order: session 0 evicts the shared system prompt, the later ones inherit its holes. Jobs run ``concurrency`` at a
time, so reference and evicting requests of one conversation are sent next to each other.

Prompts are token ids: the tokenizer's start token, then each segment tokenized on its own
(:func:`sgl_evict.quality.tasks.segments`), so a turn's ids extend the previous turn's exactly.
"""

from __future__ import annotations

import gzip
import json
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sgl_evict.quality.client import Reply, SGLangClient
from sgl_evict.quality.metrics import exact_match
from sgl_evict.quality.tasks import (
    ANSWER_TOKENS,
    FAMILIES,
    MULTI_TURN,
    Conversation,
    conversations,
    job_count,
    segments,
)
from sgl_evict.selection import Budget

REFERENCE = "reference"
#: laq's default lookahead steps (--kv-evict-lookahead-steps): answer positions scored inside and beyond
LOOKAHEAD_STEPS = 8


@dataclass(frozen=True)
class Arm:
    """One eviction setting sent with every request of its arm: ``policy@budget`` with optional extra override
    fields (``laq@0.1+history=keep``), as ``custom_params["kv_evict"]``."""

    policy: str
    budget: str
    extra: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, text: str) -> "Arm":
        head, *extras = text.strip().split("+")
        policy, sep, budget = head.partition("@")
        if not sep or not policy or not budget:
            raise ValueError(f"arm {text!r}: write policy@budget, e.g. laq@0.1 or snapkv@0.2+history=keep")
        try:
            Budget.parse(budget)
        except ValueError as err:
            raise ValueError(f"arm {text!r}: {err}") from None
        pairs = []
        for item in extras:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise ValueError(f"arm {text!r}: an extra field is key=value, got {item!r}")
            pairs.append((key, value))
        return cls(policy, budget, tuple(pairs))

    @property
    def name(self) -> str:
        return f"{self.policy}@{self.budget}" + "".join(f"+{k}={v}" for k, v in self.extra)

    def kv_evict(self) -> dict:
        """The request's ``custom_params["kv_evict"]``: the budget as a number, extra values as JSON where they
        parse (``3`` -> 3) and as strings otherwise."""
        out: dict = {"policy": self.policy, "budget": _number(self.budget)}
        for key, value in self.extra:
            out[key] = _json_or_text(value)
        return out


def _number(text: str) -> float | int:
    b = Budget.parse(text)
    return b.fraction if b.fraction is not None else b.tokens


def _json_or_text(value: str):
    try:
        return json.loads(value)
    except ValueError:
        return value


@dataclass
class QualityConfig:
    """What one run covers; the defaults are the suite's."""

    families: list[str] = field(default_factory=lambda: list(FAMILIES))
    contexts: list[int] = field(default_factory=lambda: [4096, 8192])
    samples: int = 20
    arms: list[Arm] = field(default_factory=lambda: [Arm.parse(a) for a in ("snapkv@0.1", "laq@0.1")])
    seed: int = 0
    turns: int = 6
    group_size: int = 4
    horizon: int = 64
    answer_tokens: int = ANSWER_TOKENS
    concurrency: int = 16
    #: seconds after which no new turn starts (the turns asked so far stay recorded); None: no limit
    deadline_s: float | None = None

    def validate(self) -> None:
        """ValueError naming the bad setting, before any request is sent."""
        for f in self.families:
            if f not in FAMILIES:
                raise ValueError(f"--families: unknown family {f!r}; choose from: {', '.join(FAMILIES)}")
        if not self.arms:
            raise ValueError("--arms: give at least one policy@budget")
        names = [a.name for a in self.arms]
        if len(set(names)) != len(names):
            raise ValueError(f"--arms: an arm is listed twice: {', '.join(names)}")
        for name, value in (("--samples", self.samples), ("--turns", self.turns), ("--group-size", self.group_size),
                            ("--horizon", self.horizon), ("--concurrency", self.concurrency),
                            ("--answer-tokens", self.answer_tokens)):
            if value < 1:
                raise ValueError(f"{name}: must be at least 1, got {value}")
        for c in self.contexts:
            if c < 64:
                raise ValueError(f"--contexts: {c} tokens is too short for any task (at least 64)")


@dataclass
class Record:
    """One request and what came of it (a line of ``records.jsonl``)."""

    family: str
    target: int
    seed: int
    index: int
    group: int | None
    turn: int
    arm: str
    answers: list[str]
    meta: dict
    prompt_tokens: int
    output_ids: list[int]
    answer_ids: list[int]
    answer_text: str
    correct: bool
    cached_tokens: int | None
    latency_s: float
    error: str | None = None

    @property
    def key(self) -> tuple:
        return (self.family, self.target, self.seed, self.index, self.turn, self.arm)


class Tokens:
    """What the runner needs of the served model's tokenizer: counting, encoding segments, decoding answers."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        eos = tokenizer.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos]) - {None}

    def count(self, text: str) -> int:
        return len(self.encode(text))

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False).input_ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def answer(self, output_ids: Iterable[int], limit: int) -> list[int]:
        """The answer in ``output_ids``: up to the end-of-sequence token or the first token that starts a new line,
        at most ``limit`` tokens (what goes into the next turn's prompt, and what is scored)."""
        out = []
        for t in list(output_ids)[:limit]:
            if t in self.eos or "\n" in self.tok.decode([t]):
                break
            out.append(t)
        return out


@dataclass(frozen=True)
class Job:
    """One unit of work: conversation ``index`` of ``family`` at ``target`` tokens (``shared_system``: group
    ``index``), generated when a worker takes it up, so generation overlaps with serving."""

    family: str
    target: int
    index: int

    def conversations(self, config: QualityConfig, tokens: Tokens) -> list[Conversation]:
        return conversations(self.family, self.target, tokens.count, config.seed, self.index, config.turns,
                             config.group_size)

    def requests(self, config: QualityConfig) -> int:
        per_conversation = config.turns if self.family in MULTI_TURN else 1
        sessions = config.group_size if self.family == "shared_system" else 1
        return per_conversation * sessions * (len(config.arms) + 1)


def plan_jobs(config: QualityConfig) -> list[Job]:
    """Every job of the run, taken from the family-and-length cells in turn, so a run stopped by its deadline leaves
    every cell about equally filled."""
    cells = [[Job(f, t, i) for i in range(job_count(f, config.samples, config.group_size))]
             for f in config.families for t in config.contexts]
    return [cell[i] for i in range(max(map(len, cells), default=0)) for cell in cells if i < len(cell)]


def requests_in(jobs: list[Job], config: QualityConfig) -> int:
    return sum(j.requests(config) for j in jobs)


def answered(job: Job, config: QualityConfig, done: dict[tuple, Record]) -> bool:
    """Every request of ``job`` is in ``done``, so a resumed run need not generate it (0.2 s a 32K prompt).
    Never for a ``shared_system`` group, whose sessions have indices of their own."""
    if job.family == "shared_system":
        return False
    turns = config.turns if job.family in MULTI_TURN else 1
    names = [REFERENCE, *(a.name for a in config.arms)]
    return all((job.family, job.target, config.seed, job.index, k, n) in done for k in range(turns) for n in names)


def jobs_left(config: QualityConfig, done: dict[tuple, Record]) -> list[Job]:
    """The jobs of the run that a run resumed from ``done`` (see :func:`resumable`) would still take up."""
    return [j for j in plan_jobs(config) if not answered(j, config, done)]


def resumable(records: Iterable[Record], config: QualityConfig) -> dict[tuple, Record]:
    """The records a run of ``config`` resumes from, by key: those that got an answer (failed ones are asked
    again), less the turns of a multi-turn conversation an arm of ``config`` did not finish: its next turn must
    start from the compressed prefix its own earlier turns left in the server's radix cache, which a new run (a
    new server, new namespaces) does not have, so the arm asks the conversation again from its first turn.
    Records this run would not ask (other seeds, lengths, arms) stay as they are."""
    done = {r.key: r for r in records if r.error is None}
    asked = Counter(_arm_conversation(key) for key in done)
    arms = {a.name for a in config.arms}
    unfinished = {c for c, n in asked.items()
                  if c[0] in MULTI_TURN and c[0] in config.families and c[1] in config.contexts
                  and c[2] == config.seed and c[4] in arms and c[3] < config.samples and n < config.turns}
    return {k: r for k, r in done.items() if _arm_conversation(k) not in unfinished}


def read_records(path: Path) -> list[Record]:
    """Every record in ``path`` (``records.jsonl``, or a gzipped ``.jsonl.gz`` as kept in bench/results), in
    order; ValueError naming the line that is no record."""
    text = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(Record(**json.loads(line)))
        except (ValueError, TypeError) as err:
            raise ValueError(f"{path}:{n}: not a quality record ({err})") from None
    return out


class RecordFile:
    """``records.jsonl``: appended as requests finish (thread-safe), read back to resume an interrupted run."""

    def __init__(self, path: Path):
        self.path = path
        self.lock = threading.Lock()

    def load(self, config: QualityConfig) -> dict[tuple, Record]:
        """What a run of ``config`` resumes from (:func:`resumable`); the file is rewritten without the turns of
        the conversations it will ask again."""
        if not self.path.exists():
            return {}
        done = {r.key: r for r in read_records(self.path) if r.error is None}
        kept = resumable(done.values(), config)
        if len(kept) < len(done):
            self.path.write_text("".join(json.dumps(asdict(r)) + "\n" for r in kept.values()))
        return kept

    def append(self, record: Record) -> None:
        line = json.dumps(asdict(record)) + "\n"
        with self.lock, open(self.path, "a") as f:
            f.write(line)


def run_quality(config: QualityConfig, client: SGLangClient, tokens: Tokens, out: Path,
                reference: SGLangClient | None = None, resume: bool = False,
                progress: Callable[[int], None] | None = None) -> list[Record]:
    """Runs every job; returns all records (resumed ones included). ``reference``: a plain server for the reference
    answers (None: the same server with ``{"policy": "none"}``). ``progress(n)``: n more requests done."""
    config.validate()
    out.mkdir(parents=True, exist_ok=True)
    records = RecordFile(out / "records.jsonl")
    done = records.load(config) if resume else {}
    if not resume and records.path.exists():
        records.path.unlink()
    run_id = _run_id(out, resume)
    jobs = plan_jobs(config)
    for family in config.families:  # a target too short for a family fails here, before any request
        for target in config.contexts:
            Job(family, target, 0).conversations(config, tokens)
    results: list[Record] = list(done.values())
    lock = threading.Lock()
    stop_at = None if config.deadline_s is None else time.monotonic() + config.deadline_s
    # a turn's arms go out together once the reference answered (its answer extends every arm's next prompt)
    arms_pool = ThreadPoolExecutor(config.concurrency * len(config.arms))

    def late() -> bool:
        return stop_at is not None and time.monotonic() > stop_at

    def job(spec: Job) -> None:
        if late() or answered(spec, config, done):
            return
        for conv in spec.conversations(config, tokens):
            ids = list(tokens.bos)
            for k, turn in enumerate(conv.turns):
                if late():  # the turns asked so far stay recorded
                    return
                ids = ids + tokens.encode(segments(turn, k == 0))
                ref = _ask(conv, k, REFERENCE, ids, None, reference or client, reference is None)
                asked = [arms_pool.submit(_ask, conv, k, arm.name, ids, arm, client, True) for arm in config.arms]
                for f in asked:
                    f.result()
                ids = ids + ref.answer_ids

    def _ask(conv: Conversation, k: int, arm_name: str, ids: list[int], arm: Arm | None, server: SGLangClient,
             evicting_server: bool) -> Record:
        key = (conv.family, conv.target, conv.seed, conv.index, k, arm_name)
        if key in done:
            return done[key]
        kv = (arm.kv_evict() if arm else {"policy": "none"}) if evicting_server else None
        # one radix namespace per conversation and arm (per group and arm for shared_system), fresh each run
        scope = f"g{conv.group}" if conv.group is not None else f"c{conv.index}"
        extra_key = f"sgl-evict-quality:{run_id}:{conv.family}:{conv.target}:{conv.seed}:{scope}:{arm_name}"
        reply = server.generate(ids, config.horizon, kv, extra_key)
        record = _record(conv, k, arm_name, ids, reply, tokens, config.answer_tokens)
        records.append(record)
        with lock:
            results.append(record)
        if progress:
            progress(1)
        if record.error and arm is None:
            raise RuntimeError(f"reference request failed ({conv.key} turn {k + 1}): {record.error}")
        return record

    with arms_pool, ThreadPoolExecutor(config.concurrency) as pool:
        futures = [pool.submit(job, j) for j in jobs]
        for f in as_completed(futures):
            f.result()
    return results


def _arm_conversation(key: tuple) -> tuple:
    """(family, target, seed, index, arm) of a record's key (family, target, seed, index, turn, arm)."""
    return key[:4] + key[5:]


def _record(conv: Conversation, k: int, arm: str, ids: list[int], reply: Reply, tokens: Tokens,
            answer_limit: int) -> Record:
    turn = conv.turns[k]
    answer = tokens.answer(reply.output_ids, answer_limit)
    text = tokens.decode(answer)
    return Record(conv.family, conv.target, conv.seed, conv.index, conv.group, k, arm, list(turn.answers),
                  dict(turn.meta), len(ids), list(reply.output_ids), answer, text,
                  reply.error is None and exact_match(turn.answers, text), reply.cached_tokens, reply.latency_s,
                  reply.error)


def _run_id(out: Path, resume: bool) -> str:
    """A fresh id per run (radix namespaces of an earlier run on the same server are not reused); a resumed run
    keeps its own, so its unfinished conversations find their compressed prefixes."""
    path = out / "run_id"
    if resume and path.exists():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:12]
    path.write_text(run_id + os.linesep)
    return run_id
