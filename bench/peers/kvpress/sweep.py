"""Which kvpress presses run on Gemma 3 270M (``Gemma3ForCausalLM``), out of the box and through adapter.py.

For every press class kvpress 0.5.5 exports, on one short development prompt (seed 0, about 768 tokens, longer than
the 512-token sliding window), at compression ratio 0.5:

1. ``construct``: the press built with its defaults (``press=SnapKVPress(...)`` for wrappers);
2. ``out_of_box``: kvpress's own text-generation pipeline (``pipeline("kv-press-text-generation")``) with
   ``context`` and ``question``, as its README does; the cached tokens of a sliding-window layer (0) and a
   full-attention layer (5) after the context are recorded;
3. ``adapter``: the context prefill under :func:`adapter.gemma3_text` (compression only; decoding is the
   comparison's job), with the same two layers' cached tokens.

Each stage records ``ok`` or the error's type and first line. Nothing is downloaded (``HF_HUB_OFFLINE=1``): presses
that fetch weights from a hub fail here by design.
"""

from __future__ import annotations

import inspect
import os
import warnings

import torch

from bench.peers.kvpress.adapter import gemma3_text
from bench.peers.kvpress.model import load
from bench.peers.kvpress.prompts import question_start
from sgl_evict.quality.tasks import generate

RATIO = 0.5
NOT_PRESSES = {"BasePress", "ScorerPress", "KVPressTextGenerationPipeline", "SUPPORTED_MODELS"}


def _error(err: BaseException) -> str:
    first = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {first[:300]}"


def build(cls):
    """A press of class ``cls`` at :data:`RATIO` with its other defaults; wrappers wrap a SnapKVPress."""
    from kvpress import SnapKVPress

    params = inspect.signature(cls).parameters
    kwargs = {}
    if "press" in params:
        kwargs["press"] = SnapKVPress(compression_ratio=RATIO)
    if "presses" in params:
        kwargs["presses"] = [SnapKVPress(compression_ratio=RATIO)]
    if "compression_ratio" in params:
        kwargs["compression_ratio"] = RATIO
    return cls(**kwargs)


def _lengths(cache) -> dict:
    return {"layer0_sliding": int(cache.layers[0].keys.shape[2]), "layer5_full": int(cache.layers[5].keys.shape[2])}


def sweep(model_dir, device: str = "cpu") -> dict:
    """``{"prompt": ..., "presses": {name: {stage: "ok" | error, ...}}}`` (see the module docstring)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import kvpress
    from transformers import DynamicCache, pipeline

    model, tok = load(model_dir, device)  # a model of its own: the comparison's has the harness's attention
    conv = generate("single", 768, lambda s: len(tok(s).input_ids), 0, 1)[0]
    text, task = conv.turns[0].question, conv.turns[0].meta["task"]
    cut = question_start(text, task)
    context, question = text[:cut], text[cut:]
    ctx_ids = tok(context, return_tensors="pt").input_ids.to(device)
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tok, device=device)
    out = {"prompt": {"task": task, "context_tokens": int(ctx_ids.shape[1]), "seed": 0}, "ratio": RATIO,
           "presses": {}}
    for name in kvpress.__all__:
        cls = getattr(kvpress, name)
        if name in NOT_PRESSES or not inspect.isclass(cls):
            continue
        row = out["presses"][name] = {}
        try:
            build(cls)
            row["construct"] = "ok"
        except Exception as err:  # noqa: BLE001 - recording why a press cannot be built is the point
            row["construct"] = _error(err)
            continue
        cache = DynamicCache()
        try:
            with warnings.catch_warnings(), torch.inference_mode():
                warnings.simplefilter("ignore")
                answer = pipe(context, question=question, press=build(cls), max_new_tokens=4, cache=cache)["answer"]
            row["out_of_box"], row["out_of_box_answer"] = "ok", answer
            row["out_of_box_kept"] = _lengths(cache)
        except Exception as err:  # noqa: BLE001
            row["out_of_box"] = _error(err)
        cache = DynamicCache(config=model.config)
        try:
            with torch.inference_mode(), gemma3_text(build(cls), model):
                model.model(input_ids=ctx_ids, past_key_values=cache, use_cache=True)
            row["adapter"], row["adapter_kept"] = "ok", _lengths(cache)
        except Exception as err:  # noqa: BLE001
            row["adapter"] = _error(err)
    return out
