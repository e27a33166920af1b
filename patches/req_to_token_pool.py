"""Shadow rows for compacted attention: ``sglang.srt.mem_cache.memory_pool.ReqToTokenPool.__init__`` (AFTER).

Attention backends keep a reference to ``req_to_token`` itself (also inside CUDA graphs), so the compacted view
of a request's row must live in the same tensor. With eviction on, the table is doubled: row ``r`` keeps the
logical slots (holes included, what the scheduler and radix cache use) and row ``r + offset`` the kept slots in
order, rewritten before each forward (:mod:`sgl_evict.engine.compact_view`). Only ``size`` rows are handed to
requests. Cost: one more int32 ``[rows, max_context_len]`` table.
"""

from __future__ import annotations

import torch

from sgl_evict.engine.runtime import STATE


def init_after(result, self, *args, **kwargs):
    if not STATE.enabled:
        return
    rows = self.req_to_token.shape[0]
    self.req_to_token = torch.zeros((2 * rows, self.req_to_token.shape[1]), dtype=self.req_to_token.dtype,
                                    device=self.req_to_token.device)
    STATE.shadow_offset = rows
