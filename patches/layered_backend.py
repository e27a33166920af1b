"""The layered pool's attention backend in the server (``--kv-evict-granularity per_layer``; issue 9, step 4).

SGLang 0.5.17's ``ModelRunner.init_attention_backends`` builds its backends through
``sglang.srt.model_executor.model_runner_components.attention_backend_setup._build_full_attention_backend_from_str``
(``ATTENTION_BACKENDS[name](model_runner)``, the attention-backend registry), which this hook wraps (AROUND,
registered by :mod:`sgl_evict.plugin`): when the model runner's KV pool is a
:class:`~sgl_evict.engine.layered_kv_pool.LayeredMHATokenToKVPool` (built by :mod:`sgl_evict.patches.layered_pool`)
it returns a :class:`~sgl_evict.engine.layered_attention.LayeredTritonAttnBackend`, SGLang's Triton backend whose
layers read and write their own group's group-slots. The registry's entries are captured at import in a dict, so
the registry function itself cannot be wrapped; this module-level function is looked up at call time. Any other
backend over a layered pool would read logical slots as group-slots: refused (the launch check refuses it first).
"""

from __future__ import annotations

BACKEND_SETUP = "sglang.srt.model_executor.model_runner_components.attention_backend_setup"


def build_full_attention_backend_around(original, *args, model_runner, backend_str, init_new_workspace, **kwargs):
    """AROUND ``_build_full_attention_backend_from_str(*, model_runner, backend_str, init_new_workspace)``."""
    from sgl_evict.engine.layered_kv_pool import LayeredMHATokenToKVPool

    if not isinstance(getattr(model_runner, "token_to_kv_pool", None), LayeredMHATokenToKVPool):
        return original(*args, model_runner=model_runner, backend_str=backend_str,
                        init_new_workspace=init_new_workspace, **kwargs)
    if backend_str != "triton":
        raise RuntimeError(f"sgl-evict: --kv-evict-granularity per_layer runs with --attention-backend triton only "
                           f"(got {backend_str})")
    if model_runner.model_config.is_encoder_decoder:
        raise RuntimeError("sgl-evict: --kv-evict-granularity per_layer: cross attention is not supported")
    from sgl_evict.engine.layered_attention import LayeredTritonAttnBackend

    model_runner.init_new_workspace = init_new_workspace  # as SGLang's function does before building the backend
    return LayeredTritonAttnBackend(model_runner)
