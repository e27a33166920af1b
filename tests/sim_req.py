"""A stand-in for SGLang's ``Req`` in the radix-cache tests (tests/sglang/test_radix_holes.py and
test_layered_radix.py): the fields ReqToTokenPool and RadixCache.cache_{un,}finished_req read and write."""

import dataclasses
from array import array

import torch


@dataclasses.dataclass
class SimReq:
    """The fields of SGLang's Req that ReqToTokenPool and RadixCache.cache_{un,}finished_req read and write."""

    origin_input_ids: array
    extra_key: str | None
    rid: str = "req"
    output_ids: array = dataclasses.field(default_factory=lambda: array("q"))
    req_pool_idx: int | None = None
    cache_protected_len: int = 0
    last_node: object = None
    prefix_indices: torch.Tensor = None
    priority: int = 0
    inflight_middle_chunks: int = 0
    kv_committed_len: int = 0

    def get_fill_ids(self) -> array:
        return self.origin_input_ids + self.output_ids
