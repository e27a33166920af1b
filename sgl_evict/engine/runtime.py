"""The scheduler process's eviction state, shared by the hooks in ``patches/``.

SGLang runs one scheduler (with its model runner) per process, so one module-level :class:`EngineState` is
enough: the scheduler hook sets the server's config before the pools are built, the pool hook reads it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from sgl_evict.config import EvictionConfig
from sgl_evict.engine.capture import DecodeQueryCapture, WindowQueryCapture
from sgl_evict.engine.hole_counts import HoleCounts
from sgl_evict.engine.judgeq import ServedSoftTokens
from sgl_evict.engine.lookahead import PendingLookahead
from sgl_evict.policies import POLICIES
from sgl_evict.rope import RopeSpec

logger = logging.getLogger("sgl_evict")


@dataclass
class EngineState:
    """Attributes:
        config: the server's eviction config (flags); requests may override it.
        capture: window queries of the forward being run (None when no policy needs queries).
        shadow_offset: row offset of the compacted shadow rows in ``req_to_token`` (None before the pool is
            built, or when eviction is off).
        rope: the model's RoPE (dapq re-rotates window queries with it), read from its config at start.
        value_norm_factors: laprox: layer id -> ``[num_q_heads, head_dim, head_dim]`` factors of the layer's output
            projection (:mod:`sgl_evict.engine.laprox`), computed at start; None when the model's layout could not
            be read (laprox requests then keep their full cache).
        forward_id: counts forwards, so eviction uses the queries of its own batch only.
        decode_capture: laq's lookahead queries of decode forwards (graph-safe; None when eviction is off).
        pending: laq requests between prefill and eviction, by request id (:mod:`sgl_evict.engine.lookahead`).
        protected_recent: trailing prompt tokens every keep-set keeps: the model's sliding window (0 without
            sliding-window layers), so those layers, which read the last window entries of a compacted row, see
            exactly the tokens they would without eviction.
        window_layers: ids of the model's sliding-window layers (set at start; empty without them): with
            ``--kv-evict-granularity per_layer`` a layer group of these only keeps the ``protected_recent`` tail.
        soft_tokens: judgeq's soft tokens (``--kv-evict-soft-tokens``), loaded for the served model at start; None
            without the flag (judgeq requests are then refused).
        holes: each request's holes, counted on the host where they change, so decode forwards read no lengths
            back from the device (:mod:`sgl_evict.engine.hole_counts`).
        freed_slots, hidden_tokens: totals since start, for logs and tests.
        host_length_forwards, uncompacted_forwards: decode forwards whose kept lengths came from ``holes``, and
            those of them that read their rows uncompacted (no request skipped a position); for logs.
        freed_group_slots: ``--kv-evict-granularity per_layer``: group-slots freed since start.
        restored_tokens: history ``restore``: evicted tokens brought back from host memory since start.
    """

    config: EvictionConfig = field(default_factory=EvictionConfig)
    capture: WindowQueryCapture | None = None
    shadow_offset: int | None = None
    rope: RopeSpec | None = None
    value_norm_factors: dict[int, torch.Tensor] | None = None
    forward_id: int = 0
    decode_capture: DecodeQueryCapture | None = None
    pending: dict[str, PendingLookahead] = field(default_factory=dict)
    protected_recent: int = 0
    window_layers: frozenset[int] = frozenset()
    soft_tokens: ServedSoftTokens | None = None
    holes: HoleCounts = field(default_factory=HoleCounts)
    freed_slots: int = 0
    hidden_tokens: int = 0
    freed_group_slots: int = 0
    host_length_forwards: int = 0
    uncompacted_forwards: int = 0
    restored_tokens: int = 0

    def configure(self, config: EvictionConfig) -> None:
        self.config = config
        self.capture = WindowQueryCapture(config.window) if config.enabled else None
        # any request of an evicting server may ask for laq, so every evicting server can capture decode queries
        self.decode_capture = DecodeQueryCapture() if config.enabled else None
        self.pending = {}
        self.holes = HoleCounts()
        self.protected_recent = 0  # the scheduler sets it once the model is known
        self.window_layers = frozenset()  # likewise
        self.soft_tokens = None  # likewise

    def pending_of(self, req) -> PendingLookahead | None:
        """The pending laq entry of SGLang's ``req`` (None when it has none)."""
        entry = self.pending.get(req.rid)
        return entry if entry is not None and entry.req is req else None

    @property
    def enabled(self) -> bool:
        return self.config.enabled

    def config_of(self, req) -> EvictionConfig:
        """The config of one SGLang ``Req``: the server's, with the request's ``custom_params["kv_evict"]``.

        Requests are validated when they are built (``patches/radix_cache.py`` aborts a bad one with its message),
        so an override that fails here was never admitted; it falls back to the server's config rather than stop
        the scheduler.
        """
        try:
            return request_config(self.config, req.sampling_params.custom_params)
        except ValueError as err:
            logger.warning("request %s: ignoring invalid kv_evict override (%s)", req.rid, err)
            return self.config


def request_config(server: EvictionConfig, custom_params) -> EvictionConfig:
    """One request's config: ``server`` with ``custom_params["kv_evict"]`` applied (SGLang's sampling params).

    ValueError, its message naming the field, for an invalid override, for
    eviction asked of a server started without it (that server built no shadow rows and captures nothing), and for
    judgeq asked of a server without a soft-token file or with a file of the request's own (the server loads one
    file, checked against its model, at start).
    """
    params = custom_params if isinstance(custom_params, dict) else None
    raw = params.get("kv_evict") if params else None
    if isinstance(raw, dict):
        if "soft_tokens" in raw and raw["soft_tokens"] != server.soft_tokens:
            raise ValueError("soft_tokens: set by the server (--kv-evict-soft-tokens), not per request")
        name = raw.get("policy")
        asked = POLICIES.get(name) if isinstance(name, str) else None  # an unknown name fails in override
        if asked is not None and asked.uses("soft_token_queries") and not server.soft_tokens:
            raise ValueError(f"policy: {name!r} needs a server started with --kv-evict-soft-tokens FILE (soft "
                             "tokens trained for its model); this one has none")
    config = server.override(params)
    if config.enabled and not server.enabled:
        raise ValueError("policy: this server was started without --kv-evict-policy, so it cannot evict per "
                         "request; start it with a policy (requests can still turn eviction off)")
    return config


STATE = EngineState()
