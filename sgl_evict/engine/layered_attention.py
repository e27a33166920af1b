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

**Decode CUDA graphs** (design step 5): a replayed graph runs no Python, so nothing can be derived per forward on
the host, and G groups' lists side by side would need G static buffers of SGLang's ``max_num_tokens x
context_len`` entries. Instead each group's decode metadata is built **inside the graph**, into one set of static
buffers the groups take in turn (layers run in order, so group g's lists are read only before group g + 1 rebuilds
them): at the group's first layer its write locations (``group_map[g, out_cache_loc]``) go to
``cuda_graph_group_out_loc``; at its first full-attention layer its read list is built by
:func:`~sgl_evict.kernels.group_indices.fill_group_kv_indices` (one program per request walks the row: no host sync,
fixed launch shapes) into ``cuda_graph_group_kv_indptr`` and SGLang's own ``cuda_graph_kv_indices`` (which then
holds no logical list anyone reads); at its first sliding-window layer SGLang's window list is translated into
``cuda_graph_group_window_kv_indices``. Replay preparation outside the graph is SGLang's alone (request rows, window
list, split counts). The memory of these buffers is in docs/design.md, step 5.

Decode (eager and CUDA graphs) and eager extend (prefill, chunks, a second turn over a compressed prefix) only:
speculative decoding, decode context parallelism, MLA and cross-layer KV sharing (``forward_extend`` without ``k``,
which reads the pool by logical slot) are refused; the pool type check refuses SGLang's hybrid SWA pool
(``SWAKVPool``).
"""

from __future__ import annotations

import dataclasses

import torch
from sglang.srt.layers.attention.triton_backend import ForwardMetadata, TritonAttnBackend
from sglang.srt.model_executor.forward_batch_info import ForwardMode

from sgl_evict.engine.group_kv_indices import group_kv_indices, translate_kv_indices
from sgl_evict.engine.layered_kv_pool import LayeredMHATokenToKVPool
from sgl_evict.kernels.group_indices import fill_group_kv_indices

_EAGER_MODES = (ForwardMode.DECODE, ForwardMode.IDLE, ForwardMode.EXTEND, ForwardMode.MIXED)
_GRAPH_MODES = (ForwardMode.DECODE, ForwardMode.IDLE)


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
        # the metadata every group's layers read inside a decode CUDA graph (one set of buffers, refilled per
        # group), set at capture; None in eager forwards
        self.graph_metadata: ForwardMetadata | None = None
        self._graph_filled: tuple[int | None, set[bool]] = (None, set())

    def init_forward_metadata(self, forward_batch) -> None:
        _check_supported(forward_batch, _EAGER_MODES)
        super().init_forward_metadata(forward_batch)
        self.graph_metadata = None
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
        is cut where a group dropped part of its tail (``engine/hole_radix_cache.py``), so each entry is live in every
        group: lengths, ``window_kv_indptr`` and ``window_kv_offsets`` (the extend kernel's mask) stay SGLang's."""
        window = self.forward_metadata.window_kv_indices
        if window is None:
            return None
        return translate_kv_indices(self.token_to_kv_pool.group_map, group, window)

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int, kv_indices_buf=None,
                              cuda_graph_num_kv_splits_buf=None):
        """SGLang's static buffers, plus one group's decode metadata: ``cuda_graph_group_kv_indptr [max_bs + 1]``
        int32, ``cuda_graph_group_counts [max_bs]`` int32 (scratch), ``cuda_graph_group_out_loc [max_num_tokens]``
        int64 and, with sliding-window layers, ``cuda_graph_group_window_kv_indices`` (SGLang's window buffer's
        shape). The group's read list reuses SGLang's ``cuda_graph_kv_indices [max_num_tokens x context_len]``."""
        if kv_indices_buf is not None or cuda_graph_num_kv_splits_buf is not None:
            # only TritonMultiStepDraftBackend shares buffers across backends: speculative decoding
            raise NotImplementedError("LayeredTritonAttnBackend: speculative decoding is not built")
        super().init_cuda_graph_state(max_bs, max_num_tokens)
        self.cuda_graph_group_kv_indptr = torch.zeros(max_bs + 1, dtype=torch.int32, device=self.device)
        self.cuda_graph_group_counts = torch.zeros(max_bs, dtype=torch.int32, device=self.device)
        self.cuda_graph_group_out_loc = torch.zeros(max_num_tokens, dtype=torch.int64, device=self.device)
        self.cuda_graph_group_window_kv_indices = None
        if self.sliding_window_size is not None and self.sliding_window_size > 0:
            self.cuda_graph_group_window_kv_indices = torch.zeros_like(self.cuda_graph_window_kv_indices)

    def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False):
        """SGLang's replay preparation (request rows, window list, split counts into its static buffers); at
        capture also the metadata the captured layers read, pointing at the group buffers."""
        _check_supported(forward_batch, _GRAPH_MODES)
        super().init_forward_metadata_out_graph(forward_batch, in_capture)
        if not in_capture:
            return
        bs, tokens = forward_batch.batch_size, forward_batch.out_cache_loc.shape[0]
        window = self.cuda_graph_group_window_kv_indices
        self.graph_metadata = dataclasses.replace(
            self.forward_metadata, kv_indptr=self.cuda_graph_group_kv_indptr[:bs + 1],
            window_kv_indices=window if self.forward_metadata.window_kv_indices is not None else None,
            out_cache_loc_full_physical=self.cuda_graph_group_out_loc[:tokens])
        self._graph_filled = (None, set())

    def init_forward_metadata_in_graph(self, forward_batch) -> None:
        # a new forward (warmup or capture): the group buffers hold the last forward's last group
        self._graph_filled = (None, set())

    def _fill_graph_group(self, group: int, sliding: bool, forward_batch) -> None:
        """Builds what ``group``'s layer reads into the group buffers unless this forward already did: the write
        locations at the group's first layer, each kind of read list (full, window) at its first layer of that
        kind. Device ops over the batch's static buffers only, recorded into the graph at capture."""
        filled_group, kinds = self._graph_filled
        group_map = self.token_to_kv_pool.group_map
        if filled_group != group:
            out_cache_loc = forward_batch.out_cache_loc
            self.cuda_graph_group_out_loc[:out_cache_loc.shape[0]].copy_(
                translate_kv_indices(group_map, group, out_cache_loc))
            filled_group, kinds = group, set()
            self._graph_filled = (filled_group, kinds)
        if sliding in kinds:
            return
        kinds.add(sliding)
        bs = forward_batch.batch_size
        if sliding:  # every window entry is live in every group (the tail invariant): translated, not compacted
            window = self.cuda_graph_window_kv_indices[:bs * self.sliding_window_size]
            self.cuda_graph_group_window_kv_indices[:window.shape[0]].copy_(
                translate_kv_indices(group_map, group, window))
        else:
            fill_group_kv_indices(self.req_to_token, forward_batch.req_pool_indices, forward_batch.seq_lens,
                                  group_map[group], self.cuda_graph_group_kv_indptr[:bs + 1],
                                  self.cuda_graph_kv_indices, self.cuda_graph_group_counts[:bs])

    def forward_decode(self, q, k, v, layer, forward_batch, *args, **kwargs):
        group = self.token_to_kv_pool.group_of_layer(layer.layer_id)
        if self.graph_metadata is None:
            metadata = self.group_metadata[group]
        else:
            self._fill_graph_group(group, _is_sliding(layer), forward_batch)
            metadata = self.graph_metadata
        return self._with(metadata, super().forward_decode, q, k, v, layer, forward_batch, *args, **kwargs)

    def forward_extend(self, q, k, v, layer, forward_batch, *args, **kwargs):
        if k is None:
            raise NotImplementedError("LayeredTritonAttnBackend: cross-layer KV sharing is not built")
        metadata = self.group_metadata[self.token_to_kv_pool.group_of_layer(layer.layer_id)]
        return self._with(metadata, super().forward_extend, q, k, v, layer, forward_batch, *args, **kwargs)

    def _with(self, metadata: ForwardMetadata, forward, *args, **kwargs):
        """Runs SGLang's per-layer ``forward`` with ``metadata`` (the layer's group's)."""
        shared = self.forward_metadata
        self.forward_metadata = metadata
        try:
            return forward(*args, **kwargs)
        finally:
            self.forward_metadata = shared


def _check_supported(forward_batch, modes) -> None:
    if forward_batch.forward_mode not in modes or forward_batch.spec_info is not None:
        raise NotImplementedError(f"LayeredTritonAttnBackend: forward mode {forward_batch.forward_mode} "
                                  f"(speculative decoding) is not built")


def _is_sliding(layer) -> bool:
    """Whether ``layer`` reads the window list, as SGLang's ``forward_decode`` decides."""
    return layer.sliding_window_size is not None and layer.sliding_window_size > -1
