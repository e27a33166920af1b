"""laprox inside the server: each layer's output projection, read once the model is loaded.

- ``sglang.srt.model_executor.model_runner.ModelRunner.initialize`` (AFTER, :func:`initialize_after`): SGLang
  loads the weights (and applies its post-load transforms) there, and sizes the KV pool only afterwards, from the
  memory left. The hook factors each full-attention layer's ``o_proj`` weight
  (:mod:`sgl_evict.engine.laprox`), so laprox can score a prompt's values against it, and the memory of the
  factors is already taken when SGLang sizes the pool. Every evicting server does it, since any request may ask
  for laprox. A model whose layout cannot be read fails the launch when the server's policy is laprox; otherwise
  the hook logs why, and laprox requests keep their full cache. A layer with a value scale (an FP8 pool stores
  ``v / v_scale``) has it folded into its factors.
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
        factors = model_norm_factors(projections, runner.device)
        # an FP8 pool holds v / v_scale: || R_h v || = v_scale x || R_h v_stored ||
        for module in runner.model.modules():
            scale = getattr(module, "v_scale_float", None) if isinstance(module, RadixAttention) else None
            if scale is not None and module.layer_id in factors:
                factors[module.layer_id] = factors[module.layer_id] * float(scale)
        STATE.value_norm_factors = factors
    return None
