"""The quality suite's single-turn prompts, split into a context and a question for question-agnostic compression.

Every prompt is tokenized once, whole; the split is a token index into that one sequence, so the default mode (whole
prompt, then compression) and the question-agnostic mode (context, compression, then the question) feed the model
the very same tokens, only in two pieces.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sgl_evict.quality.tasks import conversations


@dataclass
class Prompt:
    """One prompt of the suite.

    Attributes:
        key: the conversation's key (family/target/seed/index).
        task: the RULER task (niah_single, ..., kv_retrieval).
        ids: ``[1, seq_len]`` the whole prompt's tokens (with BOS).
        split: ``ids[:, :split]`` is the context, ``ids[:, split:]`` the question (ending with the answer's start).
        answers: strings that must all appear in the answer.
    """

    key: str
    task: str
    ids: torch.Tensor
    split: int
    answers: tuple[str, ...]

    @property
    def seq_len(self) -> int:
        return int(self.ids.shape[1])

    @property
    def context_ids(self) -> torch.Tensor:
        return self.ids[:, : self.split]

    @property
    def question_ids(self) -> torch.Tensor:
        return self.ids[:, self.split:]


def question_start(text: str, task: str) -> int:
    """Character index where the question starts: kv_retrieval's ``\\nKey: "..."`` line, else the last newline (the
    haystacks of the other tasks hold no newline after their intro)."""
    cut = text.rfind('\nKey: "') if task == "kv_retrieval" else text.rfind("\n")
    if cut <= 0:
        raise ValueError(f"no question found in a {task} prompt")
    return cut


def split_tokens(tokenizer, text: str, cut: int) -> tuple[torch.Tensor, int]:
    """``(ids [1, seq_len], split)``: the whole text's tokens and the first token that is not the context's.

    The split is the common prefix of the whole text's tokens and the context's own tokens, so a token that merges
    across the cut (e.g. ``" \\n"``) goes to the question."""
    ids = tokenizer(text, return_tensors="pt").input_ids
    ctx = tokenizer(text[:cut], return_tensors="pt").input_ids[0]
    n = min(len(ctx), ids.shape[1])
    same = (ids[0, :n] == ctx[:n]).long()
    split = int(same.cumprod(0).sum())
    if split < 2 or split >= ids.shape[1]:
        raise ValueError(f"cannot split a prompt of {ids.shape[1]} tokens at token {split}")
    return ids, split


def build_prompts(tokenizer, target_tokens: int, seed: int, count: int,
                  shard: tuple[int, int] = (0, 1)) -> list[Prompt]:
    """``count`` single-turn prompts of at most ``target_tokens`` tokens (the tasks in turn), split.

    ``shard=(k, n)``: only prompts ``k, k + n, k + 2n, ...`` of those ``count`` (each prompt depends on the seed and
    its index alone, so the ``n`` shards together are the unsharded list)."""
    k, n = shard
    if not 0 <= k < n:
        raise ValueError(f"shard {k}/{n}: need 0 <= k < n")
    length = lambda s: len(tokenizer(s).input_ids)  # noqa: E731
    out = []
    for i in range(k, count, n):
        conv = conversations("single", target_tokens, length, seed, i)[0]
        turn = conv.turns[0]
        task = turn.meta["task"]
        ids, split = split_tokens(tokenizer, turn.question, question_start(turn.question, task))
        out.append(Prompt(conv.key, task, ids, split, tuple(turn.answers)))
    return out
