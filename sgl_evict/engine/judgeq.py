"""Judge Q inside the server: the soft tokens' queries, from one extra extend forward after a batch's prefill.

The soft tokens (``sgl_evict.soft_tokens``) are fed after each judged request's prompt, at positions
``seq_len .. seq_len + k - 1``, as the harness's judgeq does; their post-RoPE queries at every full-attention layer
score the prompt's keys, each query seeing every prompt key (:func:`sgl_evict.engine.keep.lookahead_scores`).

Their KV needs a place during that forward only: :func:`soft_token_queries` writes ``k`` temporary slots per request
after its prompt in its ``req_to_token`` row, runs the forward, and then puts the row back and frees the slots. So
the soft tokens are never in the radix tree (the tree inserts the request's first ``seq_len`` entries, which never
change), never in the request's length (the forward is a batch of its own; the prefill batch's ``seq_lens`` are not
touched), and the prefill's logits and sampled token, computed before, are not affected.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from sgl_evict.engine.capture import WindowQueryCapture
from sgl_evict.soft_tokens import SoftTokens

logger = logging.getLogger("sgl_evict")

FLAG = "--kv-evict-soft-tokens"


@dataclass
class ServedSoftTokens:
    """The soft tokens a server feeds: ``embeddings [k, hidden_size]`` in the model's dtype, on its device."""

    embeddings: torch.Tensor
    path: str

    @property
    def count(self) -> int:
        return self.embeddings.shape[0]


def load_served_soft_tokens(path: str, model_fingerprint: str, hidden_size: int, dtype: torch.dtype,
                            device: torch.device | str) -> ServedSoftTokens:
    """Loads the server's soft-token file for the served model.

    Raises:
        ValueError whose message names the flag and the file: the file is missing or not a soft-token file, was
        trained for another model (fingerprint), or its vectors are not ``[k >= 1, hidden_size]``.
    """
    try:
        soft = SoftTokens.load(path, expect_fingerprint=model_fingerprint)
    except (OSError, ValueError) as err:
        raise ValueError(f"{FLAG} {path}: {err}") from None
    shape = tuple(soft.embeddings.shape)
    if len(shape) != 2 or shape[0] < 1 or shape[1] != hidden_size:
        raise ValueError(f"{FLAG} {path}: soft tokens must be [k >= 1, hidden_size={hidden_size}], got {list(shape)}")
    return ServedSoftTokens(soft.embeddings.to(device=device, dtype=dtype), str(Path(path)))


@dataclass
class SoftTokenExtend:
    """One extra extend forward: ``k`` soft tokens after the prompt of each judged request of a prefill batch.

    Attributes:
        batch_indices: each judged request's index in the prefill batch.
        req_pool_indices: ``[n]`` int64 their ``req_to_token`` rows.
        prompt_lens: their prompt lengths (the prefix each extends; the soft tokens' first position).
        out_cache_loc: ``[n * k]`` int64 the temporary slots the soft tokens' KV is written to, request-major.
        input_embeds: ``[n * k, hidden_size]`` the soft tokens, repeated per request.
    """

    batch_indices: list[int]
    req_pool_indices: torch.Tensor
    prompt_lens: list[int]
    out_cache_loc: torch.Tensor
    input_embeds: torch.Tensor

    @property
    def tokens_per_request(self) -> int:
        return self.input_embeds.shape[0] // len(self.prompt_lens)


@dataclass
class SoftTokenQueries:
    """What the extra forward captured: per judged request, layer id -> ``[num_q_heads, k, head_dim]`` queries."""

    queries: list[dict[int, torch.Tensor]]
    scaling: dict[int, float]


def soft_token_queries(judged: list[tuple[int, int, int]], soft: ServedSoftTokens, req_to_token: torch.Tensor,
                       alloc: Callable[[int], torch.Tensor | None], free: Callable[[torch.Tensor], None], state,
                       run_extend: Callable[[SoftTokenExtend], None]) -> SoftTokenQueries | None:
    """Runs the soft tokens after the prompts of ``judged`` requests and returns their queries.

    Args:
        judged: ``(batch index, req_to_token row, prompt length)`` of each request to judge.
        req_to_token: SGLang's ``ReqToTokenPool.req_to_token`` ``[rows, max_context_len]``; each judged row's
            entries ``prompt_len .. prompt_len + k - 1`` hold the temporary slots during the forward and are put
            back afterwards.
        alloc: ``n`` -> ``[n]`` free slots, or None when the pool has not that many
            (``TokenToKVPoolAllocator.alloc``, page size 1).
        free: hands the temporary slots back.
        state: the process's :class:`sgl_evict.engine.runtime.EngineState`; its ``capture`` is swapped for one of
            ``k`` rows per request during the forward (the model runner and attention hooks fill it).
        run_extend: runs the model on a :class:`SoftTokenExtend` (logits discarded).

    Returns:
        the queries in ``judged`` order, or None (logged) when the pool has no room for the temporary slots or
        the forward captured nothing; those requests then keep their full cache.
    """
    k = soft.count
    slots = alloc(len(judged) * k)
    if slots is None:
        logger.warning("sgl-evict: no room for %d soft-token slots: %d judgeq request(s) keep their full cache",
                       len(judged) * k, len(judged))
        return None
    rows = torch.tensor([row for _, row, _ in judged], dtype=torch.int64, device=req_to_token.device)
    slots = slots.to(device=req_to_token.device, dtype=torch.int64)
    saved = [req_to_token[row, n:n + k].clone() for _, row, n in judged]
    for j, (_, row, n) in enumerate(judged):
        req_to_token[row, n:n + k] = slots[j * k:(j + 1) * k].to(req_to_token.dtype)
    capture, prefill_capture = WindowQueryCapture(k), state.capture
    state.capture = capture
    try:
        run_extend(SoftTokenExtend([i for i, _, _ in judged], rows, [n for _, _, n in judged], slots,
                                   soft.embeddings.repeat(len(judged), 1)))
    finally:
        state.capture = prefill_capture
        for (_, row, n), entries in zip(judged, saved):
            req_to_token[row, n:n + k] = entries
        free(slots)
    if len(capture.num_queries) != len(judged) or not capture.queries:
        logger.warning("sgl-evict: the soft-token forward captured no queries: %d judgeq request(s) keep their "
                       "full cache", len(judged))
        return None
    # copies: a view would keep the whole forward's queries alive
    return SoftTokenQueries([{layer: q.clone() for layer, q in capture.queries_of(j).items()}
                             for j in range(len(judged))], dict(capture.scaling))
