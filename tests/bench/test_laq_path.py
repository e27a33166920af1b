"""bench/laq_path.py: the traced path of one laq request through the engine's modules."""

import torch

from bench import laq_path


def dense_mass(queries, keys, table, lens, scaling, positions=None, row_lse=None):
    """The scoring kernel's contract in plain PyTorch (the Triton interpreter under a profiler takes minutes)."""
    slots = table.clamp_min(0).long()
    k = keys[slots].permute(0, 2, 1, 3).repeat_interleave(queries.shape[1] // keys.shape[1], 1)  # [R, Hq, L, d]
    logits = torch.einsum("rhqd,rhld->rhql", queries.float(), k.float()) * scaling
    mask = (table < 0)[:, None, None]
    if positions is not None:
        mask = mask | (torch.arange(table.shape[1])[None, None, None] > positions[:, None, :, None])
    return logits.masked_fill(mask, float("-inf")).softmax(-1).mean(2)


def test_the_trace_follows_the_request_through_scoring_and_eviction_and_counts_re_entries():
    result = laq_path.trace(steps=2, attention_mass=dense_mass)
    sequence = result["sequence"]
    assert sequence[0] == "sgl_evict/engine/evict_batch.py"
    for module in ("sgl_evict/engine/score_plan.py", "sgl_evict/engine/lookahead.py", "sgl_evict/engine/apply.py"):
        assert module in sequence
    assert all(a != b for a, b in zip(sequence, sequence[1:]))  # one stop per change of module
    assert result["stops"] == len(sequence) == result["modules"] + result["re_entries"]
    assert not any(stop.startswith("bench/") or stop.startswith("tests/") for stop in sequence)


def test_a_file_outside_the_project_is_not_a_stop():
    assert laq_path._module_of(laq_path.__file__) is None  # bench/ is not a watched folder
    assert laq_path._module_of("/usr/lib/python3/os.py") is None
    assert laq_path._module_of(str(laq_path.ROOT / "sgl_evict" / "holes.py")) == "sgl_evict/holes.py"
