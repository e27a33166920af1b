"""A one-request eviction engine over an HF transformers causal LM: the reference for the SGLang plugin.

Flow per prompt: one full prefill (:meth:`EvictionHarness.prefill`) captures the window queries; then any number
of ``(policy, budget, granularity)`` runs reuse it. A run builds each compressible layer's
:class:`LayerObservation` (plus lookahead or soft-token queries when the policy needs them), scores, selects,
gathers the kept KV into a new cache (real removal), and decodes greedily with positions that continue from the
full prompt length.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field

import torch

from sgl_evict.harness.capture import CaptureContext, install
from sgl_evict.layer_groups import GroupLayout
from sgl_evict.observation import LayerObservation
from sgl_evict.policies import EvictionPolicy
from sgl_evict.policies.base import LOOKAHEAD, SOFT_TOKENS
from sgl_evict.policies.judgeq import JudgeQ
from sgl_evict.policies.laq import LookaheadQCache
from sgl_evict.policies.snapkv import SnapKV
from sgl_evict.rope import RopeSpec
from sgl_evict.selection import Budget, KeepSet, select_keep, select_keep_grouped
from sgl_evict.soft_tokens import model_fingerprint


@dataclass
class PrefillState:
    """A prompt after its full prefill. Never mutated by policy runs.

    Attributes:
        input_ids: ``[1, seq_len]``.
        cache: the full transformers ``DynamicCache``.
        last_logits: ``[vocab]`` float32 next-token logits after the prompt (they pick the first answer token,
            before any eviction, as in a serving engine).
        window_queries: layer -> ``[num_q_heads, window, head_dim]`` post-RoPE.
    """

    input_ids: torch.Tensor
    cache: object
    last_logits: torch.Tensor
    window_queries: dict[int, torch.Tensor]
    reference_logits: dict[tuple[int, ...], torch.Tensor] = field(default_factory=dict)

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]


@dataclass
class GenerationResult:
    """Greedy tokens of one run; ``kept_tokens`` per compressible layer (per KV head), ``keep`` None for ``none``."""

    tokens: list[int]
    kept_tokens: list[int]
    seq_len: int
    keep: KeepSet | None


@dataclass
class FidelityResult:
    """Teacher-forced agreement with the full cache over a continuation.

    Attributes:
        top1_agreement: fraction of positions whose argmax equals the full cache's.
        kl: mean ``KL(full || compressed)`` of the next-token distributions, in nats.
        positions: number of compared positions.
    """

    top1_agreement: float
    kl: float
    positions: int


class EvictionHarness:
    """Runs eviction policies on one HF causal LM, one request at a time.

    Args:
        model: an HF causal LM (Llama, Qwen, Mistral, Gemma 3 and alike: attention modules with ``layer_idx``,
            ``o_proj``, ``scaling``). It is switched to the harness's attention function.
        window: observation window, also the always-kept recent tokens.
        sinks: leading tokens always kept.
        device: where to run (``"cpu"``, ``"cuda"``, ...); the model is moved there. ``None`` keeps it where it is.
        protected_recent: trailing tokens every keep-set keeps besides the window (the larger of the two counts),
            within the budget. The SGLang plugin protects the model's sliding window this way (its sliding-window
            layers read the last window entries of a compacted row), so ``protected_recent=sliding_window``
            reproduces a server's keep-set; 0 (default): only the window.
        layer_groups: granularity ``per_layer`` only: the model's layers cut into this many groups of consecutive
            layers, as a server's ``--kv-evict-layer-groups`` cuts them (:class:`~sgl_evict.layer_groups.GroupLayout`);
            the compressed layers of one group share a keep-set (:func:`~sgl_evict.selection.select_keep_grouped`).
            None (default): one keep-set per compressed layer, the server's default of one group per layer.
    """

    def __init__(self, model, window: int = 32, sinks: int = 4, device: str | torch.device | None = None,
                 protected_recent: int = 0, layer_groups: int | None = None):
        if window < 1 or sinks < 0 or protected_recent < 0:
            raise ValueError(f"window must be >= 1, sinks and protected_recent >= 0, got {window}, {sinks} and "
                             f"{protected_recent}")
        if device is not None:
            model = model.to(device)
        self.model = model.eval()
        self.config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.window, self.sinks, self.protected_recent = window, sinks, protected_recent
        layer_types = getattr(self.config, "layer_types", None) or ["full_attention"] * self.config.num_hidden_layers
        # sliding-window layers already bound their KV: only full-attention layers are compressed
        self.layers = [i for i, t in enumerate(layer_types) if t == "full_attention"]
        if not self.layers:
            raise ValueError("model has no full-attention layer to compress")
        self.layout = None if layer_groups is None else GroupLayout(
            len(layer_types), layer_groups, frozenset(range(len(layer_types))) - frozenset(self.layers))
        self.ctx: CaptureContext = install(model, window, frozenset(self.layers))
        self.attn = {m.layer_idx: m for m in model.modules() if hasattr(m, "_sgl_evict_ctx")}
        self.rope = RopeSpec.from_config(self.config, "full_attention")
        self.softcap = getattr(self.config, "attn_logit_softcapping", None)
        self._fingerprint: str | None = None
        self._cache_name = self.cache_kwarg(self.model)

    @staticmethod
    def cache_kwarg(module) -> str:
        """The name ``module.forward`` takes its KV cache under: ``cache`` since transformers 5.24 (which warns on
        ``past_key_values`` at every call), ``past_key_values`` before."""
        return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def fingerprint(self) -> str:
        """The model fingerprint that soft-token files must carry."""
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.config, self.model.get_input_embeddings().weight)
        return self._fingerprint

    # ---------------------------------------------------------------- forward passes

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor) -> PrefillState:
        """Full prefill of ``input_ids [1, seq_len]``; captures the window queries of every compressible layer."""
        from transformers import DynamicCache

        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"input_ids must be [1, seq_len], got shape {tuple(input_ids.shape)}")
        if input_ids.shape[1] < 2:
            raise ValueError("the prompt needs at least 2 tokens")
        input_ids = input_ids.to(self.device)
        self.ctx.mode, self.ctx.queries = "prefill", {}
        cache = DynamicCache(config=self.config)
        out = self.model(input_ids=input_ids, **{self._cache_name: cache}, use_cache=True,
                         logits_to_keep=1)
        window_queries = self.ctx.take()
        self.ctx.mode = "extend"
        return PrefillState(input_ids, cache, out.logits[0, -1].float(), window_queries)

    def _extend(self, cache, positions: torch.Tensor, input_ids=None, inputs_embeds=None,
                record: bool = False) -> torch.Tensor:
        """Runs new tokens at logical ``positions [n]`` on ``cache`` (mutated); returns ``[n, vocab]`` logits."""
        self.ctx.mode, self.ctx.record = "extend", record
        try:
            out = self.model(input_ids=input_ids, inputs_embeds=inputs_embeds, **{self._cache_name: cache},
                             position_ids=positions[None].to(self.device), use_cache=True)
        finally:
            self.ctx.record = False
        return out.logits[0].float()

    def _greedy(self, cache, first_token: int, start: int, steps: int, eos: tuple[int, ...] = (),
                record: bool = False) -> list[int]:
        """Greedy decoding from ``first_token`` at position ``start``: returns ``steps`` tokens (fewer at EOS)."""
        tokens = [first_token]
        while len(tokens) < steps and tokens[-1] not in eos:
            pos = torch.tensor([start + len(tokens) - 1])
            logits = self._extend(cache, pos, input_ids=torch.tensor([[tokens[-1]]], device=self.device),
                                  record=record)
            tokens.append(int(logits[-1].argmax()))
        return tokens

    # ---------------------------------------------------------------- caches

    @staticmethod
    def _shallow_copy(cache):
        """A cache that can be extended without touching ``cache``: updates rebind tensors, never write in place."""
        new = copy.copy(cache)
        new.layers = [copy.copy(layer) for layer in cache.layers]
        return new

    def _compressed_cache(self, state: PrefillState, keep: KeepSet):
        """Copy of the prefill cache whose compressible layers hold only the kept tokens (per KV head)."""
        cache = self._shallow_copy(state.cache)
        for i, layer in enumerate(self.layers):
            entry = cache.layers[layer]
            idx = keep.indices[i].to(entry.keys.device)  # [num_kv_heads, kept]
            gather = idx[None, :, :, None].expand(1, -1, -1, entry.keys.shape[-1])
            entry.keys = entry.keys.gather(2, gather)
            entry.values = entry.values.gather(2, gather)
        return cache

    # ---------------------------------------------------------------- policy runs

    @torch.inference_mode()
    def observations(self, state: PrefillState, policy: EvictionPolicy, budget: Budget,
                     granularity: str) -> list[LayerObservation]:
        """One :class:`LayerObservation` per compressible layer, with everything ``policy.needs``."""
        obs = []
        for layer in self.layers:
            attn, entry = self.attn[layer], state.cache.layers[layer]
            obs.append(LayerObservation(
                keys=entry.keys[0], scaling=float(attn.scaling), num_q_heads=state.window_queries[layer].shape[0],
                window_queries=state.window_queries[layer], values=entry.values[0],
                o_proj_weight=attn.o_proj.weight, rope=self.rope, logit_softcap=self.softcap))
        if policy.query_source == LOOKAHEAD:
            self._add_lookahead_queries(state, policy, budget, granularity, obs)
        if policy.query_source == SOFT_TOKENS:
            self._add_soft_token_queries(state, policy, obs)
        return obs

    def _add_lookahead_queries(self, state, policy: LookaheadQCache, budget, granularity, obs) -> None:
        """LAQ: decode ``lookahead_steps`` tokens on a SnapKV-compressed copy, recording their queries."""
        provisional = SnapKV(pooling_kernel=policy.pooling_kernel, pooling_mode=policy.pooling_mode,
                             gqa_reduce=policy.gqa_reduce, continuation=policy.continuation)
        cache = self._compressed_cache(state, self._select(state, provisional, budget, granularity, obs))
        self.ctx.queries = {}
        if policy.lookahead_tokens is not None:
            # teacher-forced: one causal extend gives the queries the steps would have, one by one
            fed = torch.tensor([list(policy.lookahead_tokens[: policy.lookahead_steps])], device=self.device)
            positions = torch.arange(state.seq_len, state.seq_len + policy.lookahead_steps)
            self._extend(cache, positions, input_ids=fed, record=True)
        else:
            first = int(state.last_logits.argmax())
            # each decode step's query is recorded as it runs; the last token needs one more step for its query
            self._greedy(cache, first, state.seq_len, policy.lookahead_steps + 1, record=True)
        recorded = self.ctx.take()
        for o, layer in zip(obs, self.layers):
            o.lookahead_queries = recorded[layer]

    def _add_soft_token_queries(self, state, policy: JudgeQ, obs) -> None:
        """Judge Q: run the soft tokens after the prompt on a throw-away copy, recording their queries.

        The soft tokens are post-scaling: they are residual-stream inputs that bypass the embedding module, so a
        model that scales its embeddings (Gemma's ``sqrt(hidden_size)``) does not scale them. A trainer must
        optimise them in that same space.
        """
        soft = policy.load(self.fingerprint()).embeddings
        if soft.dim() != 2 or soft.shape[0] < 1 or soft.shape[1] != self.config.hidden_size:
            raise ValueError(f"soft tokens must be [k >= 1, hidden_size={self.config.hidden_size}], "
                             f"got shape {tuple(soft.shape)} from {policy.soft_tokens_path}")
        embeds = soft.to(self.device, self.model.get_input_embeddings().weight.dtype)[None]
        positions = torch.arange(state.seq_len, state.seq_len + soft.shape[0])
        self.ctx.queries = {}
        self._extend(self._shallow_copy(state.cache), positions, inputs_embeds=embeds, record=True)
        recorded = self.ctx.take()
        for o, layer in zip(obs, self.layers):
            o.soft_token_queries = recorded[layer]

    def _select(self, state, policy: EvictionPolicy, budget: Budget, granularity: str, obs) -> KeepSet:
        scores = torch.stack([policy.score(o) for o in obs])  # [layers, kv_heads, seq_len]
        if getattr(policy, "reserve", 0):
            # laq's reserve: only the provisional cache's best reserve x budget tokens stay candidates
            provisional = SnapKV(pooling_kernel=policy.pooling_kernel, pooling_mode=policy.pooling_mode,
                                 gqa_reduce=policy.gqa_reduce, continuation=policy.continuation)
            wide = self._select(state, provisional, budget.scaled(policy.reserve), granularity, obs)
            scores = scores * torch.stack([wide.mask(i) for i in range(len(obs))]).to(scores.dtype)
        global_budget = granularity == "per_layer" and policy.comparable_across_layers
        recent = max(self.window, self.protected_recent)
        span = getattr(policy, "continuation", 0)  # query-scoring policies only, as in the server
        if granularity == "per_layer" and self.layout is not None:
            groups = [self.layout.group_of(layer) for layer in self.layers]
            return select_keep_grouped(scores, groups, budget, self.sinks, recent, global_budget, continuation=span)
        return select_keep(scores, budget, self.sinks, recent, granularity, global_budget, continuation=span)

    @torch.inference_mode()
    def select(self, state: PrefillState, policy: EvictionPolicy, budget: Budget, granularity: str) -> KeepSet:
        """The keep-set of ``policy`` at ``budget`` for this prompt (lookahead/soft-token passes included)."""
        return self._select(state, policy, budget, granularity, self.observations(state, policy, budget, granularity))

    def _run_cache(self, state, policy, budget, granularity, keep: KeepSet | None = None):
        if keep is None and not policy.compresses:
            return self._shallow_copy(state.cache), None, [state.seq_len] * len(self.layers)
        keep = keep if keep is not None else self.select(state, policy, budget, granularity)
        return self._compressed_cache(state, keep), keep, [int(i.shape[1]) for i in keep.indices]

    @torch.inference_mode()
    def generate(self, state: PrefillState, policy: EvictionPolicy, budget: Budget, granularity: str = "uniform",
                 max_new_tokens: int = 16, eos_token_ids: tuple[int, ...] = ()) -> GenerationResult:
        """Greedy answer after evicting with ``policy``; positions continue from the full prompt length."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        cache, keep, kept = self._run_cache(state, policy, budget, granularity)
        first = int(state.last_logits.argmax())
        tokens = self._greedy(cache, first, state.seq_len, max_new_tokens, tuple(eos_token_ids))
        return GenerationResult(tokens, kept, state.seq_len, keep)

    @torch.inference_mode()
    def token_logprobs(self, state: PrefillState, policy: EvictionPolicy, budget: Budget, granularity: str,
                       tokens: list[int], keep: KeepSet | None = None) -> list[float]:
        """Log-probabilities of a continuation ``tokens`` (e.g. a server's answer) under ``policy``'s cache, or
        under ``keep`` when given (e.g. the keep-set a server logged).

        ``tokens[0]`` is scored by the prompt's last logits (full cache: eviction happens after them), each later
        token by the compressed cache extended with the tokens before it, at logical positions.
        """
        if not tokens:
            raise ValueError("tokens must not be empty")
        first = torch.log_softmax(state.last_logits, dim=-1)[tokens[0]].item()
        if len(tokens) == 1:
            return [first]
        cache, _, _ = self._run_cache(state, policy, budget, granularity, keep)
        ids = torch.tensor([tokens[:-1]], device=self.device)
        positions = torch.arange(state.seq_len, state.seq_len + ids.shape[1])
        logp = torch.log_softmax(self._extend(cache, positions, input_ids=ids), dim=-1)
        later = logp[torch.arange(ids.shape[1]), torch.tensor(tokens[1:], device=logp.device)]
        return [first, *later.tolist()]

    @torch.inference_mode()
    def fidelity(self, state: PrefillState, policy: EvictionPolicy, budget: Budget, granularity: str,
                 continuation_ids: torch.Tensor, keep: KeepSet | None = None) -> FidelityResult:
        """Compares next-token distributions with and without eviction, teacher-forced on ``continuation_ids [1, n]``.

        ``keep`` reuses a keep-set already selected for these settings (e.g. ``GenerationResult.keep``).

        Position ``i`` predicts the token after ``continuation_ids[0, i]``; the prompt's own last logits are not
        compared (eviction happens after them).
        """
        ids = continuation_ids.to(self.device)
        positions = torch.arange(state.seq_len, state.seq_len + ids.shape[1])
        key = tuple(ids[0].tolist())
        if key not in state.reference_logits:
            state.reference_logits[key] = self._extend(self._shallow_copy(state.cache), positions, input_ids=ids)
        full = torch.log_softmax(state.reference_logits[key], dim=-1)
        cache, _, _ = self._run_cache(state, policy, budget, granularity, keep)
        comp = torch.log_softmax(self._extend(cache, positions, input_ids=ids), dim=-1)
        top1 = (full.argmax(-1) == comp.argmax(-1)).float().mean().item()
        kl = (full.exp() * (full - comp)).sum(-1).clamp_min(0).mean().item()
        return FidelityResult(top1, kl, ids.shape[1])
