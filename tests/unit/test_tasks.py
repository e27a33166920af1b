"""Task generators: seeded, sized to the token target, answers present in the prompt's facts."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sgl_evict.eval.tasks import TASKS, generate_sample, score_answer


def words(text: str) -> int:
    return len(text.split())


@pytest.mark.parametrize("task", TASKS)
def test_sample_fits_context_and_is_near_it(task):
    s = generate_sample(task, 600, words, seed=3)
    assert s.num_tokens <= 600
    assert s.num_tokens > 500  # filled, not left short
    assert s.answers and all(a in s.prompt for a in s.answers)


@pytest.mark.parametrize("task", TASKS)
def test_seeded(task):
    a, b, c = (generate_sample(task, 300, words, seed=s) for s in (1, 1, 2))
    assert a.prompt == b.prompt and a.answers == b.answers
    assert a.answers != c.answers


def test_answer_is_not_given_away_in_the_question():
    s = generate_sample("niah_single", 400, words, seed=0)
    question = s.prompt.rsplit("\n", 1)[1]
    assert s.answers[0] not in question


def test_multikey_asks_one_of_several_needles():
    s = generate_sample("niah_multikey", 400, words, seed=5)
    assert s.prompt.count("special magic numbers for") == 4
    assert s.meta["distractors"] == 3


def test_variable_tracking_chain():
    s = generate_sample("variable_tracking", 400, words, seed=1)
    names = s.answers
    for a, b in zip(names, names[1:]):
        assert f"VAR {b} = VAR {a}." in s.prompt


def test_score_answer_is_string_match_fraction():
    s = generate_sample("niah_multivalue", 300, words, seed=2)
    assert score_answer(s, " ".join(s.answers)) == 1.0
    assert score_answer(s, s.answers[0]) == pytest.approx(1 / len(s.answers))
    assert score_answer(s, "no idea") == 0.0


def test_errors_are_clear():
    with pytest.raises(ValueError, match="unknown task 'qa'"):
        generate_sample("qa", 100, words, 0)
    with pytest.raises(ValueError, match="too short"):
        generate_sample("niah_single", 5, words, 0)


def _bisect(size, budget, upper):
    lo, hi = 0, upper
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if size(mid) <= budget else (lo, mid - 1)
    return lo


@given(st.lists(st.integers(0, 9), min_size=1, max_size=400), st.integers(0, 2000), st.integers(0, 50))
@settings(max_examples=300, derandomize=True)
def test_largest_fitting_finds_what_bisection_finds(steps, budget, base):
    from sgl_evict.eval.tasks import largest_fitting

    sizes = [base]
    for s in steps:
        sizes.append(sizes[-1] + s)  # non-decreasing, with flat runs and jumps
    size = sizes.__getitem__
    upper = len(sizes) - 1
    if base > budget:
        with pytest.raises(ValueError, match="too short"):
            largest_fitting(size, budget, upper)
    else:
        assert largest_fitting(size, budget, upper) == _bisect(size, budget, upper)


def test_largest_fitting_asks_few_sizes_of_text_like_growth():
    from sgl_evict.eval.tasks import largest_fitting

    calls = []

    def size(n):
        calls.append(n)
        return 40 + 12 * n + n // 7  # a prompt's tokens with its filler sentences

    assert largest_fitting(size, 16384, 16384) == _bisect(lambda n: 40 + 12 * n + n // 7, 16384, 16384)
    assert len(calls) <= 8
