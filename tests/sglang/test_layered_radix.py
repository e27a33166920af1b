"""The layered pool's allocator (sgl_evict/engine/layered_allocator.py) under SGLang 0.5.17's real RadixCache and
ReqToTokenPool, with the plugin's radix hooks applied as a server applies them (load_plugins).

The property test of tests/sglang/test_radix_holes.py (docs/radix.md), extended to group-slots: simulated requests are
admitted (match, lock, evict-then-alloc), evicted per layer group (sgl_evict/engine/group_evict.py: dropped
group-slots freed, tokens no group keeps turned into holes), dropped further, cached (cache_unfinished_req) and
finished (cache_finished_req). After every step: logical slots and group-slots are each partitioned into free,
held by the tree and owned by running requests; nothing is freed twice; the tree's counters count its group-slots
and report token-equivalents; admission on ``available + evictable`` is backed by real group-slots after eviction;
``evict`` reports what it freed; the tree's content, holes and per-group liveness equal an explicit model.
"""

from array import array
from types import SimpleNamespace

import pytest
from sglang_guard import sglang_or_skip
from sim_req import SimReq

with sglang_or_skip("sglang's radix cache"):
    import torch
    from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InsertParams, MatchPrefixParams
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams
    from sglang.srt.mem_cache.memory_pool import ReqToTokenPool
    from sglang.srt.mem_cache.radix_cache import RadixKey
    from sglang.srt.plugins import load_plugins

    from sgl_evict.engine.hole_radix_cache import HoleAwareRadixCache

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sgl_evict.config import EvictionConfig
from sgl_evict.engine.group_evict import evict_groups
from sgl_evict.engine.layered_allocator import LayeredTokenToKVPoolAllocator
from sgl_evict.holes import HOLE, live, namespaced_extra_key
from sgl_evict.selection import Budget

load_plugins()  # what launch_server and every scheduler process do

COMPRESSED = EvictionConfig(policy="snapkv", budget=Budget.parse("0.5"))
NS_COMPRESSED = namespaced_extra_key(None, COMPRESSED)
NAMESPACES = (None, NS_COMPRESSED)  # eviction off (all groups live), eviction on (per-group drops, holes)


@pytest.fixture(autouse=True)
def evicting_process():
    """The hooks act only in a process whose server evicts: this one does."""
    from sgl_evict.engine.runtime import STATE

    saved = STATE.config
    STATE.configure(COMPRESSED)
    yield STATE
    STATE.configure(saved)


def new_allocator(logical=16, group_slots=24, groups=3):
    return LayeredTokenToKVPoolAllocator(logical, group_slots, groups, torch.bfloat16, "cpu", None, need_sort=False)


# ---- the allocator alone -----------------------------------------------------------------------------------------

def test_alloc_backs_every_logical_slot_in_every_group():
    alloc = new_allocator(logical=16, group_slots=24, groups=3)
    assert alloc.available_size() == alloc.size == 8  # 24 group-slots // 3 bind before 16 logical slots
    logical = alloc.alloc(5)
    groups = alloc.group_map[:, logical]
    assert (groups > 0).all() and len(set(groups.flatten().tolist())) == 15
    assert alloc.available_size() == 3 and alloc.heap_available_size() == 9
    assert alloc.alloc(4) is None  # 12 group-slots needed, 9 free
    assert alloc.group_map[:, -1].tolist() == [HOLE] * 3  # map[:, HOLE] is HOLE


def test_logical_slots_bind_when_the_heap_is_large():
    alloc = new_allocator(logical=4, group_slots=60, groups=3)
    assert alloc.available_size() == 4
    alloc.alloc(4)
    assert alloc.available_size() == 0 and alloc.heap_available_size() == 48 and alloc.alloc(1) is None


