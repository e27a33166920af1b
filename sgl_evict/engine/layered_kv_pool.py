"""``LayeredMHATokenToKVPool``: the KV storage of issue 9's layered pool (docs/design.md "Per-layer budgets: a
layered KV pool", section 2; design step 4; built in the server by ``patches/layered_pool.py``
with ``--kv-evict-granularity per_layer``).

SGLang's ``MHATokenToKVPool`` keeps one ``[size + 1, head_num, head_dim]`` K (and V) buffer per layer, all indexed
by one slot id. Here the slot ids are **group-slots** of one heap shared by the G layer groups (handed out by
:class:`~sgl_evict.engine.layered_allocator.LayeredTokenToKVPoolAllocator`): a group-slot holds one token's K/V for
the ``L / G`` consecutive layers of the group it was given to. Layer ``l`` belongs to group ``l // (L / G)`` (the
grouping of :mod:`sgl_evict.engine.group_keep`) and is layer ``l % (L / G)`` inside it.

Layout: one heap tensor per K and V, ``[L / G, num_group_slots + 1, head_num, head_dim]``; layer ``l``'s buffer
``k_buffer[l]`` is ``heap[l % (L / G)]``, a contiguous ``[num_group_slots + 1, head_num, head_dim]`` tensor shaped
exactly like SGLang's per-layer buffer, so every kernel that reads or writes SGLang's buffers (Triton attention,
the store kernel) works unchanged. Layers ``j``, ``j + L/G``, ... of different groups share that tensor; they never
collide because a group-slot belongs to one group at a time. Memory is ``(num_group_slots + 1) x L / G`` rows, the
plain pool's ``(size + 1) x L`` when ``num_group_slots = G x size``.

Writes take **logical** slots, as SGLang's callers pass them (``out_cache_loc``), and land at
``group_map[group, loc]``; an attention backend that translated the write locations once per forward passes them
pre-translated as ``KVWriteLoc.full_loc`` (:mod:`sgl_evict.engine.layered_attention`). Reads are per-layer
buffers indexed by group-slots: the backend translates ``kv_indices`` per group
(:mod:`sgl_evict.engine.group_kv_indices`).

Subclass, not wrapper: the attention backends call the pool's own methods (``get_key_buffer``,
``set_kv_buffer``) and type-check it (``isinstance(pool, SWAKVPool)``); a subclass of ``MHATokenToKVPool`` is
read as a plain MHA pool everywhere, as SGLang's own ``PageMajorMHATokenToKVPool`` is. page_size 1, unquantized,
NHD only; what indexes the buffers by slot outside attention (CPU offload, PD transfer, slot moves) is refused.
"""

from __future__ import annotations

import torch
from sglang.srt.constants import GPU_MEMORY_TYPE_KV_CACHE
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, unwrap_write_loc

from sgl_evict.engine.group_kv_indices import translate_kv_indices


