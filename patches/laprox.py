"""laprox inside the server: each layer's output projection, read once the model is loaded.

- ``sglang.srt.model_executor.model_runner.ModelRunner.initialize`` (AFTER, :func:`initialize_after`): SGLang
  loads the weights (and applies its post-load transforms) there, and sizes the KV pool only afterwards, from the
  memory left. The hook factors each full-attention layer's ``o_proj`` weight
  (:mod:`sgl_evict.engine.laprox`), so laprox can score a prompt's values against it, and the memory of the
  factors is already taken when SGLang sizes the pool. Every evicting server does it, since any request may ask
  for laprox. A model whose layout cannot be read fails the launch when the server's policy is laprox; otherwise
  the hook logs why, and laprox requests keep their full cache.
"""

from __future__ import annotations

import logging

import torch

from sgl_evict.engine.laprox import find_output_projections, model_norm_factors
from sgl_evict.engine.runtime import STATE

logger = logging.getLogger("sgl_evict")


def initialize_after(result, runner, *args, **kwargs):
    if not STATE.enabled or getattr(runner, "is_draft_worker", False):
        return None
    from sglang.srt.layers.radix_attention import RadixAttention

    try:
        projections = find_output_projections(runner.model, RadixAttention)
    except ValueError as err:
        if STATE.config.policy_object.uses("o_proj_weight"):
            raise RuntimeError(f"sgl-evict: --kv-evict-policy {STATE.config.policy} cannot read this model's "
                               f"output projections: {err}") from err
        logger.warning("sgl-evict: cannot read this model's output projections (%s): laprox requests will not "
                       "evict", err)
        return None
    with torch.no_grad():
        STATE.value_norm_factors = model_norm_factors(projections, runner.device)
    return None
