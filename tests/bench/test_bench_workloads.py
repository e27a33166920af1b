"""bench/workloads.py: seeded, deterministic, lengths within bounds, histories that grow by prompt + reply."""


from bench.workloads import Turn, agent_session, agent_sessions, long_context_requests, next_prompt

VOCAB = (100, 5000)


def _agent(n=5, seed=0, **kw):
    return list(agent_sessions(n, 4, seed, vocab=VOCAB, **kw))


def test_agent_sessions_are_deterministic_for_a_seed():
    a, b = _agent(seed=3), _agent(seed=3)
    assert a == b
    assert _agent(seed=4) != a


def test_a_session_does_not_depend_on_how_many_are_generated():
    assert _agent(n=2)[1] == _agent(n=5)[1] == agent_session(1, 4, 0, vocab=VOCAB)


def test_agent_lengths_within_bounds():
    sessions = _agent(n=20, system_tokens=50)
    for s in sessions:
        assert len(s.turns) == 4
        for i, t in enumerate(s.turns):
            extra = 50 if i == 0 else 0
            assert 1024 + 20 + extra <= len(t.new_tokens) <= 8192 + 60 + extra
            assert 50 <= t.max_new_tokens <= 300
            assert all(VOCAB[0] <= x < VOCAB[1] for x in t.new_tokens)
    # the ranges are used, not a single value
    assert len({len(t.new_tokens) for s in sessions for t in s.turns[1:]}) > 30
    assert len({t.max_new_tokens for s in sessions for t in s.turns}) > 20


def test_system_prompt_is_shared_and_sessions_differ():
    sessions = _agent(n=3, system_tokens=64)
    firsts = [s.turns[0].new_tokens for s in sessions]
    assert firsts[0][:64] == firsts[1][:64] == firsts[2][:64]
    assert firsts[0][64:200] != firsts[1][64:200]


def test_custom_ranges():
    s = agent_session(0, 3, 0, tool_tokens=(10, 10), instruction_tokens=(2, 2), reply_tokens=(7, 7),
                      system_tokens=0, vocab=VOCAB)
    assert [len(t.new_tokens) for t in s.turns] == [12, 12, 12]
    assert [t.max_new_tokens for t in s.turns] == [7, 7, 7]


def test_next_prompt_starts_with_previous_prompt_and_reply():
    previous, reply = [1, 2, 3], [9, 8]
    turn = Turn([5, 6], 4)
    assert next_prompt(previous, reply, turn) == [1, 2, 3, 9, 8, 5, 6]
    assert next_prompt([], [], turn) == [5, 6]


def test_long_context_requests_bounds_and_determinism():
    a = list(long_context_requests(6, seed=1, vocab=VOCAB))
    assert a == list(long_context_requests(6, seed=1, vocab=VOCAB))
    assert a != list(long_context_requests(6, seed=2, vocab=VOCAB))
    for s in a:
        assert len(s.turns) == 1
        assert 8192 <= len(s.turns[0].new_tokens) <= 65536
        assert 16 <= s.turns[0].max_new_tokens <= 32
    small = list(long_context_requests(3, seed=1, prompt_tokens=(100, 200), answer_tokens=(4, 4), vocab=VOCAB))
    assert all(100 <= len(s.turns[0].new_tokens) <= 200 and s.turns[0].max_new_tokens == 4 for s in small)


def test_a_range_flag_is_two_integers_or_an_error_naming_the_flag():
    import pytest

    from bench.workloads import int_range
    assert int_range("6,30", "--turns") == (6, 30)
    for bad in ("6", "6,30,40", "a,b", ""):
        with pytest.raises(ValueError, match="--turns: LOW,HIGH"):
            int_range(bad, "--turns")
