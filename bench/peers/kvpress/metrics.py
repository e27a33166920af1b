"""One metric code path for every method, ours and kvpress's: a method hands over the cache it left after the
prompt and the logits of the prompt's last position; everything after that is this module's.

- accuracy: greedy answer, exact match of all expected strings (the quality suite's ``exact_match``);
- fidelity: teacher-forced on the full cache's greedy continuation (``horizon`` tokens), top-1 agreement and
  ``KL(full || method)`` of the next-token distributions, position by position. Position 0 is the first answer
  token (for our default mode the prompt's own logits, identical to the full cache's by construction); positions
  1-8 overlap laq's 8 lookahead steps, 9+ lie beyond them, and are reported apart.

Decoding goes through the harness's ``_extend`` (its attention after a compression: the new tokens see every cached
key, the sliding-window layers their last 512 positions), so ours and kvpress's caches are decoded alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sgl_evict.quality.metrics import exact_match, wilson

LOOKAHEAD = 8  # laq's lookahead steps: positions 1..LOOKAHEAD are reported apart from the later ones


@dataclass
class Reference:
    """The full cache's behaviour on one prompt.

    Attributes:
        continuation: ``horizon`` greedy tokens ``c_0 .. c_{H-1}`` after the prompt.
        logp: ``[H + 1, vocab]`` float32 log-probabilities: row 0 predicts ``c_0`` (the prompt's last position),
            row ``i`` predicts ``c_i`` after teacher-forcing ``c_0 .. c_{i-1}``.
        seq_len: the prompt's length (the first answer token's position).
    """

    continuation: list[int]
    logp: torch.Tensor
    seq_len: int


@dataclass
class Scores:
    """What one method scored on one prompt (see the module docstring for the positions)."""

    correct: bool
    output: str
    first_agree: float
    top1_1_8: float
    top1_9: float
    kl_0: float
    kl_1_8: float
    kl_9: float


def greedy(harness, cache, first_logits: torch.Tensor, start: int, max_new_tokens: int, eos: tuple[int, ...],
           tokenizer=None, answers: tuple[str, ...] = ()) -> list[int]:
    """Greedy tokens from ``first_logits [vocab]`` at position ``start`` on ``cache`` (extended in place: pass a copy).

    Stops at an EOS token, after ``max_new_tokens``, or as soon as the text holds every one of ``answers`` (exact
    match cannot change after that; this only saves CPU)."""
    return _decode([int(first_logits.argmax())], max_new_tokens, eos, tokenizer, answers,
                   _decode_step(harness, cache, start))


def drafted_greedy(harness, cache, logp: torch.Tensor, draft: list[int], start: int, max_new_tokens: int,
                   eos: tuple[int, ...], tokenizer=None, answers: tuple[str, ...] = ()) -> list[int]:
    """:func:`greedy`'s tokens, most of them read off a teacher-forced pass instead of decoded one by one.

    ``logp [H + 1, vocab]`` is this cache's :func:`teacher_forced_logp` over ``draft`` (the full cache's greedy
    continuation): while the method's greedy tokens equal the draft's, row ``i``'s argmax is its next token, so no
    decode step is run. At the first token that differs (or past the draft) the cache is extended by the tokens so
    far in one call and decoding goes on step by step. Same stopping rules as :func:`greedy`. The tokens equal
    :func:`greedy`'s up to floating-point ties (a row of a many-token extend can round differently from a one-token
    step); ``cache`` is extended in place: pass a copy."""
    picks = logp.argmax(-1).tolist()
    step = _decode_step(harness, cache, start)
    off_draft = []  # set once the tokens leave the draft: they never return to it

    def next_token(tokens: list[int]) -> int:
        i = len(tokens)
        if not off_draft and i < len(picks) and tokens == draft[:i]:
            return picks[i]
        if not off_draft:
            off_draft.append(True)
            if i > 1:  # the tokens so far (but the last) into the cache in one extend
                harness._extend(cache, torch.arange(start, start + i - 1),
                                input_ids=torch.tensor([tokens[:-1]], device=harness.device))
        return step(tokens)

    return _decode([picks[0]], max_new_tokens, eos, tokenizer, answers, next_token)


def _decode_step(harness, cache, start: int):
    """The next greedy token after ``tokens`` by one decode step on ``cache``, which holds all of them but the
    last (the prompt's answer starts at position ``start``)."""
    def next_token(tokens: list[int]) -> int:
        logits = harness._extend(cache, torch.tensor([start + len(tokens) - 1]),
                                 input_ids=torch.tensor([[tokens[-1]]], device=harness.device))
        return int(logits[-1].argmax())
    return next_token


def _decode(tokens: list[int], max_new_tokens: int, eos: tuple[int, ...], tokenizer, answers: tuple[str, ...],
            next_token) -> list[int]:
    """``tokens`` extended by ``next_token(tokens)`` until an EOS token, ``max_new_tokens``, or a text that holds
    every one of ``answers``: :func:`greedy`'s stopping rules, shared by both ways of getting the next token."""
    while len(tokens) < max_new_tokens and tokens[-1] not in eos:
        if answers and exact_match(answers, tokenizer.decode(tokens, skip_special_tokens=True)):
            break
        tokens.append(next_token(tokens))
    return tokens


def teacher_forced_logp(harness, cache, first_logits: torch.Tensor, continuation: list[int],
                        start: int) -> torch.Tensor:
    """``[H + 1, vocab]`` log-probabilities: ``first_logits`` then one extend of ``continuation`` on ``cache``
    (extended in place: pass a copy)."""
    ids = torch.tensor([continuation], device=harness.device)
    logits = harness._extend(cache, torch.arange(start, start + len(continuation)), input_ids=ids)
    return torch.log_softmax(torch.cat([first_logits.float()[None], logits.float()]), dim=-1)


def make_reference(harness, full_cache, first_logits: torch.Tensor, seq_len: int, horizon: int) -> Reference:
    """The full cache's greedy continuation (``horizon`` tokens, no early stop) and its teacher-forced logits."""
    copy = harness._shallow_copy
    cont = greedy(harness, copy(full_cache), first_logits, seq_len, horizon, eos=())
    logp = teacher_forced_logp(harness, copy(full_cache), first_logits, cont, seq_len)
    return Reference(cont, logp, seq_len)


def _mean(x: torch.Tensor) -> float:
    return float(x.mean()) if x.numel() else math.nan


def score(harness, tokenizer, ref: Reference, cache, first_logits: torch.Tensor, answers: tuple[str, ...],
          max_new_tokens: int, eos: tuple[int, ...], drafted: bool = False) -> Scores:
    """Accuracy and fidelity of a method that left ``cache`` and ``first_logits`` after the prompt (not mutated).
    ``drafted``: the greedy answer by :func:`drafted_greedy` (the teacher-forced pass as its draft) instead of
    :func:`greedy`."""
    copy = harness._shallow_copy
    logp = teacher_forced_logp(harness, copy(cache), first_logits, ref.continuation, ref.seq_len)
    if drafted:
        tokens = drafted_greedy(harness, copy(cache), logp, ref.continuation, ref.seq_len, max_new_tokens, eos,
                                tokenizer, answers)
    else:
        tokens = greedy(harness, copy(cache), first_logits, ref.seq_len, max_new_tokens, eos, tokenizer, answers)
    text = tokenizer.decode([t for t in tokens if t not in eos], skip_special_tokens=True)
    agree = (logp.argmax(-1) == ref.logp.argmax(-1)).float()
    kl = (ref.logp.exp() * (ref.logp - logp)).sum(-1).clamp_min(0)
    head, tail = slice(1, 1 + LOOKAHEAD), slice(1 + LOOKAHEAD, None)
    return Scores(exact_match(answers, text), text, float(agree[0]), _mean(agree[head]), _mean(agree[tail]),
                  float(kl[0]), _mean(kl[head]), _mean(kl[tail]))


def summarise(records: list[dict], keys: tuple[str, ...] = ("mode", "method", "budget")) -> list[dict]:
    """One row per ``keys`` group: accuracy with its 95% Wilson interval and mean fidelity numbers."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    rows = []
    for group, rs in groups.items():
        k, n = sum(bool(r["correct"]) for r in rs), len(rs)
        row = dict(zip(keys, group))
        row.update(n=n, correct=k, accuracy=wilson(k, n).as_dict())
        for field in ("first_agree", "top1_1_8", "top1_9", "kl_0", "kl_1_8", "kl_9"):
            row[field] = sum(r[field] for r in rs) / n
        row["kept_mean"] = sum(sum(r["kept"]) / len(r["kept"]) for r in rs) / n
        rows.append(row)
    return rows
