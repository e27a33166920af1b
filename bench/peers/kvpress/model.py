"""Loads the harness's Gemma 3 270M checkpoint in the kvpress venv (transformers 5.2), offline."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_MODEL = Path.home() / ".cache" / "sgl-evict" / "gemma3-270m-hf"


def load(folder: str | Path = DEFAULT_MODEL, device: str = "cpu"):
    """``(model, tokenizer)`` in float32, eval mode, on ``device``; nothing is downloaded.

    The checkpoint is the one ``sgl_evict.harness.models.load_gemma3_270m()`` writes (run it once in the project's
    venv). Its config says ``"quantization_config": null`` (the GGUF's config, cleared); transformers 5.2 takes any
    such key for a pre-quantized model and fails, so the key is dropped before loading (the weights are plain
    float32 either way)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one weight-loading bar line per tensor would drown the run's log

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise SystemExit(f"no checkpoint in {folder}: build it once in the project's venv with\n"
                         "  python -c 'from sgl_evict.harness import load_gemma3_270m; load_gemma3_270m()'")
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    if getattr(config, "quantization_config", 0) is None:
        del config.quantization_config
    model = AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=torch.float32, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return model.to(device).eval(), tokenizer
