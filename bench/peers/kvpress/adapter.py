"""Our adapter that lets kvpress presses run on the text-only Gemma 3 model (``Gemma3ForCausalLM``).

kvpress 0.5.5 handles Gemma 3 only as ``Gemma3ForConditionalGeneration``: there it skips the sliding-window layers
and hooks the full-attention ones. On ``Gemma3ForCausalLM`` its ``press(model)`` hooks all layers (the sliding
layers' 511-token caches are cut too), and it binds ``self_attn.rotary_emb`` to Gemma 3's shared rotary module,
whose ``forward(x, position_ids, layer_type)`` needs the layer type: presses that call ``module.rotary_emb(x, pos)``
(ExpectedAttentionPress) crash. This module, written here (no kvpress code copied), changes exactly two things:

1. only the full-attention layers (``config.layer_types[i] == "full_attention"``, layers 5, 11, 17 of Gemma 3
   270M) get the press's own ``forward_hook``; the sliding-window layers keep their caches, as kvpress does for
   ``Gemma3ForConditionalGeneration`` and as our harness does;
2. each hooked layer's ``rotary_emb`` is the model's rotary module bound to that layer's type, so
   ``rotary_emb(x, position_ids)`` returns the full-attention RoPE (theta 1e6, not the sliding layers' 1e4).

Everything else is the press's own code: ``post_init_from_model``, ``forward_hook``, ``compress``, ``score``.

``record`` / ``replay`` are the same thing split in two, to save CPU: a press's hook only reads the layer's inputs
(``hidden_states``, ``position_embeddings``, ``cache_position``, the cache) and rewrites that layer's cache after its
attention output is computed, so later layers never see the compression during prefill. Recording those inputs
once per context and replaying ``press.forward_hook`` on a copy of the cache gives the caches that the live hooks
give (test_adapter.py checks this on every press we compare), with one prefill per prompt instead of one per
press and budget.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch


def language_model(model):
    """The decoder stack (``model.model`` for ``Gemma3ForCausalLM``; ``.language_model`` for the multimodal one)."""
    inner = model.model
    return inner.language_model if hasattr(inner, "language_model") else inner


def full_attention_layers(model) -> list[int]:
    """Indices of the layers whose KV is compressed: every layer of a model without ``layer_types``, else the
    ``full_attention`` ones (Gemma 3 270M: ``[5, 11, 17]``)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    return [i for i, t in enumerate(types) if t == "full_attention"]


class BoundRotary:
    """Gemma 3's shared rotary module bound to one layer type: ``(x, position_ids) -> (cos, sin)``, each
    ``[batch, positions, head_dim]``. A plain object, not an ``nn.Module``, so that binding it to an attention module
    adds no submodule (kvpress's own binding registers the shared module under every layer)."""

    def __init__(self, rotary, layer_type: str):
        self.rotary, self.layer_type = rotary, layer_type

    def __call__(self, x: torch.Tensor, position_ids: torch.Tensor):
        return self.rotary(x, position_ids, layer_type=self.layer_type)

    @property
    def inv_freq(self) -> torch.Tensor:
        """``[head_dim // 2]`` inverse frequencies of this layer type (KeyRerotationPress reads ``inv_freq``)."""
        return getattr(self.rotary, f"{self.layer_type}_inv_freq")


@contextmanager
def bound_rotary(model, layers: list[int]):
    """Binds ``self_attn.rotary_emb`` of ``layers`` to their layer type; restores what was there on exit."""
    stack = language_model(model)
    saved = {}
    for i in layers:
        attn = stack.layers[i].self_attn
        saved[i] = attn.__dict__.get("rotary_emb", None), attn._modules.get("rotary_emb", None)
        attn._modules.pop("rotary_emb", None)  # a module kvpress registered earlier would shadow our attribute
        layer_type = getattr(attn, "layer_type", None) or "full_attention"
        attn.__dict__["rotary_emb"] = BoundRotary(stack.rotary_emb, layer_type)
    try:
        yield
    finally:
        for i, (plain, module) in saved.items():
            attn = stack.layers[i].self_attn
            attn.__dict__.pop("rotary_emb", None)
            if plain is not None:
                attn.__dict__["rotary_emb"] = plain
            if module is not None:
                attn._modules["rotary_emb"] = module


@contextmanager
def gemma3_text(press, model, layers: list[int] | None = None):
    """Live use, like ``with press(model):`` but for the text-only Gemma 3: hooks ``press.forward_hook`` on the
    full-attention layers only (or on ``layers``), with their rotary embedding bound to their layer type."""
    layers = full_attention_layers(model) if layers is None else layers
    stack = language_model(model)
    press.post_init_from_model(model)
    hooks = []
    with bound_rotary(model, layers):
        try:
            for i in layers:
                hooks.append(stack.layers[i].self_attn.register_forward_hook(press.forward_hook, with_kwargs=True))
            yield
        finally:
            for h in hooks:
                h.remove()


@dataclass
class Recording:
    """The keyword inputs each recorded attention layer received during one prefill (``hidden_states
    [1, seq_len, hidden]``, ``position_embeddings`` (cos, sin) ``[1, seq_len, head_dim]``, ``cache_position
    [seq_len]``, ...), by layer index; the cache entry is dropped (a replay passes its own)."""

    layers: list[int]
    kwargs: dict[int, dict] = field(default_factory=dict)


@contextmanager
def record(model, layers: list[int] | None = None):
    """Records the attention inputs of ``layers`` (default: the full-attention ones) of the next forward passes
    (the last pass wins). Yields the :class:`Recording`."""
    layers = full_attention_layers(model) if layers is None else layers
    stack = language_model(model)
    rec = Recording(layers)

    def hook(module, args, kwargs, output):
        if args:
            raise RuntimeError("attention layer called with positional inputs; kvpress's hooks need keywords")
        rec.kwargs[module.layer_idx] = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "cache")}

    handles = [stack.layers[i].self_attn.register_forward_hook(hook, with_kwargs=True) for i in layers]
    try:
        yield rec
    finally:
        for h in handles:
            h.remove()


def replay(press, model, rec: Recording, cache) -> None:
    """Runs ``press.forward_hook`` on each recorded layer as the live hook would have, on ``cache`` (a copy of the
    prefill's cache whose recorded layers still hold the full context; their entries are rebound, never written in
    place). The rotary embedding is bound as in :func:`gemma3_text`."""
    stack = language_model(model)
    press.post_init_from_model(model)
    with bound_rotary(model, rec.layers), torch.inference_mode():
        for i in rec.layers:
            module = stack.layers[i].self_attn
            kwargs = dict(rec.kwargs[i], past_key_values=cache)
            press.forward_hook(module, (), kwargs, (None, None))


def kept_per_layer(cache, layers: list[int]) -> list[int]:
    """Cached tokens of each of ``layers`` (per KV head: ``keys`` is ``[1, kv_heads, tokens, head_dim]``)."""
    return [int(cache.layers[i].keys.shape[2]) for i in layers]
