"""Training Judge Q soft tokens: learned queries whose attention over a prompt matches the answer's.

Judge Q (Liu et al., "Judge Q: Trainable Queries for Optimized Information Retention in KV Cache Eviction",
arXiv:2509.10798) appends a list of soft tokens after the prompt and trains only their embeddings, with the
model frozen, so that their attention map over the prompt aligns with that of the actually decoded tokens; at
inference their queries score the prompt's KV for eviction (policy ``judgeq``). The paper's exact loss was not
retrievable here, so this module uses a KL divergence between the two attention maps:

- **target** ``T [layers, kv_heads, n]``: per compressible (full-attention) layer and KV head, the mean attention
  of the answer tokens' queries over the ``n`` context keys, renormalised over the context (a softmax restricted
  to the context keys), query heads averaged over their GQA group. Computed once per example under no grad from
  a teacher-forced pass of context + answer; the answer is the task's reference answer or the model's own greedy
  continuation.
- **prediction** ``P [layers, kv_heads, n]``: the same quantity for the ``k`` soft tokens run after the context
  at logical positions ``n .. n + k - 1``, exactly as the harness runs them for the ``judgeq`` policy.
- **loss**: ``KL(T || P)`` summed over context keys, averaged over layers and KV heads.

Both maps come from :func:`sgl_evict.scoring.score_queries` (the policy's own scoring, without pooling) on the
queries that the harness's attention capture records, so training and scoring see the same numbers.
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import asdict, dataclass, field

import torch

from sgl_evict.eval.tasks import TASKS, TaskSample, generate_sample
from sgl_evict.harness import EvictionHarness, PrefillState
from sgl_evict.policies import make_policy
from sgl_evict.scoring import score_queries
from sgl_evict.selection import Budget
from sgl_evict.soft_tokens import SoftTokens

ANSWER_SOURCES = ("task", "greedy")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# training samples draw seeds from here on; `sgl-evict eval --seed S` uses S * 100_003 + i, far below it
TRAIN_SEED_BASE = 1_000_000_007


@dataclass
class TrainConfig:
    """What one training run covers.

    Attributes:
        tasks: RULER-style generators the training contexts come from (:data:`TASKS`).
        context_tokens: training prompt length in tokens.
        examples: number of distinct training contexts (cycled through by the steps).
        steps: optimiser steps, one example each (batch size 1).
        soft_tokens: ``k``, the number of soft tokens.
        lr: Adam learning rate, in the units of the model's (post-scaling) residual stream.
        answer: ``"task"`` (the generator's reference answer) or ``"greedy"`` (the model's own continuation).
        answer_tokens: at most this many answer tokens make the target.
        seed: seeds the sample generators, the initial soft tokens and the example order.
        dtype: model dtype, ``"float32"`` or ``"bfloat16"``; the soft tokens and the loss stay float32.
    """

    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    context_tokens: int = 1024
    examples: int = 32
    steps: int = 200
    soft_tokens: int = 16
    lr: float = 1e-2
    answer: str = "task"
    answer_tokens: int = 32
    seed: int = 0
    dtype: str = "float32"

    def validate(self) -> None:
        """Fails with a message naming the bad setting, before any model work starts."""
        for t in self.tasks:
            if t not in TASKS:
                raise ValueError(f"unknown task {t!r}; choose from: {', '.join(TASKS)}")
        if not self.tasks:
            raise ValueError("at least one task is needed")
        for name, value in (("context tokens", self.context_tokens), ("examples", self.examples),
                            ("steps", self.steps), ("soft tokens", self.soft_tokens),
                            ("answer tokens", self.answer_tokens)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not self.lr > 0:
            raise ValueError(f"learning rate must be > 0, got {self.lr}")
        if self.answer not in ANSWER_SOURCES:
            raise ValueError(f"answer must be one of {', '.join(ANSWER_SOURCES)}, got {self.answer!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")

    def sample_seeds(self) -> list[int]:
        """Generator seeds of the training samples: disjoint from the seeds `sgl-evict eval` uses."""
        return [TRAIN_SEED_BASE + self.seed * 100_003 + i for i in range(self.examples)]


@dataclass
class TrainingExample:
    """One training context and the attention its answer pays to it.

    Attributes:
        cache: the context's KV (``n`` tokens), holding ordinary tensors so that autograd may save them.
        target: ``[num_compressible_layers, num_kv_heads, n]`` float32, each row a distribution over the context.
    """

    cache: object
    target: torch.Tensor

    @property
    def seq_len(self) -> int:
        return self.target.shape[-1]


@dataclass
class TrainResult:
    """Trained soft tokens and how the loss moved.

    Attributes:
        embeddings: ``[k, hidden_size]`` float32 trained soft tokens (post-scaling residual-stream inputs).
        losses: loss of each step, on that step's example, before its update.
        initial_loss, final_loss: mean loss over all examples before and after training.
    """

    embeddings: torch.Tensor
    losses: list[float]
    initial_loss: float
    final_loss: float


def freeze(model) -> None:
    """No model parameter takes gradients: only the soft tokens train."""
    for p in model.parameters():
        p.requires_grad_(False)


def _autograd_copy(cache):
    """A copy of an inference-mode cache: inference tensors cannot be saved for backward, clones can.

    Must run outside ``torch.inference_mode``.
    """
    new = EvictionHarness._shallow_copy(cache)
    for layer in new.layers:
        layer.keys, layer.values = layer.keys.clone(), layer.values.clone()
    return new


def _mean_attention(harness: EvictionHarness, queries: dict[int, torch.Tensor], cache) -> torch.Tensor:
    """Mean attention of ``queries`` (layer -> ``[num_q_heads, m, d]``) over ``cache``'s context keys.

    Returns ``[num_compressible_layers, num_kv_heads, n]`` float32; each row sums to 1 over the ``n`` keys.
    The policy's scoring without pooling: what ``judgeq`` scores with, before smoothing.
    """
    rows = []
    for layer in harness.layers:
        keys = cache.layers[layer].keys[0]  # [kv_heads, n, d]
        rows.append(score_queries(queries[layer], keys, float(harness.attn[layer].scaling), pooling_kernel=1,
                                  gqa_reduce="mean", logit_softcap=harness.softcap))
    return torch.stack(rows)


def build_example(harness: EvictionHarness, state: PrefillState, answer_ids: list[int]) -> TrainingExample:
    """Context KV and target attention for the prefilled context ``state`` answered by ``answer_ids``.

    Teacher-forced: the target queries are those of the fed answer tokens at positions ``n .. n + m - 1``; in
    decoding, these are the queries that read the (evicted) cache.
    """
    if not answer_ids:
        raise ValueError("the answer must have at least one token")
    with torch.inference_mode():
        harness.ctx.queries = {}
        positions = torch.arange(state.seq_len, state.seq_len + len(answer_ids))
        ids = torch.tensor([answer_ids], device=harness.device)
        harness._extend(harness._shallow_copy(state.cache), positions, input_ids=ids, record=True)
        target = _mean_attention(harness, harness.ctx.take(), state.cache)
    return TrainingExample(_autograd_copy(state.cache), target.clone())


def soft_token_attention(harness: EvictionHarness, example: TrainingExample, soft: torch.Tensor) -> torch.Tensor:
    """Mean attention of soft tokens ``soft [k, hidden_size]`` (float32) over the example's context.

    Runs them after the context at logical positions ``n .. n + k - 1`` on a throw-away copy of its cache, like
    the harness's ``judgeq`` pass, but through the decoder only (no LM head: no logits are needed).
    Differentiable in ``soft``. Returns ``[num_compressible_layers, num_kv_heads, n]``.
    """
    embeds = soft.to(harness.model.get_input_embeddings().weight.dtype)[None]
    positions = torch.arange(example.seq_len, example.seq_len + soft.shape[0], device=harness.device)[None]
    ctx = harness.ctx
    ctx.mode, ctx.record, ctx.queries = "extend", True, {}
    try:
        decoder = harness.model.get_decoder()
        decoder(inputs_embeds=embeds, **{harness.cache_kwarg(decoder): harness._shallow_copy(example.cache)},
                position_ids=positions, use_cache=True)
    finally:
        ctx.record = False
    return _mean_attention(harness, ctx.take(), example.cache)


def attention_kl(target: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
    """``KL(target || predicted)`` over the last axis, averaged over the others: a scalar.

    ``target`` and ``predicted`` are ``[..., n]`` distributions; terms where the target is 0 contribute 0.
    """
    # the floor only guards log(0) where the softmax underflowed; it is far below any trained attention value
    log_ratio = torch.special.xlogy(target, target) - target * predicted.clamp_min(1e-30).log()
    return log_ratio.sum(-1).mean()


def example_loss(harness: EvictionHarness, example: TrainingExample, soft: torch.Tensor) -> torch.Tensor:
    """The training loss of ``soft`` on one example (a differentiable scalar)."""
    return attention_kl(example.target, soft_token_attention(harness, example, soft))


def mean_loss(harness: EvictionHarness, examples: list[TrainingExample], soft: torch.Tensor) -> float:
    """Mean loss of ``soft`` over ``examples``, without gradients."""
    with torch.no_grad():
        return sum(example_loss(harness, ex, soft).item() for ex in examples) / len(examples)


def initial_soft_tokens(model, k: int, seed: int) -> torch.Tensor:
    """``[k, hidden_size]`` float32: the embeddings of ``k`` seeded random vocabulary tokens.

    Taken through the embedding module, so they start in the post-scaling space the soft tokens live in (Gemma
    multiplies its embeddings by ``sqrt(hidden_size)``) with the scale of real tokens.
    """
    embed = model.get_input_embeddings()
    ids = torch.randint(0, embed.weight.shape[0], (k,), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return embed(ids.to(embed.weight.device)).float().clone()


def train_soft_tokens(harness: EvictionHarness, examples: list[TrainingExample], init: torch.Tensor, steps: int,
                      lr: float, seed: int = 0, progress: bool = False) -> TrainResult:
    """Adam on the soft tokens only, one example per step, in a seeded shuffled order.

    ``init [k, hidden_size]`` is not modified. The model must be frozen (:func:`freeze`).
    """
    from tqdm.auto import tqdm

    soft = init.detach().float().clone().to(harness.device).requires_grad_(True)
    optimizer = torch.optim.Adam([soft], lr=lr)
    initial = mean_loss(harness, examples, soft)
    order_rng = random.Random(seed)
    order: list[int] = []
    losses = []
    bar = tqdm(range(steps), desc="train-judgeq", unit="step", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    for _ in bar:
        if not order:
            order = list(range(len(examples)))
            order_rng.shuffle(order)
        loss = example_loss(harness, examples[order.pop()], soft)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    bar.close()
    final = mean_loss(harness, examples, soft)
    return TrainResult(soft.detach().cpu(), losses, initial, final)


def answer_ids(harness: EvictionHarness, tokenizer, sample: TaskSample, state: PrefillState, source: str,
               max_tokens: int) -> list[int]:
    """The answer that makes the target: the task's reference answer, or the model's greedy continuation."""
    if source == "greedy":
        eos = (tokenizer.eos_token_id,) if isinstance(tokenizer.eos_token_id, int) else ()
        return harness.generate(state, make_policy("none"), Budget(fraction=1.0), max_new_tokens=max_tokens,
                                eos_token_ids=eos).tokens
    # prompts end with the answer's lead-in; kv_retrieval's ends inside an opening quote, the others before a space
    text = ("" if sample.prompt.endswith('"') else " ") + ", ".join(sample.answers)
    return tokenizer(text, add_special_tokens=False).input_ids[:max_tokens]


def make_examples(harness: EvictionHarness, tokenizer, config: TrainConfig,
                  progress: bool = False) -> list[TrainingExample]:
    """``config.examples`` training examples, tasks taken in turn, seeds from :meth:`TrainConfig.sample_seeds`."""
    from tqdm.auto import tqdm

    count = lambda text: len(tokenizer(text).input_ids)  # noqa: E731
    examples = []
    for i, seed in enumerate(tqdm(config.sample_seeds(), desc="targets", unit="example", disable=not progress,
                                  file=sys.stderr, dynamic_ncols=True)):
        sample = generate_sample(config.tasks[i % len(config.tasks)], config.context_tokens, count, seed)
        state = harness.prefill(tokenizer(sample.prompt, return_tensors="pt").input_ids)
        answer = answer_ids(harness, tokenizer, sample, state, config.answer, config.answer_tokens)
        examples.append(build_example(harness, state, answer))
    return examples


def train_judgeq(model, tokenizer, config: TrainConfig, device: str = "cpu",
                 progress: bool = False) -> tuple[SoftTokens, TrainResult]:
    """Freezes ``model``, builds the examples, trains; returns the soft tokens (with training metadata)."""
    config.validate()
    freeze(model)
    harness = EvictionHarness(model, device=device)
    # fingerprinted before the dtype cast: `sgl-evict eval` loads the model in float32, and bfloat16 rounding
    # changes the embedding sample the fingerprint digests
    fingerprint = harness.fingerprint()
    model.to(DTYPES[config.dtype])
    examples = make_examples(harness, tokenizer, config, progress)
    init = initial_soft_tokens(harness.model, config.soft_tokens, config.seed)
    result = train_soft_tokens(harness, examples, init, config.steps, config.lr, config.seed, progress)
    tenth = max(1, len(result.losses) // 10)
    training = {**asdict(config), "sample_seeds": [config.sample_seeds()[0], config.sample_seeds()[-1]],
                "initial_loss": result.initial_loss, "final_loss": result.final_loss,
                "first_tenth_mean_loss": sum(result.losses[:tenth]) / tenth,
                "last_tenth_mean_loss": sum(result.losses[-tenth:]) / tenth}
    soft = SoftTokens(result.embeddings, fingerprint, {"training": json.dumps(training)})
    return soft, result