class LayeredMHATokenToKVPool(MHATokenToKVPool):
    """SGLang's MHA pool over group-slots of a shared heap; writes translate logical slots per layer group.

    Args:
        num_group_slots: group-slot ids ``1 .. num_group_slots`` (0 is the padding slot).
        num_groups: layer groups G; must divide ``layer_num``.
        dtype, head_num, head_dim, layer_num, device, enable_memory_saver, v_head_dim, start_layer, end_layer:
            as for ``MHATokenToKVPool``.
    """

    def __init__(self, num_group_slots: int, num_groups: int, dtype: torch.dtype, head_num: int, head_dim: int,
                 layer_num: int, device: str, enable_memory_saver: bool = False, v_head_dim: int | None = None,
                 start_layer: int | None = None, end_layer: int | None = None):
        if num_groups < 1 or layer_num % num_groups:
            raise ValueError(f"{num_groups} layer groups do not divide {layer_num} layers")
        self.num_groups = num_groups
        self.layers_per_group = layer_num // num_groups
        self.group_map: torch.Tensor | None = None
        # the tiled KV copy kernel moves slots by logical id; the layered pool refuses slot moves
        super().__init__(num_group_slots, 1, dtype, head_num, head_dim, layer_num, device, enable_memory_saver,
                         v_head_dim=v_head_dim, start_layer=start_layer, end_layer=end_layer,
                         enable_kv_cache_copy=False, kv_cache_layout="nhd")

    def _create_buffers(self):
        if self.is_quantized_kv_cache or self.post_capture_active:
            raise NotImplementedError("LayeredMHATokenToKVPool: quantized KV and post-capture backing are not built")
        self.k_scale_buffer = self.v_scale_buffer = self.dq_k_buffer = self.dq_v_buffer = None
        rows = self.size + self.page_size
        with self.memory_saver_adapter.region(GPU_MEMORY_TYPE_KV_CACHE):
            self.k_heap = torch.zeros((self.layers_per_group, rows, self.head_num, self.head_dim),
                                      dtype=self.store_dtype, device=self.device)
            self.v_heap = torch.zeros((self.layers_per_group, rows, self.head_num, self.v_head_dim),
                                      dtype=self.store_dtype, device=self.device)
        self.k_buffer = [self.k_heap[layer % self.layers_per_group] for layer in range(self.layer_num)]
        self.v_buffer = [self.v_heap[layer % self.layers_per_group] for layer in range(self.layer_num)]
        self._kv_buffer_descs = self._build_kv_buffer_descs()
        self._init_data_ptrs_and_strides()

    def register_group_map(self, group_map: torch.Tensor) -> None:
        """The allocator's ``[num_groups, size_logical + 2]`` int32 table (shared, updated in place by it)."""
        if group_map.shape[0] != self.num_groups:
            raise ValueError(f"group map has {group_map.shape[0]} groups, the pool {self.num_groups}")
        self.group_map = group_map

    def group_of_layer(self, layer_id: int) -> int:
        """The layer group of global layer ``layer_id``."""
        return (layer_id - self.start_layer) // self.layers_per_group

    def set_kv_buffer(self, layer, loc_info, cache_k: torch.Tensor, cache_v: torch.Tensor, k_scale=None,
                      v_scale=None, layer_id_override: int | None = None, dcp_kv_mask=None):
        """Writes ``cache_k [n, head_num, head_dim]`` / ``cache_v`` of logical slots ``loc [n]`` at their group-slots
        in the layer's group; ``KVWriteLoc.full_loc`` ``[n]``, when given, is those group-slots already."""
        if dcp_kv_mask is not None:
            raise NotImplementedError("LayeredMHATokenToKVPool: decode context parallelism is not built")
        loc, _, group_loc = unwrap_write_loc(loc_info)
        if group_loc is None:
            layer_id = layer_id_override if layer_id_override is not None else layer.layer_id
            group_loc = translate_kv_indices(self.group_map, self.group_of_layer(layer_id), loc)
        super().set_kv_buffer(layer, group_loc, cache_k, cache_v, k_scale, v_scale, layer_id_override)

    def get_kv_size_bytes(self):
        # k_buffer lists each heap tensor G times
        return (self.k_heap.numel() * self.k_heap.element_size(), self.v_heap.numel() * self.v_heap.element_size())

    # SGLang's paths below index the buffers by slot from outside attention (logical ids): refused, not mis-indexed

    def get_cpu_copy(self, indices, mamba_indices=None):
        raise NotImplementedError("LayeredMHATokenToKVPool: CPU offloading is not built")

    def load_cpu_copy(self, kv_cache_cpu, indices, mamba_indices=None):
        raise NotImplementedError("LayeredMHATokenToKVPool: CPU offloading is not built")

    def get_contiguous_buf_infos(self):
        raise NotImplementedError("LayeredMHATokenToKVPool: KV transfer (disaggregation) is not built")

    def move_kv_cache(self, tgt_loc: torch.Tensor, src_loc: torch.Tensor):
        raise NotImplementedError("LayeredMHATokenToKVPool: KV slot moves are not built")