def test_group_drops_free_group_slots_once_and_free_frees_the_rest():
    alloc = new_allocator(logical=16, group_slots=30, groups=3)
    logical = alloc.alloc(4)
    drop = torch.tensor([[1, 0, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    assert alloc.free_group_slots(logical, drop) == 5
    assert alloc.free_group_slots(logical, drop) == 0  # dropping again frees nothing
    assert alloc.live_groups(logical).equal(~drop)
    assert alloc.group_slots_of(logical) == 7 and alloc.heap_available_size() == 30 - 7
    # token 0 has no group left: the engine writes a hole and frees the logical slot, which frees no group-slot
    row = logical.clone()
    row[0] = HOLE
    alloc.free(logical[:1])
    alloc.free(row)  # the hole is skipped, the live group-slots of the other three are freed
    assert alloc.heap_available_size() == 30 and alloc.logical.available_size() == 16
    assert (alloc.group_map[:, :-1] == 0).all()
    heap_free = alloc.heap.free_pages.tolist()
    assert sorted(heap_free) == list(range(1, 31)), "a group-slot was freed twice or lost"


@pytest.mark.parametrize("path", ["free_segment", "free_segments", "free_group"])
def test_sglang_free_paths_end_in_the_layered_free(path):
    alloc = new_allocator(logical=16, group_slots=30, groups=3)
    row = alloc.alloc(6)
    alloc.free_group_slots(row, torch.tensor([[1, 0, 0, 0, 0, 0]] * 3, dtype=torch.bool))
    row[0] = HOLE
    alloc.logical.free(torch.tensor([1]))  # the hole's logical slot, as evict_groups frees it
    if path == "free_segment":
        alloc.free_segment(row, start_pos=0)
    elif path == "free_segments":
        alloc.free_segments([(row[:3], 0), (row[3:], 3)])
    else:
        alloc.free_group_begin()
        alloc.free(row[:2])
        alloc.free_segment(row[2:], start_pos=2)
        assert alloc.heap_available_size() == 30 - 15  # nothing freed inside the group
        alloc.free_group_end()
    assert alloc.heap_available_size() == 30 and alloc.logical.available_size() == 16
    assert sorted(alloc.heap.free_pages.tolist()) == list(range(1, 31))


def test_clear_resets_slots_and_table_but_not_the_hole_sentinel():
    alloc = new_allocator()
    alloc.alloc(5)
    alloc.clear()
    assert alloc.available_size() == alloc.size and (alloc.group_map[:, :-1] == 0).all()
    assert alloc.group_map[:, -1].tolist() == [HOLE] * 3
    with pytest.raises(NotImplementedError, match="resize"):
        alloc.resize(None)


def test_evict_groups_frees_owned_drops_and_hides_prefix_tokens_no_group_keeps():
    alloc = new_allocator(logical=16, group_slots=48, groups=2)
    row = alloc.alloc(6).to(torch.int32)
    keep = torch.tensor([[1, 0, 0, 1, 0, 1], [1, 1, 0, 0, 0, 1]], dtype=torch.bool)
    before = alloc.heap_available_size()
    result = evict_groups(alloc, row, keep, owned_from=2)  # positions 0, 1: a matched prefix, the tree's
    # owned: 2 dropped by both (hole, logical freed), 3 by group 1, 4 by both, 5 by none
    assert result.row.tolist() == row[:2].tolist() + [HOLE, row[3].item(), HOLE, row[5].item()]
    assert result.group_slots_freed == 5 and alloc.heap_available_size() == before + 5
    assert result.logical_freed == 2 and alloc.logical.available_size() == 16 - 4
    # the prefix keeps its group-slots (other requests read them); position 1 is visible in group 1 only
    assert alloc.live_groups(row[:2].long()).all()
    hidden = evict_groups(alloc, row[:2], torch.zeros(2, 2, dtype=torch.bool), owned_from=2)
    assert hidden.row.tolist() == [HOLE, HOLE] and hidden.group_slots_freed == hidden.logical_freed == 0


# ---- the evicting server's RadixCache over the layered allocator ----------------------------------------------

class LayeredPool:
    """HoleAwareRadixCache + layered allocator + req_to_token pool (page_size 1)."""

    def __init__(self, logical: int, group_slots: int, groups: int, max_reqs: int = 4, max_len: int = 64):
        self.allocator = new_allocator(logical, group_slots, groups)
        self.groups = groups
        self.req_to_token = ReqToTokenPool(size=max_reqs, max_context_len=max_len, device="cpu",
                                           enable_memory_saver=False)
        self.cache = HoleAwareRadixCache(CacheInitParams(disable=False, req_to_token_pool=self.req_to_token,
                                                token_to_kv_pool_allocator=self.allocator, page_size=1))

    def nodes(self):
        stack = list(self.cache.root_node.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def group_slots(self, logical) -> list[int]:
        """The live group-slots of logical slots (holes and dropped groups hold none)."""
        index = torch.as_tensor(list(logical), dtype=torch.int64)
        entries = self.allocator.group_map[:, index]
        return entries[entries > 0].tolist()

    def tree_logical(self) -> list[int]:
        return [s for node in self.nodes() for s in live(node.value).tolist()]

    def tree_content(self) -> dict:
        """{(extra_key, token prefix): (value, live groups of the value)} for every token in the tree."""
        content = {}

        def walk(node, tokens):
            for child in node.children.values():
                path = tokens + tuple(child.key.token_ids)
                for i, value in enumerate(child.value.tolist()):
                    content[(child.key.extra_key, path[:len(tokens) + i + 1])] = (value, self.live_bits(value))
                walk(child, path)

        walk(self.cache.root_node, ())
        return content

    def live_bits(self, value: int) -> tuple:
        return tuple(self.allocator.live_groups(torch.tensor([value]))[:, 0].tolist())

    def match(self, tokens, extra_key, req=None):
        return self.cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", tokens), extra_key), req=req))

    def admit(self, tokens, extra_key, keep_seed):
        """Matches, locks, evicts-then-allocates, writes the row and, with eviction on, evicts per group."""
        req = SimReq(array("q", tokens), extra_key)
        match = self.match(tokens, extra_key, req)
        prefix = match.device_indices
        self.cache.inc_lock_ref(match.last_device_node)
        need = len(tokens) - len(prefix)
        self.evict_for(need)
        new = self.allocator.alloc(need) if need else prefix[:0]
        if new is None:
            self.cache.dec_lock_ref(match.last_device_node)
            return None
        self.req_to_token.alloc([req])
        row = torch.cat((prefix, new)).to(torch.int32)
        req.cache_protected_len, req.last_node, req.prefix_indices = len(prefix), match.last_device_node, prefix
        self.req_to_token.write((req.req_pool_idx, slice(0, len(row))), row)
        if extra_key is not None:
            self.evict_groups(req, keep_seed)
        return req

    def evict_groups(self, req, seed):
        """The engine's per-group eviction of the request's row from a random keep mask (about 60% kept)."""
        row = self.row(req).to(torch.int32)
        keep = torch.rand(self.groups, len(row), generator=torch.Generator().manual_seed(seed)) < 0.6
        result = evict_groups(self.allocator, row, keep, req.cache_protected_len)
        self.req_to_token.write((req.req_pool_idx, slice(0, len(row))), result.row)

    def evict_for(self, need: int):
        """SGLang's evict_from_tree_cache: evict the shortfall; free + evictable must be real group-slots."""
        available, evictable = self.allocator.available_size(), self.cache.evictable_size()
        if available >= need:
            return
        self.cache.evict(EvictParams(num_tokens=need - available))
        if available + evictable >= need:
            assert self.allocator.available_size() >= need, \
                f"admitted on {available} free + {evictable} evictable, but eviction left " \
                f"{self.allocator.available_size()} < {need}"

    def row(self, req) -> torch.Tensor:
        return self.req_to_token.req_to_token[req.req_pool_idx, :len(req.origin_input_ids)].to(torch.int64)

    def owned_logical(self, req) -> list[int]:
        return live(self.row(req)[req.cache_protected_len:]).tolist()

    def finish(self, req):
        self.cache.cache_finished_req(req, kv_len_to_handle=len(req.origin_input_ids))
        self.req_to_token.free(req)


def check_partitions(pool: LayeredPool, active):
    """Logical slots and group-slots are each exactly one of: free, the tree's, a running request's."""
    alloc = pool.allocator
    free_logical = torch.cat((alloc.logical.free_pages, alloc.logical.release_pages)).tolist()
    free_heap = torch.cat((alloc.heap.free_pages, alloc.heap.release_pages)).tolist()
    assert len(free_logical) == len(set(free_logical)), "a logical slot was freed twice"
    assert len(free_heap) == len(set(free_heap)), "a group-slot was freed twice"
    assert min(free_logical + free_heap, default=1) >= 1, "a hole or the padding slot reached a free list"
    tree = pool.tree_logical()
    held = [s for req in active for s in pool.owned_logical(req)]
    owners = [free_logical, tree, held]
    assert sum(map(len, owners)) == len(set().union(*map(set, owners))), "a logical slot has two owners"
    assert set().union(*map(set, owners)) == set(range(1, alloc.logical.size + 1)), "logical slots leaked"
    assert (alloc.group_map[:, free_logical] == 0).all(), "a free logical slot still maps to a group-slot"
    tree_groups, held_groups = pool.group_slots(tree), pool.group_slots(held)
    heap = [free_heap, tree_groups, held_groups]
    assert sum(map(len, heap)) == len(set().union(*map(set, heap))), "a group-slot has two owners"
    assert set().union(*map(set, heap)) == set(range(1, alloc.heap.size + 1)), "group-slots leaked"
    # a live logical slot keeps at least one group: one with none must have become a hole
    assert all(alloc.live_groups(torch.tensor(tree + held, dtype=torch.int64)).any(0).tolist())


def check_counters(pool: LayeredPool):
    """The tree's counters count its group-slots; the scheduler reads token-equivalents."""
    tree_groups = len(pool.group_slots(pool.tree_logical()))
    locked = len(pool.group_slots([s for node in pool.nodes() if node.lock_ref > 0 for s in live(node.value)]))
    cache, g = pool.cache, pool.groups
    assert cache.evictable_size_ + cache.protected_size_ == tree_groups
    assert cache.protected_size_ == locked
    assert (cache.evictable_size(), cache.protected_size()) == (cache.evictable_size_ // g, locked // g)
    assert cache.total_size() == tree_groups // g


CASES = {"groups_bind": dict(logical=40, group_slots=54, groups=3),   # 18 token-equivalents, 40 logical slots
         "logical_binds": dict(logical=16, group_slots=96, groups=4),
         "one_group": dict(logical=24, group_slots=20, groups=1)}


def operations():
    sequence = st.lists(st.integers(0, 2), min_size=1, max_size=10)  # token ids 1..3: sequences share prefixes
    seed = st.integers(0, 2**16)
    return st.lists(st.one_of(
        st.tuples(st.just("start"), st.sampled_from(NAMESPACES), sequence, seed),
        st.tuples(st.just("drop"), st.integers(0, 2), seed),
        st.tuples(st.just("chunk"), st.integers(0, 2)),
        st.tuples(st.just("finish"), st.integers(0, 2)),
        st.tuples(st.just("match"), st.sampled_from(NAMESPACES), sequence),
        st.tuples(st.just("evict"), st.integers(1, 10)),
    ), min_size=4, max_size=30)


def run_operations(case, ops):
    pool = LayeredPool(**CASES[case])
    active = []
    expected = {}  # {(extra_key, token prefix): (value, live groups)}: the tree's, holes and groups included

    def remember(req):
        """The tree keeps the first value inserted for a prefix; the request's row gives the rest."""
        tokens = tuple(req.origin_input_ids)
        for i, value in enumerate(pool.row(req).tolist()):
            expected.setdefault((req.extra_key, tokens[:i + 1]), (value, pool.live_bits(value)))

    for op in ops:
        may_evict = op[0] in ("start", "evict")
        if op[0] == "start" and len(active) < 3:
            _, ns, units, seed = op
            req = pool.admit([u + 1 for u in units], ns, seed)
            if req is not None:
                active.append(req)
        elif op[0] == "drop" and active:
            req = active[op[1] % len(active)]
            if req.extra_key is not None:  # a second per-group eviction of the request's own part
                pool.evict_groups(req, op[2])
        elif op[0] == "chunk" and active:
            req = active[op[1] % len(active)]
            remember(req)
            pool.cache.cache_unfinished_req(req)
        elif op[0] == "finish" and active:
            req = active.pop(op[1] % len(active))
            remember(req)
            pool.finish(req)
        elif op[0] == "match":
            _, ns, units = op
            tokens = tuple(u + 1 for u in units)
            values = pool.match(list(tokens), ns).device_indices.tolist()
            assert values == [expected[(ns, tokens[:i + 1])][0] for i in range(len(values))]
            longest = max([i + 1 for i in range(len(tokens)) if (ns, tokens[:i + 1]) in expected], default=0)
            assert len(values) == longest
            if ns is None:
                assert HOLE not in values and all(all(pool.live_bits(v)) for v in values)
        elif op[0] == "evict":
            heap_before = pool.allocator.heap_available_size()
            units_before, evictable = pool.cache.evictable_size_, pool.cache.evictable_size()
            result = pool.cache.evict(EvictParams(num_tokens=op[1]))
            freed = pool.allocator.heap_available_size() - heap_before
            assert freed == units_before - pool.cache.evictable_size_, "evict freed other group-slots than counted"
            assert result.num_tokens_evicted == freed // pool.groups
            assert freed >= min(op[1] * pool.groups, units_before), (freed, op[1], evictable)

        content = pool.tree_content()
        gone = expected.keys() - content.keys()
        assert may_evict or not gone, f"{op[0]} removed cached prefixes"
        for key in gone:
            del expected[key]
        assert content == expected, "the tree's values or their groups changed"
        check_partitions(pool, active)
        check_counters(pool)


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(CASES)), operations())
def test_random_request_sequences_keep_every_group_slot_accounted_for(case, ops):
    run_operations(case, ops)


def test_split_nodes_count_their_own_group_slots_through_lock_and_evict():
    pool = LayeredPool(logical=16, group_slots=48, groups=3)
    row = pool.allocator.alloc(6)
    drop = torch.zeros(3, 6, dtype=torch.bool)
    drop[:, 1] = True  # token 1: no group, a hole
    drop[0, 4] = drop[1, 4] = True  # token 4: group 2 only
    pool.allocator.free_group_slots(row, drop)
    pool.allocator.free(row[1:2])
    row[1] = HOLE
    tokens = [7, 8, 9, 10, 11, 12]
    pool.cache.insert(InsertParams(key=RadixKey(array("q", tokens), NS_COMPRESSED), value=row))
    assert pool.cache.evictable_size_ == 13 and pool.cache.evictable_size() == 4  # 13 group-slots // 3
    match = pool.match(tokens[:3], NS_COMPRESSED)  # splits the node after token 2
    pool.cache.inc_lock_ref(match.last_device_node)
    assert (pool.cache.evictable_size_, pool.cache.protected_size_) == (7, 6)
    heap = pool.allocator.heap_available_size()
    result = pool.cache.evict(EvictParams(num_tokens=16))  # asks for more than is evictable
    assert pool.allocator.heap_available_size() - heap == 7 and result.num_tokens_evicted == 2
    assert (pool.cache.evictable_size_, pool.cache.protected_size_) == (0, 6)
    check_counters(pool)


def test_sliding_window_match_ends_where_every_group_holds_its_tail(evicting_process):
    """A group of sliding-window layers keeps only each prompt's tail: a request's match whose last
    ``protected_recent`` entries some group dropped is cut, as at holes; SGLang's own re-match is not."""
    pool = LayeredPool(logical=32, group_slots=96, groups=3)
    row = pool.allocator.alloc(12)
    drop = torch.zeros(3, 12, dtype=torch.bool)
    drop[0, :8] = True  # group 0 (sliding-window layers only) keeps the last 4 tokens
    drop[1, 2:6] = True  # group 1 drops tokens 2..5; group 2 keeps everything
    pool.allocator.free_group_slots(row, drop)
    tokens = list(range(100, 112))
    pool.cache.insert(InsertParams(key=RadixKey(array("q", tokens), NS_COMPRESSED), value=row.clone()))
    shared = tokens[:10] + [7, 8]  # shares tokens 0..9, whose tail 6..9 group 0 dropped
    evicting_process.protected_recent = 4
    try:
        assert len(pool.match(shared, NS_COMPRESSED).device_indices) == 10
        assert len(pool.match(shared, NS_COMPRESSED, req=SimpleNamespace()).device_indices) == 0
        # a second turn: its tail 8..11 is whole in every group
        assert len(pool.match(tokens + [7], NS_COMPRESSED, req=SimpleNamespace()).device_indices) == 12
    finally:
        evicting_process.protected_recent = 0
    # without sliding-window layers the match keeps every token some group still holds
    assert len(pool.match(shared, NS_COMPRESSED, req=SimpleNamespace()).device_indices) == 10


def idle_checker(pool):
    """SGLang's scheduler invariant checker at idle (no batch, no session) over ``pool``'s tree and allocator."""
    from sglang.srt.disaggregation.utils import DisaggregationMode
    from sglang.srt.managers.scheduler_components.invariant_checker import SchedulerInvariantChecker
    from sglang.srt.managers.scheduler_components.pool_stats_observer import PoolStats

    checker = SchedulerInvariantChecker(
        is_hybrid_swa=False, is_hybrid_ssm=False, disaggregation_mode=DisaggregationMode.NULL, page_size=1,
        full_tokens_per_layer=None, swa_tokens_per_layer=None, max_total_num_tokens=pool.allocator.size,
        server_args=SimpleNamespace(dcp_size=1), tree_cache=pool.cache, token_to_kv_pool_allocator=pool.allocator,
        req_to_token_pool=pool.req_to_token, pool_stats_observer=SimpleNamespace(session_held_tokens=lambda: 0),
        get_last_batch=lambda: None, get_running_batch=lambda: None)
    # what SchedulerPoolStatsObserver reports for a plain (not hybrid) pool
    stats = PoolStats(full_num_used=0, full_token_usage=0.0, full_available_size=pool.allocator.available_size(),
                      full_evictable_size=pool.cache.evictable_size())
    return checker, stats


def test_idle_memory_check_compares_group_slots():
    pool = LayeredPool(logical=16, group_slots=24, groups=3)
    checker, stats = idle_checker(pool)
    assert checker._check_all_pools(stats)[0] is False  # empty pool
    row = pool.allocator.alloc(4)
    drop = torch.zeros(3, 4, dtype=torch.bool)
    drop[0, 1] = drop[1, 2] = True  # 10 group-slots left: 3 token-equivalents in the tree, 14 // 3 = 4 free
    pool.allocator.free_group_slots(row, drop)
    pool.cache.insert(InsertParams(key=RadixKey(array("q", [5, 6, 7, 8]), NS_COMPRESSED), value=row))
    checker, stats = idle_checker(pool)
    assert stats.full_available_size + stats.full_evictable_size == 7 != pool.allocator.size  # SGLang's sum: 8
    has_leak, messages = checker._check_all_pools(stats)
    assert has_leak is False and "available=14" in messages[0] and "evictable=10" in messages[0]
    pool.allocator.heap.free(pool.allocator.heap.alloc(1))  # still balanced
    leaked = pool.allocator.heap.alloc(2)  # two group-slots nobody holds: a leak
    assert leaked is not None and checker._check_all_pools(stats)[0] is True
