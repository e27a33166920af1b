"""sgl_evict.quality.tasks: seeded, sized on target, every answer present exactly once, turns as specified."""

import pytest

from sgl_evict.quality.tasks import ANSWER_TOKENS, FAMILIES, conversation_tokens, generate, segments


def count(text: str) -> int:
    """A stand-in tokenizer: about four characters a token."""
    return len(text) // 4 + 1


def full_text(conv) -> str:
    return "".join(segments(t, i == 0) for i, t in enumerate(conv.turns))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("target", [1024, 4096])
def test_conversations_fill_their_target_without_passing_it(family, target):
    convs = generate(family, target, count, seed=3, samples=4)
    assert len(convs) == 4
    for conv in convs:
        size = conversation_tokens(conv, count)
        assert target * 0.9 <= size <= target, (conv.key, size)


@pytest.mark.parametrize("family", FAMILIES)
def test_same_seed_same_conversations_other_seed_others(family):
    a = generate(family, 2048, count, seed=5, samples=2)
    assert a == generate(family, 2048, count, seed=5, samples=2)
    assert a != generate(family, 2048, count, seed=6, samples=2)


@pytest.mark.parametrize("family", ["doc_qa", "agent_trace", "shared_system"])
def test_every_answer_appears_exactly_once_in_the_conversation(family):
    for conv in generate(family, 2048, count, seed=1, samples=4):
        text = full_text(conv)
        for turn in conv.turns:
            for answer in turn.answers:
                assert text.count(answer) == 1, (conv.key, answer)


def test_doc_qa_asks_a_different_fact_each_turn_after_one_document():
    for conv in generate("doc_qa", 2048, count, seed=2, samples=3, turns=5):
        assert len(conv.turns) == 5 and conv.turns[0].text and not any(t.text for t in conv.turns[1:])
        assert sorted(t.meta["fact"] for t in conv.turns) == list(range(5))
        assert all(t.question.rstrip().endswith(tuple("abcdefghijklmnopqrstuvwxyz")) for t in conv.turns)


def test_agent_trace_asks_one_to_five_outputs_back_and_each_turn_adds_an_output():
    for conv in generate("agent_trace", 4096, count, seed=2, samples=4, turns=8):
        assert len(conv.turns) == 8 and all("[output" in t.text for t in conv.turns)
        distances = [t.meta["distance"] for t in conv.turns]
        assert all(1 <= d <= 5 for d in distances)
        for k, turn in enumerate(conv.turns):
            # the asked output was added at this turn or before
            assert f"[output {turn.meta['asked_output']}]" in "".join(t.text for t in conv.turns[:k + 1])
            assert turn.meta["asked_output"] <= k + 1


def test_shared_system_groups_share_their_prompt_and_ask_each_fact_once():
    convs = generate("shared_system", 2048, count, seed=4, samples=6, group_size=3)
    assert len(convs) == 6 and [c.group for c in convs] == [0, 0, 0, 1, 1, 1]
    for g in (0, 1):
        group = [c for c in convs if c.group == g]
        assert len({c.turns[0].text for c in group}) == 1
        assert [c.turns[0].meta["order"] for c in group] == [0, 1, 2]
        assert len({c.turns[0].answers for c in group}) == 3
    assert convs[0].turns[0].text != convs[3].turns[0].text


def test_single_turn_cycles_through_the_ruler_tasks():
    tasks = [c.turns[0].meta["task"] for c in generate("single", 1024, count, seed=0, samples=5)]
    assert len(set(tasks)) == 5


def test_bad_requests_are_clear_errors():
    with pytest.raises(ValueError, match="unknown task family 'nope'"):
        generate("nope", 1024, count, 0, 1)
    with pytest.raises(ValueError, match="too short"):
        generate("doc_qa", 200, count, 0, 1)
    with pytest.raises(ValueError, match="at least 1"):
        generate("doc_qa", 1024, count, 0, 0)


def test_sizing_reserves_room_for_every_earlier_answer():
    conv = generate("doc_qa", 2048, count, seed=0, samples=1, turns=4)[0]
    bare = sum(count(segments(t, i == 0)) for i, t in enumerate(conv.turns))
    assert conversation_tokens(conv, count) == bare + 3 * ANSWER_TOKENS
