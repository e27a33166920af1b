"""The modules one laq request passes through inside the engine, traced on CPU (issue 23's measure).

    python -m bench.laq_path [--json]

Runs one prefill batch holding a laq request (and a snapkv one beside it), three lookahead decode steps and the
eviction after them through :func:`~sgl_evict.engine.evict_batch.evict_after_prefill`,
:func:`~sgl_evict.engine.lookahead.record_step` and :func:`~sgl_evict.engine.evict_batch.evict_after_lookahead`
on stand-ins for SGLang's objects (the scoring runs the real Triton kernel under the interpreter), with a profiler
hook that records which of the project's modules (``sgl_evict/``, ``kernels/``, ``patches/``) is executing at every
call and return. Consecutive frames in one module are one stop; a module entered again after control left it is a
re-entry. Prints the counts per module (--json: the stops in order too). Nothing is timed; about 2 minutes on
2 CPU cores (the interpreted kernel under the profiler).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WATCHED = ("sgl_evict", "kernels", "patches")


def _module_of(filename: str) -> str | None:
    """``sgl_evict/engine/keep.py`` for a file of the project (through its links too), None for any other."""
    try:
        path = Path(os.path.realpath(filename)).relative_to(ROOT)
    except ValueError:
        return None
    return str(path) if path.parts and path.parts[0] in WATCHED else None


class PathRecorder:
    """``sys.setprofile`` hook: the sequence of the project's modules executing, one entry per change."""

    def __init__(self):
        self.stops: list[str] = []

    def __call__(self, frame, event, arg):
        if event not in ("call", "return"):
            return
        # after a return the caller's frame runs again
        target = frame if event == "call" else frame.f_back
        module = _module_of(target.f_code.co_filename) if target is not None else None
        if module is not None and (not self.stops or self.stops[-1] != module):
            self.stops.append(module)


def _request(rid: str, pool_idx: int, custom=None):
    return SimpleNamespace(rid=rid, req_pool_idx=pool_idx, cache_protected_len=0, inflight_middle_chunks=0,
                           is_retracted=False, finished=lambda: False,
                           sampling_params=SimpleNamespace(custom_params=custom))


def run_laq_request(steps: int = 3, recorder: PathRecorder | None = None, attention_mass=None) -> None:
    """One laq request (and a snapkv one) from prefill eviction to its eviction after ``steps`` lookahead steps;
    ``recorder`` profiles the engine's calls only (not the stand-ins' set-up). ``attention_mass``: the scoring
    kernel's entry point (default: the Triton kernel's)."""
    from sgl_evict.config import EvictionConfig
    from sgl_evict.engine.evict_batch import evict_after_lookahead, evict_after_prefill
    from sgl_evict.engine.lookahead import record_step
    from sgl_evict.engine.runtime import EngineState
    from sgl_evict.kernels.paged_scoring import attention_mass_paged
    from sgl_evict.selection import Budget

    attention_mass = attention_mass or attention_mass_paged
    gen = torch.Generator().manual_seed(5)
    kv_heads, q_heads, dim, lens, layers = 2, 4, 16, [40, 30], (0, 1)
    pools = {layer: torch.randn(200, kv_heads, dim, generator=gen) for layer in layers}
    table = torch.zeros(8, 64, dtype=torch.int32)
    perm = torch.randperm(150, generator=gen).to(torch.int32) + 1
    table[1, :40], table[2, :30] = perm[:40], perm[40:70]
    state = EngineState()
    state.configure(EvictionConfig(policy="laq", budget=Budget(tokens=10), window=4, sinks=2, lookahead_steps=steps))
    state.shadow_offset, state.forward_id = 4, 1
    state.capture.begin(1, lens, "cpu")
    for layer in layers:
        state.capture.record(layer, torch.randn(sum(lens), q_heads * dim, generator=gen), q_heads, dim, 0.25)
    state.capture.end()
    reqs = [_request("a", 1), _request("b", 2, {"kv_evict": {"policy": "snapkv"}})]
    freed = []
    batch = SimpleNamespace(reqs=reqs, decoding_reqs=None, seq_lens_cpu=torch.tensor(lens))
    sys.setprofile(recorder)
    try:
        evict_after_prefill(batch, state, table, pools.__getitem__, freed.append, attention_mass)
        for step in range(steps):
            sys.setprofile(None)
            for i, req in enumerate(reqs):
                table[req.req_pool_idx, lens[i] + step] = perm[70 + 2 * step + i]
            taken = {layer: torch.randn(1, q_heads, dim, generator=gen) for layer in layers}
            sys.setprofile(recorder)
            record_step(["a", "b"], [0], taken, state.pending)
            evict_after_lookahead(SimpleNamespace(reqs=reqs), state, table, pools.__getitem__, freed.append,
                                  attention_mass)
    finally:
        sys.setprofile(None)
    if "a" in state.pending or len(freed) != 2:
        raise RuntimeError("the laq request was not evicted after its lookahead steps")


def trace(steps: int = 3, attention_mass=None) -> dict:
    """The stops and per-module counts of one traced :func:`run_laq_request` (after an untraced one, so imports
    and first-call compilation do not show)."""
    run_laq_request(steps, attention_mass=attention_mass)
    recorder = PathRecorder()
    run_laq_request(steps, recorder, attention_mass)
    stops = [s for s in recorder.stops if s != "bench/laq_path.py"]
    collapsed = [s for i, s in enumerate(stops) if i == 0 or stops[i - 1] != s]
    entries: dict[str, int] = {}
    for module in collapsed:
        entries[module] = entries.get(module, 0) + 1
    return {"steps": steps, "stops": len(collapsed), "modules": len(entries),
            "re_entries": sum(n - 1 for n in entries.values()), "entries_per_module": entries,
            "sequence": collapsed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="lookahead steps (default 3)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    result = trace(args.steps)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"{result['stops']} stops in {result['modules']} modules, {result['re_entries']} re-entries")
    for module, n in sorted(result["entries_per_module"].items(), key=lambda kv: -kv[1]):
        print(f"  {n:3d}  {module}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
