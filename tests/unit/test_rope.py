"""RoPE helpers: inverse, re-rotation, and frequencies equal to transformers' for scaled variants."""

import pytest
import torch

from sgl_evict.rope import RopeSpec, apply_rope, rerotate, rope_spec, undo_rope


def _spec(kind: str) -> RopeSpec:
    params = {
        "default": {},
        "linear": {"factor": 4.0},
        "llama3": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192},
        "yarn": {"factor": 4.0, "original_max_position_embeddings": 4096},
    }[kind]
    return rope_spec(64, 500000.0, kind, params, 16384)


@pytest.mark.parametrize("kind", ["default", "linear", "llama3", "yarn"])
def test_undo_rope_inverts_apply_rope(kind):
    spec = _spec(kind)
    x = torch.randn(3, 7, 64, dtype=torch.float64)
    pos = torch.randint(0, 100000, (7,))
    assert torch.allclose(undo_rope(apply_rope(x, pos, spec), pos, spec), x, atol=1e-9)


@pytest.mark.parametrize("kind", ["default", "linear", "llama3", "yarn"])
def test_rerotate_equals_rope_at_target(kind):
    """dapq's re-rotation must equal RoPE applied to the pre-RoPE query at the target position."""
    spec = _spec(kind)
    pre = torch.randn(4, 5, 64, dtype=torch.float64)
    src = torch.tensor([10, 11, 12, 13, 14])
    dst = torch.tensor([3000, 3001, 3002, 3003, 3004])
    moved = rerotate(apply_rope(pre, src, spec), src, dst, spec)
    assert torch.allclose(moved, apply_rope(pre, dst, spec), atol=1e-9)


def test_partial_rotary_leaves_tail_untouched():
    spec = rope_spec(32, 10000.0)
    x = torch.randn(2, 3, 64, dtype=torch.float64)
    out = apply_rope(x, torch.tensor([5, 6, 7]), spec)
    assert torch.equal(out[..., 32:], x[..., 32:])
    assert not torch.allclose(out[..., :32], x[..., :32])


def test_rotation_preserves_relative_logits():
    """q(m)·k(n) depends on m - n only: moving both by the same offset keeps every logit."""
    spec = rope_spec(64, 10000.0)
    q, k = torch.randn(1, 64, dtype=torch.float64), torch.randn(1, 64, dtype=torch.float64)
    a = (apply_rope(q, torch.tensor([50]), spec) * apply_rope(k, torch.tensor([20]), spec)).sum()
    b = (apply_rope(q, torch.tensor([1050]), spec) * apply_rope(k, torch.tensor([1020]), spec)).sum()
    assert torch.allclose(a, b, atol=1e-9)


@pytest.mark.parametrize("kind", ["default", "linear", "llama3", "yarn"])
def test_inv_freq_matches_transformers(kind):
    transformers = pytest.importorskip("transformers")
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {"default": {}, "linear": {"factor": 4.0},
              "llama3": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
              "yarn": {"factor": 4.0, "original_max_position_embeddings": 4096}}[kind]
    cfg = LlamaConfig(hidden_size=512, num_attention_heads=8, max_position_embeddings=16384,
                      rope_parameters={"rope_type": kind, "rope_theta": 500000.0, **params})
    spec = RopeSpec.from_config(cfg)
    if kind == "default":
        expected, factor = 1.0 / (500000.0 ** (torch.arange(0, 64, 2).float() / 64)), 1.0
    else:
        expected, factor = ROPE_INIT_FUNCTIONS[kind](cfg, "cpu")
    assert torch.allclose(spec.inv_freq, expected.float(), rtol=1e-5)
    assert spec.attention_factor == pytest.approx(float(factor))


def test_from_config_reads_gemma3_per_layer_type_parameters():
    cfg = {"head_dim": 256, "hidden_size": 640, "num_attention_heads": 4,
           "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                               "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}
    full, sliding = RopeSpec.from_config(cfg, "full_attention"), RopeSpec.from_config(cfg, "sliding_attention")
    assert full.rotary_dim == 256
    assert full.inv_freq[1] == pytest.approx(1e6 ** (-2 / 256), rel=1e-6)
    assert sliding.inv_freq[1] == pytest.approx(1e4 ** (-2 / 256), rel=1e-6)


def test_from_config_reads_legacy_rope_scaling():
    cfg = {"head_dim": 128, "hidden_size": 4096, "num_attention_heads": 32, "rope_theta": 500000.0,
           "rope_scaling": {"rope_type": "linear", "factor": 2.0}}
    spec = RopeSpec.from_config(cfg)
    assert spec.inv_freq[0] == pytest.approx(0.5)


def test_unsupported_rope_type_is_a_clear_error():
    with pytest.raises(ValueError, match="unsupported rope_type 'dynamic'"):
        rope_spec(64, 10000.0, "dynamic", {"factor": 2.0})


def test_rope_math_runs_on_the_positions_device():
    # the spec's inv_freq is built on the CPU from the config; positions and queries live on the GPU in a server
    # (and in the harness on cuda). The meta device stands in for the GPU here: a CPU tensor mixed in fails.
    spec = _spec("llama3")
    x = torch.empty(2, 3, 8, 64, device="meta")
    positions = torch.arange(8, device="meta")
    assert rerotate(x, positions, positions + 5, spec).device.type == "meta"
    assert apply_rope(x, positions, spec).device.type == "meta"
    assert undo_rope(x, positions, spec).device.type == "meta"
