"""bench/peers/kvpress/metrics.py's drafted greedy answers (run.py --greedy draft): the same tokens as decoding
step by step, with fewer decode steps. A toy harness whose logits depend only on (token, position), so both ways
compute exactly the same numbers."""

import pytest
import torch

from bench.peers.kvpress.metrics import drafted_greedy, greedy, teacher_forced_logp

VOCAB, POSITIONS, START = 13, 128, 40


class ToyHarness:
    """``_extend`` appends tokens to a list (the cache) and returns one logits row per token, looked up from a
    random ``[vocab, positions, vocab]`` table by (token, position); counts its calls."""

    device = "cpu"

    def __init__(self, seed: int):
        self.table = torch.randn(VOCAB, POSITIONS, VOCAB, generator=torch.Generator().manual_seed(seed))
        self.calls = 0

    def _extend(self, cache, positions, input_ids):
        self.calls += 1
        tokens = input_ids[0].tolist()
        cache.extend(tokens)
        return torch.stack([self.table[t, int(p)] for t, p in zip(tokens, positions.tolist())])

    @staticmethod
    def _shallow_copy(cache):
        return list(cache)


class DigitTokenizer:
    @staticmethod
    def decode(tokens, skip_special_tokens=True):
        return " ".join(str(t) for t in tokens)


def _both(harness, first, draft, max_new, eos=(), answers=()):
    step = greedy(harness, [], first, START, max_new, eos, DigitTokenizer, answers)
    logp = teacher_forced_logp(harness, [], first, draft, START)
    harness.calls = 0
    drafted = drafted_greedy(harness, [], logp, draft, START, max_new, eos, DigitTokenizer, answers)
    return step, drafted, harness.calls


@pytest.mark.parametrize("seed", range(6))
def test_drafted_answers_equal_step_by_step_ones_on_and_off_the_draft(seed):
    harness = ToyHarness(seed)
    first = torch.randn(VOCAB, generator=torch.Generator().manual_seed(100 + seed))
    own = greedy(harness, [], first, START, 64, ())  # the method's own greedy continuation
    # a draft it follows to the end: no decode step at all
    step, drafted, calls = _both(harness, first, own, 32)
    assert drafted == step and len(step) == 32 and calls == 0
    # a draft that leaves it at token k: one extend for the agreed tokens, then steps
    for k in (0, 1, 5, 20):
        draft = list(own)
        draft[k] = (own[k] + 1) % VOCAB
        step, drafted, calls = _both(harness, first, draft, 32)
        assert drafted == step
        assert calls == (32 - k - 1) + (1 if k >= 1 else 0)  # the steps after k, and one extend before them
    # a draft shorter than the answer: off its end, decoding goes on
    step, drafted, _ = _both(harness, first, own[:10], 32)
    assert drafted == step


def test_drafted_answers_stop_where_step_by_step_ones_stop():
    harness = ToyHarness(7)
    first = torch.randn(VOCAB, generator=torch.Generator().manual_seed(7))
    own = greedy(harness, [], first, START, 64, ())
    eos = (own[6],)  # an EOS token the answer meets at step 6 (or earlier, if it appears before)
    step, drafted, _ = _both(harness, first, own, 32, eos=eos)
    assert drafted == step and step[-1] == own[6]
    answers = (f"{own[2]} {own[3]}",)  # met as soon as tokens 2 and 3 are out
    step, drafted, _ = _both(harness, first, own, 32, answers=answers)
    assert drafted == step and len(step) <= 5
    off = list(own)
    off[1] = (own[1] + 1) % VOCAB
    step, drafted, _ = _both(harness, first, off, 3)  # max_new_tokens reached off the draft
    assert drafted == step and len(step) == 3
