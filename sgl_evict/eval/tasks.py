"""RULER-style synthetic long-context tasks, seeded, sized in tokens of the model's tokenizer.

Each generator hides facts in a filler haystack and asks for them back at the end of the prompt:

- ``niah_single``: one "special magic number" needle.
- ``niah_multikey``: several needles with distinct keys; one is asked for.
- ``niah_multivalue``: several values for one key; all are asked for.
- ``variable_tracking``: a chain of variable assignments; the names bound to the root value are asked for.
- ``kv_retrieval``: a JSON object of random keys and values; the value of one key is asked for.

The prompt ends with the start of the answer, so a base model continues it directly. Scoring is
RULER's string match: the fraction of expected answers that appear in the generated text.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "variable_tracking", "kv_retrieval")

# RULER's "noise" haystack: repetitive filler that carries no information.
_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
_WORDS = ("amber", "basil", "cedar", "delta", "ember", "fjord", "garnet", "harbor", "iris", "juniper", "kestrel",
          "lagoon", "maple", "nectar", "onyx", "pepper", "quartz", "raven", "saffron", "tundra", "umber", "velvet",
          "willow", "xenon", "yarrow", "zephyr")


@dataclass
class TaskSample:
    """One prompt with its expected answers.

    Attributes:
        task: generator name (one of :data:`TASKS`).
        prompt: full text fed to the model (no chat template).
        answers: strings that must appear in the model's continuation.
        seed: seed that reproduces this sample.
        num_tokens: prompt length in tokens of the tokenizer it was sized for.
    """

    task: str
    prompt: str
    answers: list[str]
    seed: int
    num_tokens: int = 0
    meta: dict = field(default_factory=dict)


def score_answer(sample: TaskSample, output_text: str) -> float:
    """Fraction of ``sample.answers`` found in ``output_text`` (RULER string match), in ``[0, 1]``."""
    return sum(a in output_text for a in sample.answers) / len(sample.answers)


def _number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _key(rng: random.Random) -> str:
    return f"{rng.choice(_WORDS)}-{rng.choice(_WORDS)}-{rng.randint(10, 99)}"


def _needles(task: str, rng: random.Random) -> tuple[list[str], str, list[str], dict]:
    """(facts to hide, question + answer prefix, answers, metadata) for a needle-style task."""
    if task == "niah_single":
        key, value = _key(rng), _number(rng)
        facts = [f"One of the special magic numbers for {key} is: {value}."]
        return facts, f"What is the special magic number for {key}? Answer: The special magic number for {key} is:", \
            [value], {}
    if task == "niah_multikey":
        keys = list(dict.fromkeys(_key(rng) for _ in range(8)))[:4]
        values = [_number(rng) for _ in keys]
        facts = [f"One of the special magic numbers for {k} is: {v}." for k, v in zip(keys, values)]
        target = rng.randrange(len(keys))
        return facts, (f"What is the special magic number for {keys[target]}? Answer: The special magic number for "
                       f"{keys[target]} is:"), [values[target]], {"distractors": len(keys) - 1}
    if task == "niah_multivalue":
        key = _key(rng)
        values = list(dict.fromkeys(_number(rng) for _ in range(3)))
        facts = [f"One of the special magic numbers for {key} is: {v}." for v in values]
        return facts, (f"What are all the special magic numbers for {key}? Answer: The special magic numbers for "
                       f"{key} are:"), values, {}
    raise ValueError(task)


def _haystack_prompt(facts: list[str], question: str, filler_units: int, depths: list[float], intro: str) -> str:
    units = [_FILLER] * filler_units
    # insert deepest-first so earlier insertions do not shift later positions
    for fact, depth in sorted(zip(facts, depths), key=lambda p: -p[1]):
        units.insert(round(depth * filler_units), fact + " ")
    return intro + "".join(units) + "\n" + question


def _build(task: str, rng: random.Random, filler_units: int, plan: dict) -> tuple[str, list[str], dict]:
    """Prompt text for ``task`` with ``filler_units`` filler blocks; ``plan`` fixes the random choices."""
    if task in ("niah_single", "niah_multikey", "niah_multivalue"):
        facts, question, answers, meta = plan["needles"]
        intro = ("Some special magic numbers are hidden within the following text. Make sure to memorize them. "
                 "I will quiz you about them afterwards.\n")
        return _haystack_prompt(facts, question, filler_units, plan["depths"], intro), answers, meta
    if task == "variable_tracking":
        names, value = plan["names"], plan["value"]
        facts = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
        question = (f"Find all variables that are assigned the value {value} in the text above. Answer: According to "
                    f"the chain(s) of variable assignment in the text above, {len(names)} variables are assigned the "
                    f"value {value}, they are:")
        intro = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n"
        return _haystack_prompt(facts, question, filler_units, plan["depths"], intro), list(names), {}
    if task == "kv_retrieval":
        pairs = plan["pairs"]
        # filler here is more key-value pairs: the haystack itself is the distractor
        extra = [(f"{k}-{i}", v) for i, (k, v) in enumerate(plan["extra_pairs"][:filler_units])]
        items = list(pairs) + extra
        random.Random(plan["shuffle_seed"]).shuffle(items)
        target_key, target_value = pairs[0]
        body = "{" + ", ".join(f'"{k}": "{v}"' for k, v in items) + "}"
        question = (f'\nKey: "{target_key}"\nThe value associated with the specified key is: "')
        intro = "Extract the value corresponding to the specified key in the JSON object below.\nJSON data:\n"
        return intro + body + question, [target_value], {"pairs": len(items)}
    raise ValueError(f"unknown task {task!r}; choose from: {', '.join(TASKS)}")


def _plan(task: str, rng: random.Random, max_units: int) -> dict:
    if task in ("niah_single", "niah_multikey", "niah_multivalue"):
        needles = _needles(task, rng)
        return {"needles": needles, "depths": [rng.uniform(0.1, 0.9) for _ in needles[0]]}
    if task == "variable_tracking":
        names = []
        while len(names) < 4:
            name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
            if name not in names:
                names.append(name)
        return {"names": names, "value": _number(rng), "depths": sorted(rng.uniform(0.1, 0.9) for _ in names)}
    if task == "kv_retrieval":
        return {"pairs": [(_key(rng), _number(rng))],
                "extra_pairs": [(_key(rng), _number(rng)) for _ in range(max_units)],
                "shuffle_seed": rng.randint(0, 2**31)}
    raise ValueError(f"unknown task {task!r}; choose from: {', '.join(TASKS)}")


def generate_sample(task: str, context_tokens: int, count_tokens: Callable[[str], int], seed: int) -> TaskSample:
    """A sample of ``task`` whose prompt is as long as possible without exceeding ``context_tokens``.

    Args:
        task: one of :data:`TASKS`.
        context_tokens: target prompt length in tokens.
        count_tokens: tokenizer length function (e.g. ``lambda s: len(tok(s).input_ids)``).
        seed: makes the sample reproducible.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from: {', '.join(TASKS)}")
    max_units = max(8, context_tokens)  # a filler unit is several tokens: an upper bound for the search
    plan = _plan(task, random.Random(f"{task}:{seed}"), max_units)
    prompt, answers, meta = _build(task, random.Random(seed), 0, plan)
    empty_len = count_tokens(prompt)
    if empty_len > context_tokens:
        raise ValueError(f"context_tokens={context_tokens} is too short for task {task!r} "
                         f"(its question alone takes {empty_len} tokens)")
    units = largest_fitting(lambda n: count_tokens(_build(task, random.Random(seed), n, plan)[0]), context_tokens,
                            max_units)
    prompt, answers, meta = _build(task, random.Random(seed), units, plan)
    return TaskSample(task, prompt, answers, seed, count_tokens(prompt), meta)


