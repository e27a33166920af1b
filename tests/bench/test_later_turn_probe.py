"""bench/later_turn_probe.py: the summary's counts, the stop tokens, the conversation loop on a fake harness."""

import pytest
import torch
from tiny_models import CharTokenizer

from bench import later_turn_probe as probe
from sgl_evict.quality.runner import Tokens
from sgl_evict.quality.tasks import Conversation, Turn


def _rows(table: dict[str, list[bool]]) -> list[dict]:
    """``{arm: [correct per (conversation 0, turn k)]}`` -> rows."""
    return [{"conv": 0, "turn": k, "arm": arm, "correct": c} for arm, cs in table.items() for k, c in enumerate(cs)]


def test_summary_counts_first_and_later_turns_retention_and_pairs():
    rows = _rows({"full": [True, True, True, False], "snapkv/uniform": [True, True, True, True],
                  "snapkv/per_layer": [True, False, False, True]})
    s = probe.summarize(rows, ["snapkv/uniform", "snapkv/per_layer"])
    assert s["arms"]["full/later"]["accuracy"]["k"] == 2 and s["arms"]["full/later"]["accuracy"]["n"] == 3
    per_layer = s["arms"]["snapkv/per_layer/later"]
    assert per_layer["accuracy"]["k"] == 1 and per_layer["retention"]["k"] == 0 and per_layer["retention"]["n"] == 2
    assert s["paired_later"]["snapkv"] == {"n": 3, "only_uniform": 2, "only_per_layer": 0, "mcnemar_p": 0.5}
    assert "snapkv/per_layer | 1/1" in probe.table(s)




def test_newline_tokens_are_the_ids_whose_text_holds_a_new_line():
    assert probe.newline_tokens(Tokens(CharTokenizer(128))) == frozenset({ord("\n")})


class _Harness:
    """Answers 'X' under the full cache and 'Y' under any compressed one; records the extend positions."""

    device = torch.device("cpu")

    def __init__(self):
        self.extends = []

    def prefill(self, ids):
        return type("State", (), {"cache": ["full"], "last_logits": torch.tensor([0.0] * 88 + [1.0])})

    def _shallow_copy(self, cache):
        return list(cache)

    def _run_cache(self, state, policy, budget, granularity):
        return [granularity], None, None

    def _greedy(self, cache, first, start, steps, stop):
        return [ord("X") if cache[0] == "full" else ord("Y"), ord("\n")]

    def _extend(self, cache, positions, input_ids):
        self.extends.append((cache[0], int(positions[0]), input_ids[0].tolist()))
        cache.append("more")
        return torch.zeros(len(positions), 128)


def test_every_arm_gets_the_full_caches_answer_and_the_next_question_at_logical_positions():
    conv = Conversation("doc_qa", 64, 0, 0, (Turn("doc ", "q1?", ("X",)), Turn("", "q2?", ("Y",))))
    harness = _Harness()
    rows = probe.ask_conversation(harness, Tokens(CharTokenizer(128)), conv, {"a/uniform": (None, None, "uniform")}, 8)
    assert [(r["turn"], r["arm"], r["correct"]) for r in rows] == [
        (0, "full", True), (0, "a/uniform", False), (1, "full", False), (1, "a/uniform", True)]
    first_len = 1 + len("doc q1?")
    new = [ord("X")] + [ord(c) for c in "\nq2?"]
    assert harness.extends == [("full", first_len, new), ("uniform", first_len, new)]


@pytest.mark.parametrize("flags, text", [(["--samples", "0"], "--samples"), (["--budget", "1.5"], "--budget")])
def test_bad_flags_are_refused_before_the_model_loads(flags, text):
    with pytest.raises(SystemExit) as err:
        probe.main(flags)
    assert text in str(err.value)
