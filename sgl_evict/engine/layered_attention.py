"""``LayeredTritonAttnBackend``: SGLang's Triton attention over a layered KV pool, eager (issue 9, design step 4;
docs/design.md "Per-layer budgets: a layered KV pool"; built in the server by
``patches/layered_backend.py`` with ``--kv-evict-granularity per_layer``).

SGLang's ``TritonAttnBackend`` builds one ``ForwardMetadata`` per forward (``init_forward_metadata``: the read list
``kv_indptr [bs + 1]`` / ``kv_indices`` from the request rows, the split counts, scratch buffers) and every
layer's ``forward_decode`` / ``forward_extend`` reads ``self.forward_metadata`` at call time: the write location
(``KVWriteLoc``) and the read list. With a :class:`~sgl_evict.engine.layered_kv_pool.LayeredMHATokenToKVPool` the
rows hold logical slots, so this subclass, once per forward, derives **one metadata per layer group** from SGLang's:
the group's compacted read list (:func:`~sgl_evict.engine.group_kv_indices.group_kv_indices`, all groups in one
flat buffer) and the group's write locations (``out_cache_loc_full_physical``, which SGLang's backend already
hands to ``set_kv_buffer`` as ``KVWriteLoc.full_loc``). Per layer it only points ``self.forward_metadata`` at the
layer's group for the call. Everything else (split counts, scratch buffers, ``qo_indptr``) is SGLang's, shared by
the groups: the decode split count comes from the logical lengths, an upper bound of every group's length.

Sliding-window layers (Gemma 3, on the one shared pool: SGLang's hybrid SWA pool is off with eviction) read
SGLang's window list (``window_kv_indptr`` / ``window_kv_indices``: the last ``sliding_window_size`` entries of
each row), translated per group like the write locations (:meth:`LayeredTritonAttnBackend._window_indices`).

Eager decode and extend (prefill, chunks, a second turn over a compressed prefix) only: CUDA graphs are design
step 5, and speculative decoding, decode context parallelism, MLA and cross-layer KV sharing (``forward_extend``
without ``k``, which reads the pool by logical slot) are refused; the pool type check refuses SGLang's hybrid SWA
pool (``SWAKVPool``).
"""

from __future__ import annotations

import dataclasses

from sglang.srt.layers.attention.triton_backend import ForwardMetadata, TritonAttnBackend
from sglang.srt.model_executor.forward_batch_info import ForwardMode

from sgl_evict.engine.group_kv_indices import group_kv_indices, translate_kv_indices
from sgl_evict.engine.layered_kv_pool import LayeredMHATokenToKVPool

_EAGER_MODES = (ForwardMode.DECODE, ForwardMode.IDLE, ForwardMode.EXTEND, ForwardMode.MIXED)


class LayeredTritonAttnBackend(TritonAttnBackend):
    """``TritonAttnBackend`` whose layers read and write their own group's group-slots; same arguments."""

    def __init__(self, model_runner, skip_prefill: bool = False, kv_indptr_buf=None):
        super().__init__(model_runner, skip_prefill, kv_indptr_buf)
        if not isinstance(self.token_to_kv_pool, LayeredMHATokenToKVPool):
            raise TypeError(f"LayeredTritonAttnBackend needs a LayeredMHATokenToKVPool, got "
                            f"{type(self.token_to_kv_pool).__name__}")
        if self.dcp_size > 1 or self.use_mla:
            raise NotImplementedError("LayeredTritonAttnBackend: decode context parallelism and MLA are not built")
        self.group_metadata: list[ForwardMetadata] = []

    def init_forward_metadata(self, forward_batch) -> None:
        if forward_batch.forward_mode not in _EAGER_MODES or forward_batch.spec_info is not None:
            raise NotImplementedError(f"LayeredTritonAttnBackend: forward mode {forward_batch.forward_mode} "
                                      f"(speculative decoding) is not built")
        super().init_forward_metadata(forward_batch)
        self.group_metadata = []
        if forward_batch.batch_size == 0:  # idle: no layer attends
            return
        pool = self.token_to_kv_pool
        base = self.forward_metadata
        indptr, indices = group_kv_indices(pool.group_map, base.kv_indptr, base.kv_indices)
        out_cache_loc = forward_batch.out_cache_loc
        self.group_metadata = [
            dataclasses.replace(base, kv_indptr=indptr[group], kv_indices=indices,
                                window_kv_indices=self._window_indices(group),
                                out_cache_loc_full_physical=translate_kv_indices(pool.group_map, group, out_cache_loc))
            for group in range(pool.num_groups)]

    def _window_indices(self, group: int):
        """The sliding-window layers' read list in ``group``, ``[window_kv_indptr[bs]]`` group-slots (None without
        sliding-window layers): SGLang's list (the last ``sliding_window_size`` entries of each compacted row,
        logical slots) translated, not compacted.
        Every group keeps the prompt's last ``protected_recent`` tokens and every later token, and a radix match
        is cut where a group dropped part of its tail (``patches/radix_cache.py``), so each entry is live in every
        group: lengths, ``window_kv_indptr`` and ``window_kv_offsets`` (the extend kernel's mask) stay SGLang's."""
        window = self.forward_metadata.window_kv_indices
        if window is None:
            return None
        return translate_kv_indices(self.token_to_kv_pool.group_map, group, window)

    def init_cuda_graph_state(self, *args, **kwargs):
        raise NotImplementedError("LayeredTritonAttnBackend: CUDA graphs are design step 5")

    def forward_decode(self, q, k, v, layer, forward_batch, *args, **kwargs):
        return self._in_group(layer, super().forward_decode, q, k, v, layer, forward_batch, *args, **kwargs)

    def forward_extend(self, q, k, v, layer, forward_batch, *args, **kwargs):
        if k is None:
            raise NotImplementedError("LayeredTritonAttnBackend: cross-layer KV sharing is not built")
        return self._in_group(layer, super().forward_extend, q, k, v, layer, forward_batch, *args, **kwargs)

    def _in_group(self, layer, forward, *args, **kwargs):
        """Runs SGLang's per-layer ``forward`` with the metadata of ``layer``'s group."""
        shared = self.forward_metadata
        self.forward_metadata = self.group_metadata[self.token_to_kv_pool.group_of_layer(layer.layer_id)]
        try:
            return forward(*args, **kwargs)
        finally:
            self.forward_metadata = shared