def largest_fitting(size: Callable[[int], int], budget: int, upper: int) -> int:
    """The largest ``n`` in ``[0, upper]`` with ``size(n) <= budget``, for a ``size`` that grows with ``n`` (a
    prompt's tokens with its filler units); ValueError when even ``n = 0`` does not fit.

    Text grows about linearly with its filler, so the search extrapolates from a small probe to a count just past
    the answer, then interpolates inside that bracket: about six calls of ``size`` (tokenizing the whole prompt
    each time) where bisection needs fifteen for a 16K-token prompt."""
    base = size(0)
    if base > budget:
        raise ValueError(f"a target of {budget} tokens is too short for this task's questions (they take {base})")
    lo, s_lo, n = 0, base, min(upper, 32)
    while True:  # bracket: lo fits, hi does not (or is past upper)
        s = size(n)
        if s > budget:
            hi, s_hi = n, s
            break
        lo, s_lo = n, s
        if n == upper:
            return upper
        per_unit = max((s - base) / n, 1e-9)
        n = min(upper, max(n + 1, n + int((budget - s) / per_unit * 1.02) + 1))
    while hi - lo > 1:
        guess = lo + int((budget - s_lo) * (hi - lo) / max(1, s_hi - s_lo))
        guess = min(max(guess, lo + 1), hi - 1)
        s = size(guess)
        if s <= budget:
            lo, s_lo = guess, s
        else:
            hi, s_hi = guess, s
    return lo
