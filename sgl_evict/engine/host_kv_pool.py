"""Evicted tokens' K and V kept in host memory, by host slot: storage and transfers, no ownership.

Issue 25 (reversible eviction): before an evicted token's device slot is freed its K and V are copied here, so a
later turn can score the token again and bring it back. The pool holds, per layer of SGLang's device pool
(``MHATokenToKVPool``), ``[capacity, num_kv_heads, head_dim]`` K and V in the device pool's storage dtype (FP8
pools store bytes), pinned when the device is CUDA. Who owns a host slot (a request, a radix-tree node) is
:class:`~sgl_evict.engine.reversible_radix_cache.ReversibleRadixCache`'s business, not this class's.

Transfers are torch indexing on the current stream, one layer at a time: device gather, one copy across, host
scatter. They synchronise with the host (the copy must finish before its device slots are freed and reused);
SGLang's HiCache transfer kernels (``sgl_kernel.kvcacheio``) and a side stream are the faster path, not built yet.
"""

from __future__ import annotations

import os

import torch

#: the device pool's buffer layouts whose rows are whole tokens (``[slots, heads, dim]``): the ones copied here
ROW_LAYOUTS = (None, "nhd", "NHD", "default")


class HostKVPool:
    """``capacity`` host slots of K and V for every layer of one device pool.

    Args:
        capacity: host slots (tokens); slot ids are ``0 .. capacity - 1``.
        layer_num: the device pool's layers (``k_buffer`` has one tensor per layer).
        head_num, head_dim, v_head_dim: a token's K ``[head_num, head_dim]`` and V ``[head_num, v_head_dim]``.
        store_dtype: the device pool's storage dtype (``uint8`` for FP8 pools).
        pin: page-lock the host buffers (CUDA only: faster and asynchronous copies).
    """

    def __init__(self, capacity: int, layer_num: int, head_num: int, head_dim: int, v_head_dim: int,
                 store_dtype: torch.dtype, pin: bool = False):
        if capacity < 1:
            raise ValueError(f"host KV pool: capacity must be at least 1 token, got {capacity}")
        self.capacity = capacity
        self.k = torch.empty((layer_num, capacity, head_num, head_dim), dtype=store_dtype, pin_memory=pin)
        self.v = torch.empty((layer_num, capacity, head_num, v_head_dim), dtype=store_dtype, pin_memory=pin)
        self._free = torch.arange(capacity, dtype=torch.int64)

    @classmethod
    def for_device_pool(cls, device_pool, host_bytes: int, available: int | None = None) -> "HostKVPool":
        """A pool of as many tokens as ``host_bytes`` hold, shaped like SGLang's ``device_pool``
        (``MHATokenToKVPool``). ValueError, naming the flag, when ``host_bytes`` holds no token or is more than
        the host's ``available`` bytes (default: what the OS reports free now), or when the pool's rows are not
        tokens."""
        available = available_host_bytes() if available is None else available
        if host_bytes > available:
            raise ValueError(f"--kv-evict-host-pool-gb: {host_bytes / 2**30:.1f} GiB asked, but this host has "
                             f"{available / 2**30:.1f} GiB of memory available")
        layout = getattr(device_pool, "kv_cache_layout", None)
        if layout not in ROW_LAYOUTS or getattr(device_pool, "use_hnd", False):
            raise ValueError(f"--kv-evict-host-pool-gb: the device pool's layout {layout!r} does not store one row "
                             "per token")
        k, v = device_pool.k_buffer[0], device_pool.v_buffer[0]
        per_token = len(device_pool.k_buffer) * (k[0].numel() + v[0].numel()) * k.element_size()
        capacity = host_bytes // per_token
        if capacity < 1:
            raise ValueError(f"--kv-evict-host-pool-gb: {host_bytes} bytes hold no token ({per_token} bytes a "
                             "token)")
        return cls(capacity, len(device_pool.k_buffer), k.shape[1], k.shape[2], v.shape[2], k.dtype,
                   pin=k.is_cuda)

    @property
    def bytes_per_token(self) -> int:
        return (self.k[:, 0].numel() + self.v[:, 0].numel()) * self.k.element_size()

    # ---- host slots ----

    def available_size(self) -> int:
        return self._free.numel()

    def alloc(self, n: int) -> torch.Tensor | None:
        """``[n]`` int64 free host slots, or None when fewer than ``n`` are free."""
        if n > self._free.numel():
            return None
        slots, self._free = self._free[:n], self._free[n:]
        return slots

    def free(self, slots: torch.Tensor) -> None:
        """Returns host slots (``[n]`` int, any device; entries < 0 are ignored)."""
        slots = slots.to("cpu", torch.int64)
        slots = slots[slots >= 0]
        if slots.numel():
            self._free = torch.cat((self._free, slots))

    def clear(self) -> None:
        """Every host slot free again (``/flush_cache``)."""
        self._free = torch.arange(self.capacity, dtype=torch.int64)

    # ---- transfers ----

    def save(self, device_pool, device_slots: torch.Tensor, host_slots: torch.Tensor) -> None:
        """Copies every layer's K and V of ``device_slots [n]`` into ``host_slots [n]``; returns once the copy is
        done, so the device slots may be freed and rewritten."""
        index = host_slots.to("cpu", torch.int64)
        for layer, (k, v) in enumerate(zip(device_pool.k_buffer, device_pool.v_buffer)):
            self.k[layer].index_copy_(0, index, k[device_slots].to("cpu"))
            self.v[layer].index_copy_(0, index, v[device_slots].to("cpu"))

    def load(self, device_pool, host_slots: torch.Tensor, device_slots: torch.Tensor) -> None:
        """Copies every layer's K and V of ``host_slots [n]`` into the device pool's ``device_slots [n]``."""
        index = host_slots.to("cpu", torch.int64)
        for layer, (k, v) in enumerate(zip(device_pool.k_buffer, device_pool.v_buffer)):
            k[device_slots] = self.k[layer][index].to(k.device, non_blocking=True)
            v[device_slots] = self.v[layer][index].to(v.device, non_blocking=True)

    def keys(self, layer: int, host_slots: torch.Tensor, device: torch.device | str) -> torch.Tensor:
        """``[n, head_num, head_dim]`` K of ``host_slots`` in one layer (the device pool's storage dtype), on
        ``device``."""
        return self.k[layer][host_slots.to("cpu", torch.int64)].to(device, non_blocking=True)

    def values(self, layer: int, host_slots: torch.Tensor, device: torch.device | str) -> torch.Tensor:
        """``[n, head_num, v_head_dim]`` V of ``host_slots`` in one layer, as :meth:`keys` (laprox weighs each
        token's attention by its value's norm through ``W_o``)."""
        return self.v[layer][host_slots.to("cpu", torch.int64)].to(device, non_blocking=True)


def available_host_bytes() -> int:
    """Host memory free now, as the OS reports it (Linux ``MemAvailable``; elsewhere the free physical pages)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
