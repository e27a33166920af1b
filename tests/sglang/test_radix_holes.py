"""SGLang 0.5.17's real RadixCache, subclassed (HoleAwareRadixCache), and token allocators with holes (HOLE) in
KV index rows, through the plugin.

Everything here is SGLang's own code over a real CPU KV pool (MHATokenToKVPool on device "cpu"), with the tree of
sgl_evict/engine/hole_radix_cache.py and the hooks of patches/radix_cache.py applied the way a server applies them
(load_plugins). A simulated request goes through the
scheduler's steps: match_prefix, inc_lock_ref, evict-then-alloc, holes punched in its own part of the row (its slots
freed, as the engine does), then cache_unfinished_req / cache_finished_req.
"""

import dataclasses
from array import array
from types import SimpleNamespace

import pytest
from sglang_guard import sglang_or_skip
from sim_req import SimReq

with sglang_or_skip("sglang's radix cache"):
    import torch
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.mem_cache.allocator import PagedTokenToKVPoolAllocator, TokenToKVPoolAllocator
    from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InsertParams, MatchPrefixParams
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
    from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey
    from sglang.srt.plugins import load_plugins
    from sglang.srt.plugins.hook_registry import HookRegistry
    from sglang.srt.runtime_context import get_context, get_parallel
    from sglang.srt.sampling.sampling_params import SamplingParams

    from sgl_evict.engine.hole_radix_cache import HoleAwareRadixCache, build

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sgl_evict.config import RADIX_CACHE_BACKEND, EvictionConfig
from sgl_evict.holes import HOLE, count_live, live, namespaced_extra_key
from sgl_evict.patches import radix_cache as hooks
from sgl_evict.selection import Budget

load_plugins()  # what launch_server and every scheduler process do

COMPRESSED = EvictionConfig(policy="snapkv", budget=Budget.parse("0.5"))
OTHER_BUDGET = EvictionConfig(policy="snapkv", budget=Budget.parse("0.25"))
NS_COMPRESSED = namespaced_extra_key(None, COMPRESSED)
NAMESPACES = (None, NS_COMPRESSED)  # eviction off (never holes), eviction on (holes)


# ---- a real cache over a real CPU pool ---------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def evicting_process():
    """The hooks act only in a process whose server evicts (without eviction no hole can exist): this one does."""
    from sgl_evict.engine.runtime import STATE

    saved = STATE.config
    STATE.configure(COMPRESSED)
    yield STATE
    STATE.configure(saved)


