"""The scheduler process's eviction state, shared by the hooks in ``patches/``.

SGLang runs one scheduler (with its model runner) per process, so one module-level :class:`EngineState` is
enough: the scheduler hook sets the server's config before the pools are built, the pool hook reads it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from sgl_evict.config import EvictionConfig
from sgl_evict.engine.capture import WindowQueryCapture

logger = logging.getLogger("sgl_evict")


@dataclass
class EngineState:
    """Attributes:
        config: the server's eviction config (flags); requests may override it.
        capture: window queries of the forward being run (None when no policy needs queries).
        shadow_offset: row offset of the compacted shadow rows in ``req_to_token`` (None before the pool is
            built, or when eviction is off).
        forward_id: counts forwards, so eviction uses the queries of its own batch only.
        freed_slots, hidden_tokens: totals since start, for logs and tests.
    """

    config: EvictionConfig = field(default_factory=EvictionConfig)
    capture: WindowQueryCapture | None = None
    shadow_offset: int | None = None
    forward_id: int = 0
    freed_slots: int = 0
    hidden_tokens: int = 0

    def configure(self, config: EvictionConfig) -> None:
        self.config = config
        self.capture = WindowQueryCapture(config.window) if config.enabled else None

    @property
    def enabled(self) -> bool:
        return self.config.enabled

    def config_of(self, req) -> EvictionConfig:
        """The config of one SGLang ``Req``: the server's, with the request's ``custom_params["kv_evict"]``.

        Requests are validated on arrival (``patches/scheduler.py``), so an override that fails here was never
        admitted; it falls back to the server's config rather than stop the scheduler.
        """
        params = getattr(req.sampling_params, "custom_params", None)
        try:
            return self.config.override(params)
        except ValueError as err:
            logger.warning("request %s: ignoring invalid kv_evict override (%s)", req.rid, err)
            return self.config


STATE = EngineState()
