"""The scoring, re-rotation and selection kernels do not specialise request-dependent arguments (lengths, chunk
counts, per-request strides, the slot row's alignment), so a server compiles one variant per model, not one per
prompt shape (kernels/paged_scoring.py, docs/kernels.md)."""

import inspect

import pytest
import torch
import triton

from sgl_evict.kernels import paged_scoring, rope_rerotate, selection

HQ, HKV, D, WINDOW = 4, 2, 16, 4


def _declared(kernel, option: str) -> tuple:
    """A jitted kernel's ``do_not_specialize`` / ``do_not_specialize_on_alignment`` (compiled or interpreted)."""
    if hasattr(kernel, "kwargs"):  # TRITON_INTERPRET: InterpretedFunction keeps the decorator's arguments
        return tuple(kernel.kwargs.get(option) or ())
    return tuple(getattr(kernel, option) or ())


KERNELS = {
    "_row_stats": (paged_scoring._row_stats, {"chunk", "num_splits", "kvh0", "s_rr"}, {"ReqToTok"}),
    "_accumulate": (paged_scoring._accumulate, {"chunk", "max_len", "kvh0", "s_rr", "s_lr", "s_or", "s_oh"},
                    {"ReqToTok", "RowLse"}),
    "_page_scores": (selection._page_scores, {"max_len", "max_pages", "s_sr", "s_or"}, set()),
    "_compact": (selection._compact, {"max_len", "s_kr", "s_rr", "s_mr", "s_cr"}, {"ReqToTok"}),
    "_rerotate": (rope_rerotate._rerotate, {"num_rows", "num_queries"}, set()),
}
# model constants: the KV buffer's strides and the head size stay specialised (vectorised key loads)
SPECIALISED = {"s_kt", "s_kh", "head_dim", "K", "Q", "X"}


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_request_dependent_kernel_arguments_are_not_specialised(name):
    kernel, values, pointers = KERNELS[name]
    params = set(inspect.signature(kernel.fn).parameters)
    dns, dnsa = set(_declared(kernel, "do_not_specialize")), set(_declared(kernel, "do_not_specialize_on_alignment"))
    assert values <= dns and pointers <= dnsa
    # Triton ignores a name that is not a parameter: every declared name must be one
    assert dns <= params and dnsa <= params
    assert not (dns | dnsa) & SPECIALISED
    # and Triton's own parameter objects carry the flags (what its launcher's specialisation key reads)
    jit = triton.runtime.jit.JITFunction(kernel.fn, do_not_specialize=list(dns),
                                         do_not_specialize_on_alignment=list(dnsa))
    flagged = {p.name for p in jit.params if p.do_not_specialize}
    flagged_alignment = {p.name for p in jit.params if p.do_not_specialize_on_alignment}
    assert flagged == dns and flagged_alignment == dnsa


def test_combine_block_does_not_follow_the_prompt_length(monkeypatch):
    """SPLIT_BLOCK (a constexpr of pass 1) is sized by the launch, not by the prompt: no variant per short length."""
    seen = []

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append(kwargs["SPLIT_BLOCK"])
            return launch

    monkeypatch.setattr(paged_scoring, "_row_stats", Recorder())
    monkeypatch.setattr(paged_scoring, "_accumulate", _NoLaunch())
    for n in (100, 700, 3000, 20000):
        paged_scoring.attention_mass_paged(torch.zeros(1, HQ, WINDOW, D), torch.zeros(n, HKV, D),
                                           torch.arange(n, dtype=torch.int32).view(1, n),
                                           torch.tensor([n], dtype=torch.int32), 0.25)
    assert len(set(seen)) == 1, seen


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None
