"""bench/agentic_trace.py: the open-loop agent mix as SGLang's agentic-trace JSON (shape, seeds, groups, the context
cut, token arithmetic; exact counts against the Gemma 3 tokenizer when it is cached here). SGLang's own loader and
chat template read it in tests/sglang/test_bench_serving_client.py."""

import json
import random
from pathlib import Path

import pytest

from bench import agentic_trace as at
from bench.workloads import AgentMix

SMALL = AgentMix(system_tokens=(30, 60), group_size=3, turns=(2, 5), tool_tokens=(10, 40), instruction_tokens=(3, 8))
GEMMA = Path.home() / ".cache" / "sgl-evict" / "gemma3-270m-hf"


def test_the_shape_sglang_reads():
    doc = at.build_trace(5, seed=1, mix=SMALL)
    assert set(doc) == {"metadata", "conversations"} and len(doc["conversations"]) == 5
    for conv in doc["conversations"]:
        assert 2 <= len(conv) <= 5
        first, *later = conv
        assert [m["role"] for m in first["messages"]] == ["system", "user"]
        for turn in later:  # one user message a turn: roles alternate with the replayed answers
            assert [m["role"] for m in turn["messages"]] == ["user"]
        for turn in conv:
            assert all(set(m) == {"role", "content"} and m["content"] for m in turn["messages"])
            assert isinstance(turn["prompt_tokens"], int)
    json.dumps(doc)  # plain JSON


def test_seeded_per_conversation_and_system_prompts_shared_per_group():
    a = at.build_trace(6, seed=2, mix=SMALL)["conversations"]
    assert a == at.build_trace(6, seed=2, mix=SMALL)["conversations"]
    assert a != at.build_trace(6, seed=3, mix=SMALL)["conversations"]
    assert a[:4] == at.build_trace(4, seed=2, mix=SMALL)["conversations"]  # independent of how many are written

    def system(c):
        return c[0]["messages"][0]["content"]
    assert system(a[0]) == system(a[1]) == system(a[2]) != system(a[3]) == system(a[4]) == system(a[5])
    assert a[0][0]["messages"][1]["content"] != a[1][0]["messages"][1]["content"]


def test_prompt_tokens_add_up_turn_by_turn():
    doc = at.build_trace(4, seed=0, mix=SMALL, reply_tokens=17)
    for conv in doc["conversations"]:
        system = conv[0]["messages"][0]["content"]
        sys_tokens = _words_and_lines(system)
        first = conv[0]
        assert first["prompt_tokens"] == (at.BOS_TOKENS + at.OPEN_TOKENS + sys_tokens + first["new_tokens"]
                                          + at.CLOSE_TOKENS + at.OPEN_TOKENS)
        for prev, turn in zip(conv, conv[1:]):
            assert turn["prompt_tokens"] == (prev["prompt_tokens"] + 17 + at.CLOSE_TOKENS + at.OPEN_TOKENS
                                             + turn["new_tokens"] + at.CLOSE_TOKENS + at.OPEN_TOKENS)


def _words_and_lines(text: str) -> int:
    """The tokens the module counts for its own text: a word each, a newline each, 6 around each JSON line."""
    return len(text.replace('{"out": "', " ").replace('"}', " ").split()) + text.count("\n") \
        + 5 * text.count('{"out": "')


@pytest.mark.parametrize("tokens", [1, 2, 3, 7, 13, 14, 15, 26, 100, 777])
def test_texts_are_cut_to_their_token_counts_by_construction(tokens):
    rng = random.Random(tokens)
    plain, js = at.plain_text(rng, tokens), at.json_text(rng, tokens)
    assert _words_and_lines(plain) == tokens and _words_and_lines(js) == tokens
    assert all(w in at.WORDS for w in plain.split())
    if tokens >= 7:
        assert all(json.loads(line)["out"] for line in js.splitlines())
    assert at.plain_text(rng, 0) == ""


def test_the_context_cut():
    mix = AgentMix(system_tokens=(2048, 8192), group_size=8, turns=(6, 30), tool_tokens=(512, 8192))
    doc = at.build_trace(12, seed=0, mix=mix, reply_tokens=128, max_context=30000)
    meta = doc["metadata"]
    for conv in doc["conversations"]:
        assert conv[-1]["prompt_tokens"] + 128 <= 30000
        assert all(a["prompt_tokens"] < b["prompt_tokens"] for a, b in zip(conv, conv[1:]))
    assert meta["turns_kept"] == sum(len(c) for c in doc["conversations"]) < meta["turns_drawn"]
    uncut = at.build_trace(12, seed=0, mix=mix, reply_tokens=128)
    assert all(6 <= len(c) <= 30 for c in uncut["conversations"])
    # the cut keeps a prefix of the same conversation
    assert all(c == u[:len(c)] for c, u in zip(doc["conversations"], uncut["conversations"]))
    with pytest.raises(ValueError, match="max_context"):
        at.build_trace(2, seed=0, mix=mix, max_context=1000)


def test_cli_writes_the_trace_and_names_bad_flags(tmp_path, capsys):
    out = tmp_path / "t.json"
    assert at.main(["--conversations", "3", "--seed", "4", "--turns", "2,3", "--tool-tokens", "10,20",
                    "--system-tokens", "20,30", "--max-context", "5000", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert len(doc["conversations"]) == 3 and doc["metadata"]["seed"] == 4
    assert "--conversations 3" in doc["metadata"]["command"]
    assert json.loads(capsys.readouterr().out)["conversations"] == 3
    with pytest.raises(SystemExit, match="--turns"):
        at.main(["--turns", "5", "--out", str(out)])
    with pytest.raises(SystemExit, match="turns"):
        at.main(["--turns", "0,3", "--out", str(out)])


@pytest.mark.skipif(not (GEMMA / "tokenizer.json").exists(), reason="no Gemma 3 tokenizer cached here")
def test_token_counts_are_exact_for_the_gemma_tokenizer():
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(GEMMA)

    def n(text):
        return len(tok(text, add_special_tokens=False)["input_ids"])
    assert all(n(w) == 1 and n(" " + w) == 1 for w in at.WORDS)
    rng = random.Random(0)
    for tokens in (1, 2, 13, 14, 500, 4096):
        assert n(at.plain_text(rng, tokens)) == tokens and n(at.json_text(rng, tokens)) == tokens
    conv = at.build_trace(2, seed=0, mix=SMALL)["conversations"][1]
    for turn in conv:
        assert n(turn["messages"][-1]["content"]) == turn["new_tokens"]
    assert n(conv[0]["messages"][0]["content"]) == len(at.SYSTEM_HEADER.split()) + 1 + _words_and_lines(
        conv[0]["messages"][0]["content"][len(at.SYSTEM_HEADER):])