class Pool:
    """The evicting server's tree (or ``tree``: SGLang's own) + allocator + req_to_token pool; ``slots`` real KV
    slots in pages of ``page_size``."""

    def __init__(self, page_size: int, slots: int, max_reqs: int = 4, max_len: int = 128,
                 tree=HoleAwareRadixCache):
        self.page_size = page_size
        self.slots = slots
        kv = MHATokenToKVPool(size=slots, page_size=page_size, dtype=torch.bfloat16, head_num=1, head_dim=4,
                              layer_num=1, device="cpu", enable_memory_saver=False)
        if page_size == 1:
            self.allocator = TokenToKVPoolAllocator(size=slots, dtype=torch.bfloat16, device="cpu", kvcache=kv,
                                                    need_sort=False)
        else:
            self.allocator = PagedTokenToKVPoolAllocator(size=slots, page_size=page_size, dtype=torch.bfloat16,
                                                         device="cpu", kvcache=kv, need_sort=False)
        self.req_to_token = ReqToTokenPool(size=max_reqs, max_context_len=max_len, device="cpu",
                                           enable_memory_saver=False)
        self.cache = tree(CacheInitParams(disable=False, req_to_token_pool=self.req_to_token,
                                                token_to_kv_pool_allocator=self.allocator, page_size=page_size))

    # -- what the allocator and the tree hold --

    def free_list(self) -> list[int]:
        """Free slots as the allocator would hand them out (pages expanded), duplicates kept."""
        pages = torch.cat((self.allocator.free_pages, self.allocator.release_pages)).tolist()
        if self.page_size == 1:
            return pages
        return [p * self.page_size + j for p in pages for j in range(self.page_size)]

    def all_slots(self) -> set[int]:
        # slot 0 (page 0) is SGLang's padding slot, never handed out
        return set(range(self.page_size, self.slots + self.page_size))

    def nodes(self):
        stack = list(self.cache.root_node.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def tree_live_slots(self) -> list[int]:
        return [s for node in self.nodes() for s in live(node.value).tolist()]

    def tree_content(self) -> dict:
        """{(extra_key, token prefix): tree value at the prefix's last position} for every token in the tree."""
        content = {}

        def walk(node, tokens):
            for child in node.children.values():
                path = tokens + tuple(child.key.token_ids)
                for i, value in enumerate(child.value.tolist()):
                    content[(child.key.extra_key, path[:len(tokens) + i + 1])] = value
                walk(child, path)

        walk(self.cache.root_node, ())
        return content

    def page_slots(self, slots: list[int]) -> set[int]:
        """Every slot of the pages the given slots lie in."""
        ps = self.page_size
        return {s // ps * ps + j for s in slots for j in range(ps)}

    # -- the scheduler's steps for one request --

    def match(self, tokens, extra_key, req=None):
        """``req``: the request being admitted (``Req.init_next_round_input`` passes it); None as SGLang's own
        re-matches do."""
        return self.cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", tokens), extra_key), req=req))

    def admit(self, tokens, extra_key, hole_units=()):
        """Matches, locks, evicts-then-allocates, writes the row and punches holes in the request's own part.

        ``hole_units``: indices of page-sized units after the matched prefix to evict (whole pages; only full
        units inside the prompt). Returns the request, or None when the pool cannot hold it (lock released).
        """
        req = SimReq(array("q", tokens), extra_key)
        match = self.match(tokens, extra_key, req)
        prefix = match.device_indices
        self.cache.inc_lock_ref(match.last_device_node)
        need = len(tokens) - len(prefix)
        need_slots = -(-need // self.page_size) * self.page_size
        self.evict_for(need_slots)
        new = self.allocator.alloc(need_slots) if need_slots else prefix[:0]
        if new is None:
            self.cache.dec_lock_ref(match.last_device_node)
            return None
        self.req_to_token.alloc([req])
        row = torch.cat((prefix, new[:need])).to(torch.int64)
        for unit in hole_units:
            start = len(prefix) + unit * self.page_size
            if start + self.page_size <= len(tokens):
                self.allocator.free(row[start:start + self.page_size].clone())  # the engine frees owned slots
                row[start:start + self.page_size] = HOLE
        self.req_to_token.write((req.req_pool_idx, slice(0, len(row))), row.to(torch.int32))
        req.cache_protected_len, req.last_node, req.prefix_indices = len(prefix), match.last_device_node, prefix
        return req

    def evict_for(self, need_slots: int):
        """SGLang's evict_from_tree_cache: evict the shortfall; free + evictable must be real memory."""
        available, evictable = self.allocator.available_size(), self.cache.evictable_size()
        if available >= need_slots:
            return
        self.cache.evict(EvictParams(num_tokens=need_slots - available))
        if available + evictable >= need_slots:
            assert self.allocator.available_size() >= need_slots, \
                f"admitted on {available} free + {evictable} evictable, but eviction left " \
                f"{self.allocator.available_size()} < {need_slots}"

    def row(self, req) -> torch.Tensor:
        return self.req_to_token.req_to_token[req.req_pool_idx, :len(req.origin_input_ids)].to(torch.int64)

    def owned_slots(self, req) -> set[int]:
        """Slots the request owns: its live entries from cache_protected_len on, with their whole pages."""
        return self.page_slots(live(self.row(req)[req.cache_protected_len:]).tolist())

    def finish(self, req):
        self.cache.cache_finished_req(req, kv_len_to_handle=len(req.origin_input_ids))
        self.req_to_token.free(req)


# ---- invariants --------------------------------------------------------------------------------------------------

def check_slots(pool: Pool, active_reqs):
    """Every slot is exactly one of: free, live in the tree, owned by a running request. No hole is free."""
    free = pool.free_list()
    assert all(s >= 0 for s in free), "a hole reached the allocator's free list"
    assert len(free) == len(set(free)), "a slot was freed twice"
    tree = pool.tree_live_slots()
    assert len(tree) == len(set(tree)), "a slot is in the tree twice"
    held = [s for req in active_reqs for s in pool.owned_slots(req)]
    assert len(held) == len(set(held)), "two requests own one slot"
    owners = [set(free), set(tree), set(held)]
    for i in range(3):
        for j in range(i + 1, 3):
            assert not owners[i] & owners[j], f"slots both {('free', 'tree', 'held')[i]} and {('free', 'tree', 'held')[j]}"
    assert set(free) | set(tree) | set(held) == pool.all_slots(), "slots leaked"


def check_counters(pool: Pool):
    """SGLang's memory counters count live slots, split by lock state."""
    live_tree = len(pool.tree_live_slots())
    locked = sum(count_live(node.value) for node in pool.nodes() if node.lock_ref > 0)
    assert pool.cache.evictable_size() + pool.cache.protected_size() == live_tree
    assert pool.cache.protected_size() == locked
    assert pool.cache.total_size() == live_tree


def check_prefixes_of_running_reqs_stay(pool: Pool, active_reqs):
    """Locked prefixes are never evicted: each running request's matched prefix still matches with its values."""
    for req in active_reqs:
        protected = req.cache_protected_len
        values = pool.match(list(req.origin_input_ids[:protected]), req.extra_key).device_indices
        assert torch.equal(values, pool.row(req)[:protected])


# ---- property-based: random request sequences in two namespaces ------------------------------------------------

PAGE_CASES = {1: dict(slots=24, max_units=10), 16: dict(slots=128, max_units=4)}


def tokens_of(units, tail, page_size):
    """Token ids of a sequence built from page-sized units (0..2) so that sequences share prefixes."""
    tokens = [u * page_size + j + 1 for u in units for j in range(page_size)]
    return tokens + [3 * page_size + j + 1 for j in range(tail)]


def operations(page_size):
    max_units = PAGE_CASES[page_size]["max_units"]
    sequence = st.tuples(st.lists(st.integers(0, 2), min_size=1, max_size=max_units),
                         st.integers(0, page_size - 1))
    return st.lists(st.one_of(
        st.tuples(st.just("start"), st.sampled_from(NAMESPACES), sequence,
                  st.sets(st.integers(0, max_units - 1), max_size=max_units)),
        st.tuples(st.just("chunk"), st.integers(0, 2)),
        st.tuples(st.just("finish"), st.integers(0, 2)),
        st.tuples(st.just("match"), st.sampled_from(NAMESPACES), sequence),
        st.tuples(st.just("evict"), st.integers(1, PAGE_CASES[page_size]["slots"] // 2)),
    ), min_size=4, max_size=30)


def run_operations(page_size, ops):
    pool = Pool(page_size, PAGE_CASES[page_size]["slots"])
    active = []
    expected = {}  # {(extra_key, token prefix): value}: what the tree must return, holes included

    def remember(req):
        """The tree keeps the first value inserted for a prefix; the request's row gives the rest."""
        key_len = len(req.origin_input_ids) // page_size * page_size
        tokens = tuple(req.origin_input_ids)
        for i, value in enumerate(pool.row(req)[:key_len].tolist()):
            expected.setdefault((req.extra_key, tokens[:i + 1]), value)

    for op in ops:
        may_evict = op[0] in ("start", "evict")
        if op[0] == "start" and len(active) < 3:
            _, ns, (units, tail), hole_units = op
            req = pool.admit(tokens_of(units, tail, page_size), ns, sorted(hole_units) if ns else ())
            if req is not None:
                active.append(req)
        elif op[0] == "chunk" and active:
            req = active[op[1] % len(active)]
            remember(req)
            pool.cache.cache_unfinished_req(req)
        elif op[0] == "finish" and active:
            req = active.pop(op[1] % len(active))
            remember(req)
            pool.finish(req)
        elif op[0] == "match":
            _, ns, (units, tail) = op
            tokens = tuple(tokens_of(units, tail, page_size))
            values = pool.match(list(tokens), ns).device_indices.tolist()
            assert len(values) % page_size == 0
            assert values == [expected[(ns, tokens[:i + 1])] for i in range(len(values))]
            longest = max([i + 1 for i in range(len(tokens)) if (ns, tokens[:i + 1]) in expected], default=0)
            assert len(values) == longest // page_size * page_size
            if ns is None:
                assert HOLE not in values, "an uncompressed request matched compressed KV"
        elif op[0] == "evict":
            before = pool.allocator.available_size()
            evictable = pool.cache.evictable_size()
            result = pool.cache.evict(EvictParams(num_tokens=op[1]))
            freed = pool.allocator.available_size() - before
            assert result.num_tokens_evicted == freed
            assert freed >= min(op[1], evictable)

        content = pool.tree_content()
        gone = expected.keys() - content.keys()
        assert may_evict or not gone, f"{op[0]} removed cached prefixes"
        for key in gone:
            del expected[key]
        assert content == expected
        check_slots(pool, active)
        check_counters(pool)
        check_prefixes_of_running_reqs_stay(pool, active)


# derandomize: CI sees the same examples every run (a failure found once is found again)
PROPERTY_SETTINGS = settings(max_examples=300, deadline=None, derandomize=True,
                             suppress_health_check=[HealthCheck.too_slow])


@PROPERTY_SETTINGS
@given(operations(1))
def test_random_request_sequences_keep_every_slot_accounted_for_page_size_1(ops):
    run_operations(1, ops)


@PROPERTY_SETTINGS
@given(operations(16))
def test_random_request_sequences_keep_every_slot_accounted_for_page_size_16(ops):
    run_operations(16, ops)


# ---- targeted: one per hook --------------------------------------------------------------------------------------

def test_plugin_hooks_the_allocators_and_requests_and_leaves_sglangs_tree_alone():
    assert not any(".RadixCache." in target for target in HookRegistry._patched), HookRegistry._patched
    assert f"{hooks.TOKEN_ALLOCATOR}.free" in HookRegistry._patched
    assert f"{hooks.PAGED_ALLOCATOR}._release_page_ids" in HookRegistry._patched
    assert f"{hooks.REQ}.__init__" in HookRegistry._patched


@pytest.mark.parametrize("page_size", [1, 16])
def test_sglangs_own_tree_counts_holes_as_memory_and_the_evicting_tree_only_live_slots(page_size):
    """Why the subclass exists: SGLang's RadixCache over the same rows would over-admit."""
    counts = {}
    for tree in (RadixCache, HoleAwareRadixCache):
        pool = Pool(page_size, slots=8 * page_size, tree=tree)
        req = pool.admit(list(range(1, 4 * page_size + 1)), NS_COMPRESSED, hole_units=(1, 2))
        pool.finish(req)
        counts[tree] = (pool.cache.evictable_size(), pool.cache.total_size())
    assert counts[RadixCache] == (4 * page_size, 4 * page_size)  # holes counted as if they held KV
    assert counts[HoleAwareRadixCache] == (2 * page_size, 2 * page_size)  # the slots it holds


def test_evicting_tree_evicts_live_slots_where_sglangs_stops_at_logical_tokens():
    freed = {}
    for tree in (RadixCache, HoleAwareRadixCache):
        pool = Pool(1, slots=32, tree=tree)
        for start in (0, 100):  # two leaves of 8 tokens, 4 live slots each
            pool.finish(pool.admit(list(range(start + 1, start + 9)), NS_COMPRESSED, hole_units=(1, 3, 5, 7)))
        available = pool.allocator.available_size()
        pool.cache.evict(EvictParams(num_tokens=6))
        freed[tree] = pool.allocator.available_size() - available
    assert freed[RadixCache] == 4  # one leaf: 8 logical tokens "evicted", 4 slots freed
    assert freed[HoleAwareRadixCache] == 8  # both leaves: at least the 6 slots asked for


def tree_build_context(radix_cache_backend, **overrides):
    """What SGLang's kv_cache_builder hands the radix-cache registry, over a real CPU pool."""
    from sglang.srt.mem_cache.registry import TreeCacheBuildContext

    pool = Pool(1, slots=16)
    params = CacheInitParams(disable=False, req_to_token_pool=pool.req_to_token,
                             token_to_kv_pool_allocator=pool.allocator, page_size=1)
    server_args = SimpleNamespace(radix_cache_backend=radix_cache_backend, enable_session_radix_cache=False,
                                  enable_streaming_session=False, enable_lmcache=False, enable_flexkv=False)
    fields = dict(server_args=server_args, params=params, is_hybrid_swa=False, is_hybrid_ssm=False,
                  enable_hierarchical_cache=False, disable_radix_cache=False, effective_chunked_prefill_size=None,
                  tp_worker=None, model_config=None, tp_size=1, tp_rank=0, tp_group=None)
    return TreeCacheBuildContext(**{**fields, **overrides})


def test_sglangs_registry_builds_the_hole_aware_tree_for_the_evicting_servers_backend():
    from sglang.srt.mem_cache.registry import create_tree_cache, registered_radix_cache_backends

    assert RADIX_CACHE_BACKEND in registered_radix_cache_backends()  # load_plugins registered it
    assert type(create_tree_cache(tree_build_context(RADIX_CACHE_BACKEND))) is HoleAwareRadixCache
    assert type(create_tree_cache(tree_build_context(None))) is RadixCache  # a plain server: SGLang's own


def test_the_hole_aware_backend_leaves_a_server_without_radix_cache_its_chunk_cache_and_refuses_other_trees():
    from sglang.srt.mem_cache.chunk_cache import ChunkCache

    chunked = tree_build_context(RADIX_CACHE_BACKEND, disable_radix_cache=True, effective_chunked_prefill_size=64)
    assert type(build(chunked)) is ChunkCache
    # without chunked prefill SGLang builds a disabled RadixCache: the subclass, which keeps a pending laq prompt
    unchunked = tree_build_context(RADIX_CACHE_BACKEND, disable_radix_cache=True)
    unchunked.params.disable = True
    assert type(build(unchunked)) is HoleAwareRadixCache and build(unchunked).disable
    for overrides, named in (({"enable_hierarchical_cache": True}, "--enable-hierarchical-cache"),
                             ({"is_hybrid_swa": True}, "--disable-hybrid-swa-memory"),
                             ({"is_hybrid_ssm": True}, "state-space")):
        with pytest.raises(ValueError, match=f"--radix-cache-backend {RADIX_CACHE_BACKEND}: .*{named}"):
            build(tree_build_context(RADIX_CACHE_BACKEND, **overrides))


def test_the_overridden_methods_are_the_ones_the_plugin_checks_sglang_for():
    from sgl_evict.plugin import SUBCLASSED

    overridden = {name for name, value in vars(HoleAwareRadixCache).items()
                  if callable(value) and not name.startswith("__") and hasattr(RadixCache, name)}
    checked = {s.rsplit(".", 1)[1] for s in SUBCLASSED if ".RadixCache." in s}
    assert overridden == checked


def row_with_hole_pages(pool, pages, hole_pages):
    """A freshly allocated row of ``pages`` pages whose ``hole_pages`` are holes (their slots kept aside)."""
    ps = pool.page_size
    row = pool.allocator.alloc(pages * ps).clone()
    for p in hole_pages:
        row[p * ps:(p + 1) * ps] = HOLE
    return row


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("free_path", ["free", "free_segment", "free_segments", "free_group"])
def test_every_free_path_skips_holes(page_size, free_path):
    pool = Pool(page_size, slots=8 * page_size)
    row = row_with_hole_pages(pool, pages=6, hole_pages=[0, 2, 5])
    available = pool.allocator.available_size()
    ps = page_size
    if free_path == "free":
        pool.allocator.free(row)
    elif free_path == "free_segment":  # a segment starting inside a hole page (start_pos not page aligned)
        pool.allocator.free_segment(row[ps - 1:] if ps > 1 else row, start_pos=ps - 1 if ps > 1 else 0)
        pool.allocator.free_segment(row[:ps - 1], start_pos=0)
    elif free_path == "free_segments":
        pool.allocator.free_segments([(row[:3 * ps], 0), (row[3 * ps:], 3 * ps)])
    else:
        pool.allocator.free_group_begin()
        pool.allocator.free(row[:2 * ps])
        pool.allocator.free_segment(row[2 * ps:], start_pos=2 * ps)
        pool.allocator.free_group_end()
    assert pool.allocator.available_size() == available + count_live(row)
    assert sorted(pool.free_list()) == sorted(set(pool.free_list())) and min(pool.free_list()) >= 0
    assert set(live(row).tolist()) <= set(pool.free_list())


@pytest.mark.parametrize("page_size", [1, 16])
def test_tree_counters_count_live_slots_through_insert_lock_unlock_evict(page_size):
    pool = Pool(page_size, slots=8 * page_size)
    row = row_with_hole_pages(pool, pages=4, hole_pages=[1, 2])
    tokens = list(range(1, 4 * page_size + 1))
    pool.cache.insert(InsertParams(key=RadixKey(array("q", tokens), NS_COMPRESSED), value=row))
    n_live = count_live(row)
    assert pool.cache.evictable_size() == n_live and pool.cache.total_size() == n_live

    # lock the first two pages only (a split keeps the holes in place): one live page protected
    match = pool.match(tokens[:2 * page_size], NS_COMPRESSED)
    assert torch.equal(match.device_indices, row[:2 * page_size])
    result = pool.cache.inc_lock_ref(match.last_device_node)
    assert result.delta == -page_size
    assert (pool.cache.evictable_size(), pool.cache.protected_size()) == (n_live - page_size, page_size)
    assert torch.equal(pool.match(tokens, NS_COMPRESSED).device_indices, row)

    # evict everything evictable: only the unlocked live page can go, and it is reported as live slots
    available = pool.allocator.available_size()
    assert pool.cache.evict(EvictParams(num_tokens=8 * page_size)).num_tokens_evicted == n_live - page_size
    assert pool.allocator.available_size() == available + n_live - page_size
    assert (pool.cache.evictable_size(), pool.cache.protected_size()) == (0, page_size)

    result = pool.cache.dec_lock_ref(match.last_device_node)
    assert result.delta == page_size
    assert (pool.cache.evictable_size(), pool.cache.protected_size()) == (page_size, 0)
    assert pool.cache.total_size() == page_size


@pytest.mark.parametrize("page_size", [1, 16])
def test_evict_frees_the_asked_live_slots_past_leaves_of_holes(page_size):
    pool = Pool(page_size, slots=8 * page_size)
    hole_prefix = row_with_hole_pages(pool, pages=3, hole_pages=[0, 1, 2])  # all holes: frees nothing
    live_tail = row_with_hole_pages(pool, pages=2, hole_pages=[])
    ps = page_size
    for i, row in enumerate((hole_prefix, live_tail)):
        tokens = [100 * (i + 1) + j for j in range(len(row))]
        pool.cache.insert(InsertParams(key=RadixKey(array("q", tokens), NS_COMPRESSED), value=row))
    for node in pool.nodes():  # the hole-only leaf is the least recently used
        if count_live(node.value) == 0:
            node.last_access_time = 0.0
    # SGLang alone would count the hole-only leaf's 3 pages as evicted and stop, having freed nothing
    available = pool.allocator.available_size()
    result = pool.cache.evict(EvictParams(num_tokens=ps))
    assert pool.allocator.available_size() - available == result.num_tokens_evicted >= ps


# ---- multi-turn and namespaces -----------------------------------------------------------------------------------

@pytest.mark.parametrize("page_size", [1, 16])
def test_second_turn_matches_first_turn_with_its_holes_only_in_its_namespace(page_size):
    pool = Pool(page_size, slots=16 * page_size)
    turn1 = list(range(1, 5 * page_size + 1))
    req = pool.admit(turn1, NS_COMPRESSED, hole_units=[1, 3])
    row1 = pool.row(req).clone()
    assert count_live(row1) == 3 * page_size
    pool.finish(req)

    turn2 = turn1 + list(range(1000, 1000 + 3 * page_size))
    match = pool.match(turn2, NS_COMPRESSED)
    assert torch.equal(match.device_indices, row1)  # full logical length of turn 1, same holes
    for other in (None, namespaced_extra_key(None, OTHER_BUDGET), namespaced_extra_key("salt", COMPRESSED)):
        assert len(pool.match(turn2, other).device_indices) == 0

    req2 = pool.admit(turn2, NS_COMPRESSED, hole_units=[0])
    assert req2.cache_protected_len == len(turn1)
    assert torch.equal(pool.row(req2)[:len(turn1)], row1)
    pool.finish(req2)
    check_slots(pool, [])
    check_counters(pool)


# ---- cache_finished_req / cache_unfinished_req with holes in the request's row -----------------------------------

@pytest.mark.parametrize("page_size", [1, 16])
def test_finished_duplicate_frees_exactly_its_own_live_slots(page_size):
    pool = Pool(page_size, slots=16 * page_size)
    tokens = list(range(1, 4 * page_size + 1)) + list(range(500, 500 + page_size // 2))  # unaligned tail
    first = pool.admit(tokens, NS_COMPRESSED, hole_units=[1])
    second = pool.admit(tokens, NS_COMPRESSED, hole_units=[0, 2])  # same prompt, running at the same time
    pool.finish(first)
    own = pool.owned_slots(second)
    available = pool.allocator.available_size()
    tree = pool.tree_content()
    pool.finish(second)  # its whole aligned prefix is now a duplicate of the tree's, the tail is unaligned
    assert pool.allocator.available_size() == available + len(own)
    assert own <= set(pool.free_list())
    assert pool.tree_content() == tree
    check_slots(pool, [])
    check_counters(pool)


@pytest.mark.parametrize("page_size", [1, 16])
def test_unfinished_req_frees_duplicates_and_takes_the_trees_holes(page_size):
    pool = Pool(page_size, slots=16 * page_size)
    tokens = list(range(1, 4 * page_size + 1))
    first = pool.admit(tokens, NS_COMPRESSED, hole_units=[1])
    second = pool.admit(tokens, NS_COMPRESSED, hole_units=[0, 2])
    pool.finish(first)
    own = pool.owned_slots(second)
    available = pool.allocator.available_size()
    pool.cache.cache_unfinished_req(second)  # a chunked prefill step caches what it has
    assert pool.allocator.available_size() == available + len(own)
    assert torch.equal(pool.row(second), pool.match(tokens, NS_COMPRESSED).device_indices)
    assert second.cache_protected_len == len(tokens) and pool.owned_slots(second) == set()
    check_slots(pool, [second])
    check_counters(pool)
    available = pool.allocator.available_size()
    pool.finish(second)  # nothing of its own is left to free
    assert pool.allocator.available_size() == available
    check_slots(pool, [])
    check_counters(pool)


# ---- laq: a pending request keeps its prompt until it is evicted after its lookahead steps ----------------------

LAQ = EvictionConfig(policy="laq", budget=Budget(tokens=10), window=4, sinks=2, lookahead_steps=2)
NS_LAQ = namespaced_extra_key(None, LAQ)


def pending_laq_request(pool, evicting_process):
    """A laq request of 40 tokens after prefill, its first 8 matched from a finished request, marked pending."""
    from types import SimpleNamespace

    from sgl_evict.engine.lookahead import PendingLookahead

    evicting_process.configure(LAQ)
    tokens = list(range(1, 41))
    pool.finish(pool.admit(tokens[:8], NS_LAQ))
    req = pool.admit(tokens, NS_LAQ)
    req.rid, req.sampling_params = "laq-req", SimpleNamespace(custom_params=None)
    assert req.cache_protected_len == 8
    visible = torch.ones(40, dtype=torch.bool)
    visible[10:30] = False
    window_queries = {0: torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(0))}  # [q_heads, window, dim]
    evicting_process.pending[req.rid] = PendingLookahead(req, 40, window_queries, visible, {0: 0.5})
    return req


def total_slots_accounted(pool, held):
    return pool.allocator.available_size() + pool.cache.evictable_size() + pool.cache.protected_size() + held


def test_pending_laq_request_keeps_its_prompt_through_the_prefill_insert_then_frees_at_eviction(evicting_process):
    from types import SimpleNamespace

    from sgl_evict.engine.evict_batch import evict_after_lookahead
    from sgl_evict.engine.lookahead import record_step

    pool = Pool(1, slots=64)
    req = pending_laq_request(pool, evicting_process)
    tree, row, owned = pool.tree_content(), pool.row(req).clone(), pool.owned_slots(req)
    pool.cache.cache_unfinished_req(req)  # SGLang's prefill-end insert
    assert pool.tree_content() == tree and pool.owned_slots(req) == owned  # the prompt stays the request's
    assert req.cache_protected_len == 8 and torch.equal(req.prefix_indices, row)
    check_slots(pool, [req])
    check_counters(pool)
    gen = torch.Generator().manual_seed(1)
    mass = lambda q, keys, table, lens, scaling, positions: torch.rand(1, q.shape[1], table.shape[1], generator=gen)
    available = pool.allocator.available_size()
    for _ in range(LAQ.lookahead_steps):  # each step launched, then its result processed; the last one evicts
        record_step([req.rid], [0], {0: torch.randn(1, 2, 4)}, evicting_process.pending)
        freed = evict_after_lookahead(SimpleNamespace(reqs=[req]), evicting_process, pool.req_to_token.req_to_token,
                                      lambda _: torch.zeros(66, 1, 4), pool.allocator.free, mass)
    holes = pool.row(req) == HOLE
    assert int((~holes).sum()) == 10 and req.rid not in evicting_process.pending
    assert freed == int(holes[8:].sum()) == pool.allocator.available_size() - available  # owned part freed
    check_slots(pool, [req])
    check_counters(pool)
    pool.finish(req)  # inserts the row, holes and all, frees nothing twice
    values = pool.match(list(req.origin_input_ids), NS_LAQ).device_indices
    assert torch.equal(values[8:] == HOLE, holes[8:])
    check_slots(pool, [])
    check_counters(pool)
    assert total_slots_accounted(pool, 0) == 64


def test_laq_request_ending_while_pending_is_released_with_its_full_cache(evicting_process):
    pool = Pool(1, slots=64)
    req = pending_laq_request(pool, evicting_process)
    pool.cache.cache_unfinished_req(req)
    row = pool.row(req).clone()
    pool.finish(req)  # finished (or aborted) before its lookahead steps: SGLang frees its row
    assert "laq-req" not in evicting_process.pending
    assert torch.equal(pool.match(list(range(1, 41)), NS_LAQ).device_indices, row)  # cached in full
    check_slots(pool, [])
    check_counters(pool)
    assert total_slots_accounted(pool, 0) == 64


def test_decode_capture_buffers_are_allocated_for_the_full_attention_layers_before_graph_capture(
        evicting_process):
    from sglang.srt.layers.radix_attention import RadixAttention

    from sgl_evict.patches.lookahead import GRAPH_CAPACITY, init_cuda_graphs_before

    layers = torch.nn.ModuleList([RadixAttention(4, 16, 0.25, 2, layer_id=0),
                                  RadixAttention(4, 16, 0.25, 2, layer_id=1, sliding_window_size=128),
                                  RadixAttention(8, 32, 0.25, 2, layer_id=2)])
    runner = dataclasses.make_dataclass("Runner", ["model", "req_to_token_pool", "dtype", "device"])(
        layers, ReqToTokenPool(size=100, max_context_len=8, device="cpu", enable_memory_saver=False),
        torch.bfloat16, "cpu")
    assert init_cuda_graphs_before(runner) is None
    capture = evicting_process.decode_capture
    assert capture.capacity == GRAPH_CAPACITY
    q = torch.randn(5, 8 * 32, dtype=torch.bfloat16)
    capture.begin([4, 2], "cpu")
    capture.record(2, q, 8, 32, capturing=True)  # what the captured graph of layer 2 replays
    capture.record(1, q, 4, 16, capturing=True)  # a sliding-window layer has no buffer: nothing recorded
    taken = capture.take()
    assert set(taken) == {0, 2} and torch.equal(taken[2], q.view(5, 8, 32)[[4, 2]])


def test_plugin_applies_the_laq_hooks():
    for target in ("sglang.srt.mem_cache.memory_pool.ReqToTokenPool.free",
                   "sglang.srt.model_executor.model_runner.ModelRunner.init_cuda_graphs",
                   "sglang.srt.model_executor.runner.decode_cuda_graph_runner.DecodeCudaGraphRunner.can_run_graph",
                   "sglang.srt.managers.scheduler_components.batch_result_processor.SchedulerBatchResultProcessor"
                   ".process_batch_result_decode"):
        assert target in HookRegistry._patched


# ---- laprox: the output projections read at start --------------------------------------------------------------

def llama_style_model(o_proj_columns=None, tp_size=1):
    """Layers laid out as SGLang's LlamaAttention on tensor-parallel rank 0 of ``tp_size``: a module with the
    RadixAttention ``attn`` (this rank's query heads) and its RowParallelLinear ``o_proj`` (this rank's columns)."""
    from sglang.srt.layers.linear import RowParallelLinear
    from sglang.srt.layers.radix_attention import RadixAttention

    gen = torch.Generator().manual_seed(0)

    def attention(layer_id, heads, head_dim, **options):
        module = torch.nn.Module()
        module.attn = RadixAttention(heads // tp_size, head_dim, head_dim ** -0.5, 2, layer_id=layer_id, **options)
        with get_parallel().override(tp_rank=0, tp_size=tp_size):
            module.o_proj = RowParallelLinear(o_proj_columns or heads * head_dim, 64, bias=False,
                                              params_dtype=torch.bfloat16)
        with torch.no_grad():  # SGLang allocates the weight empty; the loader fills it
            module.o_proj.weight.copy_(torch.randn(module.o_proj.weight.shape, generator=gen))
        return module

    return torch.nn.ModuleList([attention(0, 4, 16), attention(1, 4, 16, sliding_window_size=128),
                                attention(2, 8, 16)])


@pytest.mark.parametrize("tp_size", [1, 2])
def test_output_projections_are_factored_when_the_model_is_loaded(evicting_process, monkeypatch, tp_size):
    from sgl_evict.patches.laprox import initialize_after
    from sgl_evict.scoring import projected_value_norms

    monkeypatch.setattr(evicting_process, "value_norm_factors", None)
    model = llama_style_model(tp_size=tp_size)
    assert model[2].o_proj.weight.shape == (64, 8 // tp_size * 16)  # this rank's heads' columns of W_o
    assert initialize_after(None, SimpleNamespace(model=model, is_draft_worker=False, device="cpu")) is None
    factors = evicting_process.value_norm_factors
    heads = 8 // tp_size
    assert sorted(factors) == [0, 2] and factors[2].shape == (heads, 16, 16)  # sliding-window layers: not scored
    v = torch.randn(2, 5, 16)
    expected = projected_value_norms(v, model[2].o_proj.weight, heads)
    got = torch.linalg.vector_norm(torch.einsum("hij,hlj->hli", factors[2], v.repeat_interleave(heads // 2, 0)),
                                   dim=-1)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_an_fp8_pool_s_value_scale_is_folded_into_the_norm_factors(evicting_process, monkeypatch):
    """An FP8 pool stores v / v_scale: the factors of a layer with a value scale give the norms of the true values
    from the stored ones (without the fold, laprox would weigh layers of different scales wrongly)."""
    from sgl_evict.patches.laprox import initialize_after

    monkeypatch.setattr(evicting_process, "value_norm_factors", None)
    model = llama_style_model()
    initialize_after(None, SimpleNamespace(model=model, is_draft_worker=False, device="cpu"))
    plain = dict(evicting_process.value_norm_factors)
    model[2].attn.v_scale_float = 0.25
    initialize_after(None, SimpleNamespace(model=model, is_draft_worker=False, device="cpu"))
    scaled = evicting_process.value_norm_factors
    assert torch.allclose(scaled[2], plain[2] * 0.25) and torch.equal(scaled[0], plain[0])


@pytest.mark.parametrize("k_scale, recorded", [(None, 0.25), (3.0, 0.75)])
def test_window_queries_are_scored_with_the_pool_s_key_scale(evicting_process, k_scale, recorded):
    """The attention hook records ``scaling x k_scale`` for a layer with an FP8 key scale (the pool stores
    k / k_scale), the plain scaling otherwise; scoring, the one-read LSE and laq's lookahead read it from there."""
    from sglang.srt.layers.radix_attention import RadixAttention

    from sgl_evict.patches import attention

    attn = RadixAttention(4, 16, 0.25, 2, layer_id=0)
    attn.k_scale_float = k_scale
    capture = evicting_process.capture
    capture.begin(1, [8], "cpu")
    mode = SimpleNamespace(is_extend=lambda: True, is_decode=lambda: False)
    try:
        q = torch.randn(8, 4 * 16)
        attention.forward_around(lambda *a, **k: None, attn, q, q, q, SimpleNamespace(forward_mode=mode))
        assert capture.scaling[0] == recorded
    finally:
        capture.end()


def test_unreadable_output_projections_fail_a_laprox_launch_and_only_warn_otherwise(evicting_process, monkeypatch,
                                                                                    caplog):
    from sgl_evict.patches.laprox import initialize_after

    monkeypatch.setattr(evicting_process, "value_norm_factors", None)
    runner = SimpleNamespace(model=llama_style_model(o_proj_columns=100), is_draft_worker=False, device="cpu")
    with caplog.at_level("WARNING", logger="sgl_evict"):
        initialize_after(None, runner)  # the server runs snapkv: only laprox requests lose eviction
    assert evicting_process.value_norm_factors is None
    assert "cannot read this model's output projections" in caplog.text and "expected [hidden, 64]" in caplog.text
    evicting_process.configure(EvictionConfig(policy="laprox", budget=Budget.parse("0.1")))
    with pytest.raises(RuntimeError, match="--kv-evict-policy laprox cannot read this model's output projections"):
        initialize_after(None, runner)


def test_plugin_applies_the_laprox_hook():
    assert "sglang.srt.model_executor.model_runner.ModelRunner.initialize" in HookRegistry._patched

# ---- sliding-window models: a request's match ends where its protected tail is whole ----------------------------

TAIL = 8  # the model's sliding window (Gemma 3: 512)


@pytest.fixture
def sliding_window(evicting_process):
    evicting_process.protected_recent = TAIL
    yield evicting_process
    evicting_process.protected_recent = 0


def first_turn_with_holes(pool):
    """Request A (tokens 1..40) evicted positions 20..27 and finished: the tree holds them as holes."""
    a = pool.admit(list(range(1, 41)), NS_COMPRESSED, hole_units=range(20 // pool.page_size, 28 // pool.page_size))
    pool.finish(a)
    return a


@pytest.mark.parametrize("page_size", [1, 4])
def test_request_match_inside_an_evicted_region_ends_where_its_tail_is_whole(sliding_window, page_size):
    pool = Pool(page_size, slots=128)
    first_turn_with_holes(pool)
    # B shares A's first 30 tokens, 20..27 evicted there, and adds 2: its last TAIL positions reach into the holes
    tokens = list(range(1, 31)) + [101, 102]
    matched = pool.match(tokens, NS_COMPRESSED).device_indices  # SGLang's own re-match: untouched
    assert len(matched) == 30 // page_size * page_size and (matched[20:28] == HOLE).all()
    b = pool.admit(tokens, NS_COMPRESSED)
    assert b.cache_protected_len == 20 and len(b.prefix_indices) == 20  # recomputes 20.. itself
    assert (pool.row(b) != HOLE).all()
    # at prefill end SGLang would write the tree's holes over the KV it recomputed: the request keeps its prompt
    pool.cache.cache_unfinished_req(b)
    assert (pool.row(b) != HOLE).all() and b.cache_protected_len == 20
    check_slots(pool, [b])
    check_counters(pool)
    pool.finish(b)  # its duplicates of A's positions 20..29 are freed, its own tail cached
    check_slots(pool, [])
    check_counters(pool)


def test_holes_before_the_tail_are_inserted_as_usual(sliding_window):
    pool = Pool(1, slots=128)
    first_turn_with_holes(pool)
    b = pool.admit(list(range(1, 31)) + list(range(101, 111)), NS_COMPRESSED)  # tail 32..39: past the holes
    assert b.cache_protected_len == 20
    pool.cache.cache_unfinished_req(b)  # an ordinary insert: the tree's holes at 20..27 are outside the tail
    assert b.cache_protected_len == 40 and (pool.row(b)[20:28] == HOLE).all() and (pool.row(b)[28:] != HOLE).all()
    pool.finish(b)
    check_slots(pool, [])
    check_counters(pool)


def test_a_second_turn_matches_the_whole_first_turn(sliding_window):
    pool = Pool(1, slots=128)
    first_turn_with_holes(pool)
    c = pool.admit(list(range(1, 41)) + list(range(201, 211)), NS_COMPRESSED)
    assert c.cache_protected_len == 40  # the first turn's tail is whole: nothing recomputed
    pool.cache.cache_unfinished_req(c)  # an ordinary insert
    assert c.cache_protected_len == 50 and torch.equal(pool.row(c)[20:28], torch.full((8,), HOLE))
    pool.finish(c)
    check_slots(pool, [])
    check_counters(pool)


def test_without_sliding_window_layers_a_match_keeps_its_holes(evicting_process):
    pool = Pool(1, slots=128)
    first_turn_with_holes(pool)
    b = pool.admit(list(range(1, 31)) + list(range(101, 111)), NS_COMPRESSED)
    assert b.cache_protected_len == 30 and (b.prefix_indices[20:28] == HOLE).all()


# ---- Req.extra_key: the namespace of a request --------------------------------------------------------------------

@pytest.fixture
def server_config(monkeypatch):
    """Publishes a ServerArgs stand-in carrying the plugin's config, as the scheduler publishes its ServerArgs."""
    def publish(config):
        monkeypatch.setattr(get_context(), "_server_args", type("Args", (), {"_kv_evict": config})())
    return publish


def make_req(custom_params=None, extra_key=None):
    params = SamplingParams(max_new_tokens=4, custom_params=custom_params)
    return Req("rid", "", array("q", range(1, 33)), params, extra_key=extra_key)


def test_request_namespace_follows_server_config_and_override(server_config):
    server_config(COMPRESSED)
    assert make_req().extra_key == NS_COMPRESSED
    assert make_req(extra_key="salt").extra_key == namespaced_extra_key("salt", COMPRESSED) != NS_COMPRESSED
    assert make_req({"kv_evict": {"policy": "none"}}).extra_key is None
    assert make_req({"kv_evict": {"budget": 0.25}}).extra_key == namespaced_extra_key(None, OTHER_BUDGET)
    server_config(EvictionConfig())
    assert make_req().extra_key is None and make_req(extra_key="salt").extra_key == "salt"
    # a server started without eviction built no shadow rows and captures nothing: asking it to evict is refused
    with get_parallel().override(tp_rank=0):
        req = make_req({"kv_evict": {"policy": "snapkv", "budget": 0.5}})
    assert req.to_finish is not None and "started without --kv-evict-policy" in req.to_finish.message


def test_request_without_eviction_or_with_another_budget_does_not_match_compressed_prefix(server_config):
    server_config(COMPRESSED)
    pool = Pool(1, slots=64)
    compressed, same = make_req(), make_req()
    others = [make_req({"kv_evict": {"policy": "none"}}), make_req({"kv_evict": {"budget": 0.25}})]
    tokens = list(compressed.origin_input_ids)
    pool.finish(pool.admit(tokens, compressed.extra_key, hole_units=[3, 7, 20]))
    assert len(pool.match(tokens, same.extra_key).device_indices) == len(tokens)
    for other in others:
        assert len(pool.match(tokens, other.extra_key).device_indices) == 0


def test_bad_request_override_aborts_the_request_instead_of_the_scheduler(server_config):
    server_config(COMPRESSED)
    with get_parallel().override(tp_rank=0):
        req = make_req({"kv_evict": {"policy": "h2o"}})
    assert req.to_finish is not None and "kv_evict: policy: 'h2o'" in req.to_finish.message
    # JSON of the wrong type, and a server-level field, fail the request the same way (no TypeError escapes)
    for raw, message in (({"window": "abc"}, "window: expected an integer"),
                         ({"budget": [0.1]}, "budget: invalid budget"),
                         ({"page_granular": True}, "page_granular: set by the server")):
        with get_parallel().override(tp_rank=0):
            req = make_req({"kv_evict": raw})
        assert req.to_finish is not None and message in req.to_finish.message


def test_laprox_override_is_admitted_in_its_own_namespace(server_config):
    server_config(COMPRESSED)
    req = make_req({"kv_evict": {"policy": "laprox"}})
    assert req.to_finish is None
    assert req.extra_key == namespaced_extra_key(None, dataclasses.replace(COMPRESSED, policy="laprox"))
    assert req.extra_key != NS_COMPRESSED


def test_judgeq_override_needs_the_servers_soft_token_file(server_config, tmp_path):
    soft = tmp_path / "soft.safetensors"
    soft.write_bytes(b"vectors")
    server_config(COMPRESSED)  # no --kv-evict-soft-tokens
    with get_parallel().override(tp_rank=0):
        refused = make_req({"kv_evict": {"policy": "judgeq"}})
        own_file = make_req({"kv_evict": {"policy": "judgeq", "soft_tokens": str(soft)}})
    assert refused.to_finish is not None and "needs a server started with --kv-evict-soft-tokens" in \
        refused.to_finish.message
    assert own_file.to_finish is not None and "soft_tokens: set by the server" in own_file.to_finish.message
    with_file = dataclasses.replace(COMPRESSED, soft_tokens=str(soft))
    server_config(with_file)
    req = make_req({"kv_evict": {"policy": "judgeq"}})
    assert req.to_finish is None
    assert req.extra_key == namespaced_extra_key(None, dataclasses.replace(with_file, policy="judgeq"))
    assert req.extra_key not in (NS_COMPRESSED, namespaced_extra_key(None, with_file))
    soft.write_bytes(b"other vectors")  # another file's content: another namespace
    assert make_req({"kv_evict": {"policy": "judgeq"}}).extra_key != req.extra_key


def test_without_eviction_the_allocator_hooks_hand_straight_over(evicting_process):
    # no hole can exist then, and dropping holes would cost SGLang's free paths a device sync
    evicting_process.configure(EvictionConfig())
    assert hooks.token_free_before(None, torch.tensor([3, HOLE])) is None
    assert hooks.paged_release_before(None, torch.tensor([HOLE])) is None
