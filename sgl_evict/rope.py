"""Rotary position embedding (RoPE) as the policies need it: rotate queries to other positions.

Uses the "rotate half" layout of HF transformers and SGLang (``is_neox_style=True``): the first and
second halves of ``head_dim`` form the (x, y) pairs. Frequencies follow the model config, including
the scaled variants ``linear``, ``llama3`` and ``yarn``.

RoPE at position p is an orthogonal rotation R(p) (times a constant attention factor for yarn), and
R(a) R(b) = R(a + b). So moving a post-RoPE query from position p to position t is a rotation by
t - p: the pre-RoPE query never has to be materialised, and the attention factor cancels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch


@dataclass(frozen=True)
class RopeSpec:
    """Inverse frequencies and attention factor of one attention layer's RoPE.

    Attributes:
        inv_freq: ``[rotary_dim // 2]`` float32 angular frequencies (radians per position).
        attention_factor: multiplier applied to cos and sin (yarn's mscale; 1.0 otherwise).
        rotary_dim: number of leading head dimensions that are rotated (``head_dim`` unless partial).
    """

    inv_freq: torch.Tensor
    attention_factor: float = 1.0

    @property
    def rotary_dim(self) -> int:
        return 2 * self.inv_freq.numel()

    @classmethod
    def from_config(cls, config: Any, layer_type: str = "full_attention") -> "RopeSpec":
        """Reads RoPE parameters from an HF config object or dict.

        Understands transformers 5 ``rope_parameters`` (flat, or keyed by layer type as in Gemma 3)
        and transformers 4 / SGLang ``rope_theta`` + ``rope_scaling``.
        """
        get = config.get if isinstance(config, Mapping) else lambda k, d=None: getattr(config, k, d)
        head_dim = get("head_dim") or get("hidden_size") // get("num_attention_heads")
        rotary_dim = int(head_dim * (get("partial_rotary_factor") or 1.0))
        params = get("rope_parameters")
        if isinstance(params, Mapping) and layer_type in params and isinstance(params[layer_type], Mapping):
            params = params[layer_type]
        if not params:
            params = dict(get("rope_scaling") or {})
            params.setdefault("rope_theta", get("rope_theta", 10000.0))
        params = dict(params)
        rope_type = params.get("rope_type", params.get("type", "default"))
        theta = float(params.get("rope_theta", get("rope_theta", 10000.0)))
        max_pos = get("max_position_embeddings")
        return rope_spec(rotary_dim, theta, rope_type, params, max_pos)


def rope_spec(
    rotary_dim: int,
    theta: float,
    rope_type: str = "default",
    params: Mapping[str, Any] | None = None,
    max_position_embeddings: int | None = None,
) -> RopeSpec:
    """Builds a :class:`RopeSpec` for one of the supported ``rope_type`` values."""
    params = params or {}
    base = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    if rope_type == "default":
        return RopeSpec(base.float())
    if rope_type == "linear":
        return RopeSpec((base / float(params["factor"])).float())
    if rope_type == "llama3":
        factor = float(params["factor"])
        low_ff = float(params.get("low_freq_factor", 1.0))
        high_ff = float(params.get("high_freq_factor", 4.0))
        old_ctx = float(params["original_max_position_embeddings"])
        wavelen = 2 * math.pi / base
        low_wavelen, high_wavelen = old_ctx / low_ff, old_ctx / high_ff
        scaled = torch.where(wavelen > low_wavelen, base / factor, base)
        smooth = (old_ctx / wavelen - low_ff) / (high_ff - low_ff)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return RopeSpec(torch.where(medium, smoothed, scaled).float())
    if rope_type == "yarn":
        return _yarn_spec(base, rotary_dim, theta, params, max_position_embeddings)
    raise ValueError(
        f"unsupported rope_type {rope_type!r}: supported are default, linear, llama3, yarn "
        "(dynamic NTK depends on sequence length and cannot re-rotate to a fixed position)"
    )


def _yarn_spec(base, rotary_dim, theta, params, max_position_embeddings) -> RopeSpec:
    factor = float(params["factor"])
    orig = float(params.get("original_max_position_embeddings") or max_position_embeddings)
    beta_fast = float(params.get("beta_fast") or 32.0)
    beta_slow = float(params.get("beta_slow") or 1.0)
    mscale = params.get("mscale")
    mscale_all_dim = params.get("mscale_all_dim")

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)

    def correction_dim(num_rotations: float) -> float:
        return (rotary_dim * math.log(orig / (num_rotations * 2 * math.pi))) / (2 * math.log(theta))

    low = math.floor(correction_dim(beta_fast)) if params.get("truncate", True) else correction_dim(beta_fast)
    high = math.ceil(correction_dim(beta_slow)) if params.get("truncate", True) else correction_dim(beta_slow)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(rotary_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    inv_freq = (base / factor) * (1 - extrapolation) + base * extrapolation
    return RopeSpec(inv_freq.float(), float(attention_factor))


def _inv_freq_on(spec: RopeSpec, device: torch.device) -> torch.Tensor:
    """``spec.inv_freq`` in float64 on the positions' device (the spec is built on the CPU from the config)."""
    return spec.inv_freq.to(device=device, dtype=torch.float64)


def _rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotates the (first, second)-half pairs of ``x[..., :rotary_dim]`` by ``angles [..., rotary_dim/2]``."""
    half = angles.shape[-1]
    x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    cos, sin = angles.cos(), angles.sin()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, spec: RopeSpec) -> torch.Tensor:
    """RoPE of pre-RoPE vectors ``x [..., n, head_dim]`` at ``positions [n]`` (what the model does)."""
    angles = positions.to(torch.float64)[:, None] * _inv_freq_on(spec, positions.device)[None, :]
    out = _rotate(x.to(torch.float64), angles)
    half = spec.rotary_dim
    out[..., :half] *= spec.attention_factor
    return out.to(x.dtype)


def undo_rope(x: torch.Tensor, positions: torch.Tensor, spec: RopeSpec) -> torch.Tensor:
    """Inverse of :func:`apply_rope`: the pre-RoPE form of post-RoPE vectors ``x [..., n, head_dim]``."""
    angles = -positions.to(torch.float64)[:, None] * _inv_freq_on(spec, positions.device)[None, :]
    out = _rotate(x.to(torch.float64), angles)
    out[..., : spec.rotary_dim] /= spec.attention_factor
    return out.to(x.dtype)


def rerotate(x: torch.Tensor, from_positions: torch.Tensor, to_positions: torch.Tensor, spec: RopeSpec) -> torch.Tensor:
    """Moves post-RoPE vectors ``x [..., n, head_dim]`` from ``from_positions [n]`` to ``to_positions [n]``.

    Equal to ``apply_rope(undo_rope(x, from), to)`` but one rotation by the position difference, in float64
    angles so large positions keep their precision.
    """
    delta = (to_positions.to(torch.float64) - from_positions.to(torch.float64))[:, None]
    angles = delta * _inv_freq_on(spec, delta.device)[None, :]
    return _rotate(x.to(torch.float64), angles).to(x.dtype)
