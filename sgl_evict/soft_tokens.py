"""Trained soft-token embeddings (Judge Q) on disk: safetensors with the model's fingerprint."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

_FINGERPRINT_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "vocab_size")


def model_fingerprint(config: Any, embedding_weight: torch.Tensor | None = None) -> str:
    """A short id of a model: its architecture numbers, plus a digest of its embedding table if given.

    Two checkpoints of one architecture differ in their embeddings, so passing the table tells a
    fine-tune from its base model.
    """
    get = config.get if isinstance(config, Mapping) else lambda k: getattr(config, k, None)
    h = hashlib.sha256(json.dumps({k: get(k) for k in _FINGERPRINT_KEYS}, sort_keys=True).encode())
    if embedding_weight is not None:
        # a strided sample of the table keeps this cheap for 256K-token vocabularies
        sample = embedding_weight.detach().float().flatten()[::997][:65536].cpu()
        h.update(sample.numpy().round(4).tobytes())
    return h.hexdigest()[:16]


@dataclass
class SoftTokens:
    """``embeddings [k, hidden_size]`` appended after the prompt, and the model they were trained for.

    ``metadata``: free-form strings stored in the file's header (e.g. ``"training"``: JSON of how the vectors
    were trained); :meth:`load` reads them back.
    """

    embeddings: torch.Tensor
    fingerprint: str
    metadata: dict[str, str] = field(default_factory=dict)

    def save(self, path: str | Path, metadata: Mapping[str, str] | None = None) -> None:
        from safetensors.torch import save_file

        # fingerprint and format last: no metadata entry may overwrite them
        meta = {**self.metadata, **(metadata or {}), "fingerprint": self.fingerprint, "format": "sgl-evict-judgeq-v1"}
        save_file({"soft_tokens": self.embeddings.detach().float().contiguous().cpu()}, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path, expect_fingerprint: str | None = None) -> "SoftTokens":
        """Loads a soft-token file; with ``expect_fingerprint``, refuses one trained for another model."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"soft-token file not found: {path}")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != "sgl-evict-judgeq-v1" or "soft_tokens" not in f.keys():
                raise ValueError(f"{path} is not an sgl-evict Judge Q soft-token file")
            embeddings = f.get_tensor("soft_tokens")
        fingerprint = meta.get("fingerprint", "")
        if expect_fingerprint is not None and fingerprint != expect_fingerprint:
            raise ValueError(
                f"{path} was trained for model fingerprint {fingerprint}, but the loaded model is "
                f"{expect_fingerprint}; train soft tokens for this model with `sgl-evict train-judgeq`"
            )
        extra = {k: v for k, v in meta.items() if k not in ("fingerprint", "format")}
        return cls(embeddings, fingerprint, extra)
