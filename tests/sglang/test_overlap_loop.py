"""SGLang 0.5.17's own ``Scheduler.event_loop_overlap`` and ``is_disable_overlap_for_batch`` with the plugin's
hook: a prefill whose prompt evicts has its result processed before the next forward launches.

The scheduler's module needs CUDA-only packages to import, so both methods are compiled from its source file; the
scheduler around them is a stand-in whose ``get_next_batch_to_run`` does what SGLang's does to the last prefill
batch when the running batch is empty (``running_batch = last_batch``, then ``prepare_for_decode`` makes it the
decode batch): the case where judging ``last_batch`` misses the prefill (seen on the H100, 2026-12-07).
"""

import __future__
import ast
import importlib.util
import textwrap
from collections import deque
from types import SimpleNamespace

import pytest
from sglang_guard import sglang_or_skip

with sglang_or_skip("sglang.srt.environ"):
    from sglang.srt.environ import envs

from sgl_evict.config import EvictionConfig
from sgl_evict.engine.runtime import STATE
from sgl_evict.patches.scheduler import is_disable_overlap_for_batch_around
from sgl_evict.selection import Budget


def _sglang_methods(*names):
    """The named ``Scheduler`` methods compiled from SGLang's scheduler.py, without importing that module."""
    path = importlib.util.find_spec("sglang.srt.managers.scheduler").origin
    tree = ast.parse(open(path).read())
    scheduler = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Scheduler")
    methods = {}
    for node in scheduler.body:
        if isinstance(node, ast.FunctionDef) and node.name in names:
            node.decorator_list = []
            namespace = {"deque": deque, "envs": envs}
            # annotations stay strings: the names they use live in the module that is not imported
            flags = __future__.annotations.compiler_flag
            exec(compile(ast.Module([node], []), path, "exec", flags=flags), namespace)
            methods[node.name] = namespace[node.name]
    assert set(methods) == set(names), f"SGLang's Scheduler has no {set(names) - set(methods)}"
    return methods


class _Mode:
    def __init__(self, extend):
        self.extend = extend

    def is_extend(self):
        return self.extend

    def is_decode(self):
        return not self.extend


class _Batch:
    """The fields of ``ScheduleBatch`` the loop and the hook read; ``copy`` snapshots like SGLang's."""

    def __init__(self, reqs, extend):
        self.reqs, self.forward_mode, self.decoding_reqs = reqs, _Mode(extend), None
        self.spec_algorithm = SimpleNamespace(is_none=lambda: True)

    def copy(self):
        return _Batch(self.reqs[:], self.forward_mode.extend)

    def __bool__(self):
        return bool(self.reqs)


class _Scheduler:
    """Runs one request: its prefill, then decode steps, in SGLang's overlap loop; records launches and results."""

    def __init__(self, decode_steps, methods):
        self.methods, self.events, self.decode_steps = methods, [], decode_steps
        self.gracefully_exit = self._engine_paused = self.enable_unified_memory = False
        self.require_mlp_sync, self.is_generation = False, True
        self.last_batch, self.running_batch = None, None
        self.request_receiver = SimpleNamespace(recv_requests=lambda: [])
        self.req = SimpleNamespace(rid="a", inflight_middle_chunks=0, is_retracted=False, finished=lambda: False,
                                   sampling_params=SimpleNamespace(custom_params=None))

    def process_input_requests(self, reqs):
        pass

    def get_next_batch_to_run(self, running_batch, last_batch):
        if last_batch is None and not self.events:
            return SimpleNamespace(running_batch=None, batch_to_run=_Batch([self.req], extend=True))
        if last_batch is not None and last_batch.forward_mode.is_extend():
            running_batch = last_batch  # SGLang: an empty running batch becomes the last prefill batch
        if running_batch is None or self.decode_steps == 0:
            self.gracefully_exit = True
            return SimpleNamespace(running_batch=running_batch, batch_to_run=None)
        self.decode_steps -= 1
        running_batch.forward_mode = _Mode(extend=False)  # prepare_for_decode
        return SimpleNamespace(running_batch=running_batch, batch_to_run=running_batch)

    def is_disable_overlap_for_batch(self, batch, last_batch=None):
        return self.hook(self.methods["is_disable_overlap_for_batch"], self, batch, last_batch=last_batch)

    def run_batch(self, batch):
        self.events.append("launch " + ("prefill" if batch.forward_mode.is_extend() else "decode"))
        return object()

    def _apply_war_barrier(self):
        pass

    def process_batch_result(self, batch, result):
        self.events.append("process " + ("prefill" if batch.forward_mode.is_extend() else "decode"))

    def launch_batch_sample_if_needed(self, result, batch):
        pass

    def on_idle(self):
        pass

    def run(self, hook):
        self.hook = hook
        self.methods["event_loop_overlap"](self)
        return self.events


@pytest.fixture
def evicting(monkeypatch):
    monkeypatch.setattr(STATE, "config", EvictionConfig(policy="snapkv", budget=Budget(tokens=10)))
    monkeypatch.setattr(STATE, "pending", {})
    return _sglang_methods("event_loop_overlap", "is_disable_overlap_for_batch")


def test_the_prefill_result_is_processed_before_the_first_decode_launches(evicting):
    events = _Scheduler(2, evicting).run(is_disable_overlap_for_batch_around)
    assert events == ["launch prefill", "process prefill", "launch decode", "launch decode", "process decode",
                      "process decode"]


def test_judging_last_batch_misses_the_prefill_sglang_already_made_a_decode_batch(evicting):
    from sgl_evict.engine.overlap import must_process_first

    def judge_last_batch(original, self, batch, last_batch=None):
        return original(self, batch, last_batch=last_batch) or must_process_first(last_batch, STATE)

    events = _Scheduler(2, evicting).run(judge_last_batch)
    assert events[:3] == ["launch prefill", "launch decode", "process prefill"]


def test_without_eviction_the_loop_keeps_its_overlap(evicting, monkeypatch):
    monkeypatch.setattr(STATE, "config", EvictionConfig())
    events = _Scheduler(1, evicting).run(is_disable_overlap_for_batch_around)
    assert events[:3] == ["launch prefill", "launch decode", "process prefill"]


def test_the_stand_in_calls_what_sglangs_loop_calls():
    """A renamed scheduler method would make the stand-in test nothing: its loop must call only these."""
    path = importlib.util.find_spec("sglang.srt.managers.scheduler").origin
    source = open(path).read()
    start = source.index("    def event_loop_overlap(self):")
    loop = source[start:source.index("    def is_disable_overlap_for_batch", start)]
    called = {n.func.attr for n in ast.walk(ast.parse(textwrap.dedent(loop)))
              if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
              and isinstance(n.func.value, ast.Name) and n.func.value.id == "self"}
    assert called <= set(dir(_Scheduler)) | {"invariant_checker"}, called - set(dir(_Scheduler))
