"""Reversible eviction (issue 25) on SGLang 0.5.17's real classes: a CPU ``MHATokenToKVPool``, its allocator, the
``ReqToTokenPool`` and the evicting radix tree with a host pool
(:class:`~sgl_evict.engine.reversible_radix_cache.ReversibleRadixCache`), driven through the scheduler's steps for
each turn: match and lock the prefix, allocate, write K/V, capture the window queries,
:func:`~sgl_evict.engine.evict_batch.evict_after_prefill`, then SGLang's ``cache_unfinished_req`` and
``cache_finished_req``.

What is checked: evicted K/V reach host memory before their slots are reused; the tree takes the request's host
slots at insert, slices them at splits, frees them on radix eviction, duplicates and flushes; host memory short,
least recently used copies go first; a later turn's keep-set over every logical token equals the harness rule's
over the K as computed, the restored slots hold that K/V and are freed when the request leaves; no device or host
slot leaks or is held twice.
"""

import dataclasses
from array import array
from types import SimpleNamespace

import pytest
from sglang_guard import sglang_or_skip
from sim_req import SimReq

with sglang_or_skip("sglang's radix cache"):
    import torch
    from sglang.srt.mem_cache.allocator import TokenToKVPoolAllocator
    from sglang.srt.mem_cache.base_prefix_cache import EvictParams, MatchPrefixParams
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
    from sglang.srt.managers.schedule_batch import Range
    from sglang.srt.managers.schedule_policy import AddReqResult
    from sglang.srt.mem_cache.radix_cache import RadixKey
    from sglang.srt.plugins import load_plugins

    from sgl_evict.engine.host_kv_pool import HostKVPool
    from sgl_evict.engine.reversible_radix_cache import (
        CARRY, HOST_ROW, HOST_SLOTS, RESTORED, ReversibleRadixCache)
    from sgl_evict.patches import scheduler

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sgl_evict.config import EvictionConfig
from sgl_evict.engine.evict_batch import evict_after_prefill
from sgl_evict.engine.last_token import EVICT_AT, evict_at
from sgl_evict.engine.overlap import must_process_first
from sgl_evict.engine.keep import combined_scores, keep_mask, laprox_scores, position_scores, window_scores
from sgl_evict.engine.laprox import projected_norms
from sgl_evict.engine.runtime import STATE
from sgl_evict.holes import HOLE, is_live, live, namespaced_extra_key
from sgl_evict.kernels.paged_scoring import attention_mass_paged
from sgl_evict.rope import RopeSpec
from sgl_evict.selection import Budget

load_plugins()

LAYERS, KV_HEADS, GROUP, DIM, WINDOW = 2, 2, 2, 8, 4
SCALING = {layer: DIM ** -0.5 for layer in range(LAYERS)}
RESTORE = EvictionConfig(policy="snapkv", budget=Budget(tokens=12), window=WINDOW, sinks=2, pooling_kernel=3,
                         history="restore", host_pool_gb=1.0)


@pytest.fixture(autouse=True)
def evicting_process():
    saved = STATE.config
    STATE.configure(RESTORE)
    yield STATE
    STATE.configure(saved)


@dataclasses.dataclass
class TurnReq(SimReq):
    """SimReq with what ``evict_after_prefill`` reads of SGLang's ``Req``."""

    is_retracted: bool = False
    sampling_params: object = dataclasses.field(default_factory=lambda: SimpleNamespace(custom_params=None))
    extend_range: object = None

    def finished(self) -> bool:
        return False

    @property
    def full_untruncated_fill_ids(self) -> array:
        return self.origin_input_ids + self.output_ids

    def set_extend_range(self, start: int, end: int) -> None:
        self.extend_range = Range(start, end)


class Server:
    """One scheduler's pools and tree; ``k``/``v`` ``[LAYERS, positions, KV_HEADS, DIM]``: each conversation
    position's K/V as computed (token ``t`` of every prompt sits at position ``t``: prompts extend each other)."""

    def __init__(self, slots: int = 160, host_tokens: int = 200, seed: int = 0, config=RESTORE):
        self.gen = torch.Generator().manual_seed(seed)
        self.kv = MHATokenToKVPool(size=slots, page_size=1, dtype=torch.float32, head_num=KV_HEADS, head_dim=DIM,
                                   layer_num=LAYERS, device="cpu", enable_memory_saver=False)
        self.allocator = TokenToKVPoolAllocator(size=slots, dtype=torch.float32, device="cpu", kvcache=self.kv,
                                                need_sort=False)
        self.req_to_token = ReqToTokenPool(size=4, max_context_len=256, device="cpu", enable_memory_saver=False)
        self.host = HostKVPool(host_tokens, LAYERS, KV_HEADS, DIM, DIM, torch.float32)
        self.tree = ReversibleRadixCache(CacheInitParams(disable=False, req_to_token_pool=self.req_to_token,
                                                         token_to_kv_pool_allocator=self.allocator, page_size=1),
                                         self.host)
        self.k = torch.randn(LAYERS, 256, KV_HEADS, DIM, generator=self.gen)
        self.v = torch.randn(LAYERS, 256, KV_HEADS, DIM, generator=self.gen)
        self.namespace = namespaced_extra_key(None, config)
        self.queries = {}
        self.slots = slots

    # -- the scheduler's steps --

    def admit(self, length: int, rid: str = "req", first_token: int = 1) -> TurnReq:
        """A request for tokens ``first_token ..`` (another first token: another conversation)."""
        tokens = array("q", range(first_token, first_token + length))
        req = TurnReq(tokens, self.namespace, rid=rid)
        # as SGLang, the last token is always computed (its logits are needed)
        match = self.tree.match_prefix(MatchPrefixParams(key=RadixKey(tokens[:-1], self.namespace), req=req))
        prefix = match.device_indices
        self.tree.inc_lock_ref(match.last_device_node)
        need = length - len(prefix)
        if self.allocator.available_size() < need:
            self.tree.evict(EvictParams(num_tokens=need - self.allocator.available_size()))
        new = self.allocator.alloc(need)
        assert new is not None
        self.req_to_token.alloc([req])
        row = torch.cat((prefix, new)).to(torch.int64)
        self.req_to_token.write((req.req_pool_idx, slice(0, length)), row.to(torch.int32))
        positions = torch.arange(len(prefix), length)
        for layer in range(LAYERS):
            self.kv.set_kv_buffer(SimpleNamespace(layer_id=layer), new, self.k[layer, positions],
                                  self.v[layer, positions])
        req.cache_protected_len, req.last_node, req.prefix_indices = len(prefix), match.last_device_node, prefix
        return req

    def before_prefill(self, req):
        """SGLang's ``prepare_for_extend`` has written the batch's rows: its AFTER hook runs."""
        batch = SimpleNamespace(reqs=[req], tree_cache=self.tree, req_to_token_pool=self.req_to_token)
        scheduler.prepare_for_extend_after(None, batch)

    def prefill_end(self, req, queries=None) -> int:
        """The prefill forward's window queries captured, eviction, then SGLang's insert; returns slots freed."""
        freed = self.evict(self.prefill_forward(req, queries))
        self.tree.cache_unfinished_req(req)
        return freed

    def evict(self, batch) -> int:
        """The prefill result hook's eviction of ``batch``; returns slots freed."""
        return evict_after_prefill(batch, STATE, self.req_to_token.req_to_token, self.kv.get_key_buffer,
                                   self.allocator.free, attention_mass_paged, reversible=self.tree,
                                   value_buffer=self.kv.get_value_buffer)

    def prefill_forward(self, req, queries=None, start=None, end=None):
        """What the prefill forward leaves for eviction: its window queries captured (random, or ``queries``:
        layer id -> ``[extend, heads * dim]``, kept in ``self.queries``); returns the batch. ``start``, ``end``:
        the chunk's logical range (default: the prompt after its matched prefix)."""
        length = len(req.origin_input_ids) if end is None else end
        extend = length - (req.cache_protected_len if start is None else start)
        STATE.forward_id += 1
        STATE.capture.begin(STATE.forward_id, [extend], "cpu")
        self.queries = queries or {layer: torch.randn(extend, KV_HEADS * GROUP * DIM, generator=self.gen)
                                   for layer in range(LAYERS)}
        for layer, q in self.queries.items():
            STATE.capture.record(layer, q, KV_HEADS * GROUP, DIM, SCALING[layer])
        STATE.capture.end()
        return SimpleNamespace(reqs=[req], decoding_reqs=None, seq_lens_cpu=torch.tensor([length]),
                               forward_mode=SimpleNamespace(is_extend=lambda: True))

    def finish(self, req, insert: bool = True):
        self.tree.cache_finished_req(req, is_insert=insert, kv_len_to_handle=len(req.origin_input_ids))
        self.req_to_token.free(req)

    def turn(self, length: int, rid: str = "req", first_token: int = 1) -> TurnReq:
        req = self.admit(length, rid, first_token)
        self.before_prefill(req)
        self.prefill_end(req)
        return req

    # -- what is held --

    def row(self, req) -> torch.Tensor:
        return self.req_to_token.req_to_token[req.req_pool_idx, :len(req.origin_input_ids)].to(torch.int64)

    def free_slots(self) -> list[int]:
        return torch.cat((self.allocator.free_pages, self.allocator.release_pages)).tolist()

    def tree_slots(self) -> list[int]:
        return [s for node in self.tree.nodes() for s in live(node.value).tolist()]

    def tree_host_slots(self) -> list[int]:
        return [s for node in self.tree.nodes() if getattr(node, HOST_SLOTS, None) is not None
                for s in getattr(node, HOST_SLOTS).tolist() if s >= 0]

    def check(self, running=()):
        """Device slots: free, the tree's, or a running request's own (its row from cache_protected_len on, and
        what it restored); host slots: free, a node's, or a running request's. Each exactly once."""
        free, tree = self.free_slots(), self.tree_slots()
        own = []
        for req in running:
            own += live(self.row(req)[req.cache_protected_len:]).tolist()
            restored = getattr(req, RESTORED, None)
            if restored is not None:
                own += restored[1].tolist()
        every = free + tree + own
        assert len(every) == len(set(every)), "a device slot is held twice"
        assert set(every) == set(range(1, self.slots + 1)), "device slots leaked"
        host_free = self.host._free.tolist()
        host_req = [s for req in running if getattr(req, HOST_ROW, None) is not None
                    for s in getattr(req, HOST_ROW).tolist() if s >= 0]
        host_every = host_free + self.tree_host_slots() + host_req
        assert len(host_every) == len(set(host_every)), "a host slot is held twice"
        assert set(host_every) == set(range(self.host.capacity)), "host slots leaked"
        with_copies = {node for node in self.tree.nodes() if getattr(node, HOST_SLOTS, None) is not None}
        assert self.tree._host_nodes == with_copies, "the LRU's index of nodes with copies is stale"
        assert self.tree.host_slots_held() == len(self.tree_host_slots())


def test_sglangs_registry_builds_the_reversible_tree_when_the_server_has_a_host_pool():
    from sglang.srt.mem_cache.registry import TreeCacheBuildContext, create_tree_cache

    from sgl_evict.config import RADIX_CACHE_BACKEND
    from sgl_evict.engine.hole_radix_cache import HoleAwareRadixCache

    server = Server()
    server_args = SimpleNamespace(radix_cache_backend=RADIX_CACHE_BACKEND, enable_session_radix_cache=False,
                                  enable_streaming_session=False, enable_lmcache=False, enable_flexkv=False)
    params = CacheInitParams(disable=False, req_to_token_pool=server.req_to_token,
                             token_to_kv_pool_allocator=server.allocator, page_size=1)
    context = TreeCacheBuildContext(
        server_args=server_args, params=params, is_hybrid_swa=False, is_hybrid_ssm=False,
        enable_hierarchical_cache=False, disable_radix_cache=False, effective_chunked_prefill_size=None,
        tp_worker=None, model_config=None, tp_size=1, tp_rank=0, tp_group=None)
    STATE.configure(dataclasses.replace(RESTORE, host_pool_gb=2 ** -10))  # 1 MiB
    tree = create_tree_cache(context)
    assert type(tree) is ReversibleRadixCache
    per_token = LAYERS * KV_HEADS * DIM * 2 * 4  # K and V, float32
    assert tree.host_pool.capacity == 2 ** 20 // per_token and tree.host_pool.bytes_per_token == per_token
    STATE.configure(dataclasses.replace(RESTORE, history="rescore", host_pool_gb=0))
    assert type(create_tree_cache(context)) is HoleAwareRadixCache


def test_a_host_pool_larger_than_the_hosts_free_memory_is_refused_naming_the_flag():
    server = Server()
    with pytest.raises(ValueError, match="--kv-evict-host-pool-gb: 2.0 GiB asked, but this host has 1.0 GiB"):
        HostKVPool.for_device_pool(server.kv, 2 * 2**30, available=2**30)
    with pytest.raises(ValueError, match="--kv-evict-host-pool-gb: 100 bytes hold no token"):
        HostKVPool.for_device_pool(server.kv, 100)
    assert HostKVPool.for_device_pool(server.kv, 2**20).capacity == 2**20 // (LAYERS * KV_HEADS * DIM * 2 * 4)


def _node_at(server, length):
    """The tree node whose key ends at position ``length`` of the shared token sequence."""
    tokens = array("q", range(1, length + 1))
    return server.tree.match_prefix(MatchPrefixParams(key=RadixKey(tokens, server.namespace))).last_device_node


# ---- step 1: copies on eviction, owned by the request, then by the tree ----------------------------------------

def test_evicted_kv_reaches_host_before_its_slots_are_reused():
    server = Server()
    req = server.admit(40)
    row_before = server.row(req).clone()
    server.prefill_end(req)
    row = server.row(req)
    dropped = (row == HOLE).nonzero().flatten()
    assert dropped.numel() == 40 - 12
    # the freed slots are handed out again and overwritten
    reused = server.allocator.alloc(server.allocator.available_size())
    for layer in range(LAYERS):
        server.kv.set_kv_buffer(SimpleNamespace(layer_id=layer), reused, torch.zeros(len(reused), KV_HEADS, DIM),
                                torch.zeros(len(reused), KV_HEADS, DIM))
    assert set(row_before[dropped].tolist()) <= set(reused.tolist())
    node = _node_at(server, 40)
    host = getattr(node, HOST_SLOTS)
    assert (host[dropped] >= 0).all() and (host[is_live(row)] == -1).all()
    for layer in range(LAYERS):
        assert torch.equal(server.host.k[layer][host[dropped]], server.k[layer, dropped])
        assert torch.equal(server.host.v[layer][host[dropped]], server.v[layer, dropped])


def test_a_request_owns_its_host_copies_until_its_prompt_is_inserted():
    server = Server()
    req = server.admit(40)
    insert = server.tree.cache_unfinished_req
    server.tree.cache_unfinished_req = lambda r: None  # evicted; SGLang's insert not run yet
    server.prefill_end(req)
    owned = getattr(req, HOST_ROW)
    assert int((owned >= 0).sum()) == 28 and server.tree_host_slots() == []
    server.check([req])
    insert(req)
    assert getattr(req, HOST_ROW) is None and len(server.tree_host_slots()) == 28
    server.check([req])


def test_the_scheduler_prefill_hook_copies_through_the_servers_tree():
    server = Server()
    req = server.admit(40)
    batch = server.prefill_forward(req)
    sched = SimpleNamespace(token_to_kv_pool_allocator=server.allocator, req_to_token_pool=server.req_to_token,
                            tree_cache=server.tree, server_args=SimpleNamespace(tp_size=1), enable_overlap=False)

    def sglang_processing(self, batch, result):
        self.tree_cache.cache_unfinished_req(req)
        return "processed"

    assert scheduler.process_batch_result_prefill_around(sglang_processing, sched, batch, None) == "processed"
    assert len(server.tree_host_slots()) == 28
    server.check([req])


def test_without_history_restore_nothing_is_copied():
    server = Server()
    req = server.admit(40)
    req.sampling_params.custom_params = {"kv_evict": {"history": "rescore"}}
    req.extra_key = namespaced_extra_key(None, dataclasses.replace(RESTORE, history="rescore"))
    server.prefill_end(req)
    assert server.host.available_size() == server.host.capacity
    assert getattr(req, HOST_ROW, None) is None


def test_a_split_slices_the_host_slots_with_the_key():
    server = Server()
    first = server.turn(40)
    server.finish(first)
    host = getattr(_node_at(server, 40), HOST_SLOTS).clone()
    # a match ending inside the node splits it
    upper = _node_at(server, 25)
    lower = _node_at(server, 40)
    assert upper is not lower and len(upper.key) == 25 and len(lower.key) == 15
    assert torch.equal(getattr(upper, HOST_SLOTS), host[:25])
    assert torch.equal(getattr(lower, HOST_SLOTS), host[25:])
    server.check()


def test_duplicate_inserts_free_the_second_requests_host_copies():
    server = Server()
    first, second = server.admit(40, "a"), server.admit(40, "b")  # same prompt, neither cached yet
    server.prefill_end(first)
    server.prefill_end(second)  # its insert finds the first's node: its copies are duplicates
    assert len(server.tree_host_slots()) == 28
    assert server.host.available_size() == server.host.capacity - 28
    server.check([first, second])
    server.finish(first)
    server.finish(second)
    server.check()


def test_radix_eviction_and_flush_free_host_copies():
    server = Server()
    server.finish(server.turn(40))
    assert server.host.available_size() == server.host.capacity - 28
    server.tree.evict(EvictParams(num_tokens=server.slots))
    assert server.host.available_size() == server.host.capacity
    server.finish(server.turn(40))
    assert server.host.available_size() < server.host.capacity
    server.tree.reset()
    assert server.host.available_size() == server.host.capacity


def test_retract_and_abort_free_the_requests_host_copies():
    server = Server()
    req = server.admit(40)
    server.tree.cache_unfinished_req = lambda r: None  # held before insert: retracted mid-prefill-processing
    server.prefill_end(req)
    assert getattr(req, HOST_ROW) is not None
    server.finish(req, insert=False)
    assert server.host.available_size() == server.host.capacity
    server.check()


def test_full_host_memory_drops_the_least_recently_used_copies_first():
    server = Server(slots=200, host_tokens=60)
    server.finish(server.turn(40, "a"))  # 28 copies
    a_node = _node_at(server, 40)  # (a match counts as a use: looked up before b's turn)
    server.finish(server.turn(40, "b", first_token=1000))  # 28 more
    b_node = server.tree.root_node.children[(server.namespace, 1000)]
    assert getattr(a_node, HOST_SLOTS) is not None and server.host.available_size() == 4
    # conversation c needs 28: the least recently used node's copies (a's) go, b's stay
    c = server.turn(40, "c", first_token=2000)
    assert getattr(a_node, HOST_SLOTS, None) is None
    assert getattr(b_node, HOST_SLOTS) is not None
    server.check([c])
    server.finish(c)
    server.check()


def test_host_memory_short_and_every_copy_locked_copies_the_best_scored_tokens():
    server = Server(host_tokens=20)
    req = server.admit(40)
    scores = combined_scores(_reference_scores(server, 40, req))
    server.prefill_end(req, server.queries)
    dropped = (server.row(req) == HOLE).nonzero().flatten()
    host = getattr(_node_at(server, 40), HOST_SLOTS)
    copied = (host >= 0).nonzero().flatten()
    assert copied.numel() == 20
    best = dropped[scores[dropped].argsort(descending=True)[:20]]
    assert set(copied.tolist()) == set(best.tolist())
    server.check([req])


# ---- step 2: a later turn restores ------------------------------------------------------------------------------

def _reference_scores(server, length, queries, config=RESTORE):
    """Scores of every logical token from its K as computed (the pool never read); ``queries``: layer id ->
    ``[extend, heads * dim]`` the prefill's queries, or a request (fresh queries drawn, kept in server.queries)."""
    if not isinstance(queries, dict):
        extend = length - queries.cache_protected_len
        queries = {layer: torch.randn(extend, KV_HEADS * GROUP * DIM, generator=server.gen)
                   for layer in range(LAYERS)}
        server.queries = queries
    keys = {layer: torch.cat((torch.zeros(1, KV_HEADS, DIM), server.k[layer, :length])) for layer in range(LAYERS)}
    row = torch.arange(1, length + 1, dtype=torch.int32)
    STATE.capture.begin(STATE.forward_id, [len(next(iter(queries.values())))], "cpu")
    for layer, q in queries.items():
        STATE.capture.record(layer, q, KV_HEADS * GROUP, DIM, SCALING[layer])
    STATE.capture.end()
    if config.policy_object.query_source == "positions":
        return position_scores(config.policy_object, row)
    policy = config.policy_object
    window = {layer: policy.used_window(q) for layer, q in STATE.capture.queries_of(0).items()}
    if config.policy == "laprox":
        factors = STATE.value_norm_factors
        values = {layer: torch.cat((torch.zeros(1, KV_HEADS, DIM), server.v[layer, :length]))
                  for layer in range(LAYERS)}
        return laprox_scores(window, SCALING, keys.__getitem__, row, policy.pool_width, attention_mass_paged,
                             lambda layer: projected_norms(values[layer], row, factors[layer]))
    rope = STATE.rope if config.policy == "dapq" else None
    return window_scores(window, SCALING, keys.__getitem__, row, policy.pool_width, attention_mass_paged, rope=rope)


def _reference_keep(server, length, queries, config=RESTORE):
    """The harness's rule over every logical token's K as computed."""
    scores = _reference_scores(server, length, queries, config)
    row = torch.arange(1, length + 1, dtype=torch.int32)
    return keep_mask(combined_scores(scores), dataclasses.replace(config, history="rescore"), row, 1, 0)


def test_a_later_turn_keeps_the_harness_keep_set_over_every_token_and_restores_its_kv():
    server = Server()
    server.finish(server.turn(40))
    node = _node_at(server, 40)
    value, host = node.value.clone(), getattr(node, HOST_SLOTS).clone()
    req = server.admit(60)
    assert req.cache_protected_len == 40
    server.prefill_end(req)
    row = server.row(req)
    expected = _reference_keep(server, 60, server.queries)
    assert torch.equal(is_live(row), expected)
    restored_positions, restored_slots = getattr(req, RESTORED)
    assert restored_positions.numel() > 0 and (host[restored_positions] >= 0).all()
    assert torch.equal(row[restored_positions], restored_slots)
    for layer in range(LAYERS):  # every kept token reads its K/V as computed
        kept = is_live(row).nonzero().flatten()
        assert torch.equal(server.kv.get_key_buffer(layer)[row[kept]], server.k[layer, kept])
        assert torch.equal(server.kv.get_value_buffer(layer)[row[kept]], server.v[layer, kept])
    # the shared node did not change: other sessions still match turn 1's holes and copies
    assert torch.equal(node.value, value) and torch.equal(getattr(node, HOST_SLOTS), host)
    assert STATE.restored_tokens >= restored_positions.numel()
    server.check([req])
    server.finish(req)
    server.check()
    # a third turn finds turn 1's holes in the tree, not turn 2's restorations
    third = server.admit(70)
    assert torch.equal(server.row(third)[:40], value)
    server.prefill_end(third)
    server.finish(third)
    server.check()


def test_the_next_turn_brings_back_what_the_previous_turn_restored_before_its_prefill():
    server = Server()
    server.finish(server.turn(40))
    second = server.turn(60)
    restored = getattr(second, RESTORED)[0].clone()
    assert restored.numel() > 0
    server.finish(second)
    leaf = _node_at(server, 60)
    assert torch.equal(getattr(leaf, CARRY), restored)
    upper = _node_at(server, 50)  # a split: a turn through either half brings them back
    assert upper is not leaf and torch.equal(getattr(upper, CARRY), restored)
    assert torch.equal(getattr(leaf, CARRY), restored)
    third = server.admit(80)
    assert (server.row(third)[restored] == HOLE).all()  # the tree holds turn 1's holes there
    server.before_prefill(third)
    row = server.row(third)
    assert is_live(row[restored]).all() and torch.equal(getattr(third, RESTORED)[0], restored)
    for layer in range(LAYERS):
        assert torch.equal(server.kv.get_key_buffer(layer)[row[restored]], server.k[layer, restored])
        assert torch.equal(server.kv.get_value_buffer(layer)[row[restored]], server.v[layer, restored])
    server.check([third])
    server.before_prefill(third)  # a later chunk: nothing more
    assert torch.equal(getattr(third, RESTORED)[0], restored)
    # after the prefill every token is rescored: the keep-set is the harness rule's, restored tokens it drops
    # are freed
    server.prefill_end(third)
    assert torch.equal(is_live(server.row(third)), _reference_keep(server, 80, server.queries))
    still = getattr(third, RESTORED)[0]
    assert is_live(server.row(third)[still]).all(), "a dropped restored token kept its slot"
    server.check([third])
    server.finish(third, insert=False)  # retracted: everything it restored goes back
    server.check()


def test_only_the_last_turns_restorations_are_carried():
    server = Server()
    for length in (40, 60, 80):
        server.finish(server.turn(length))
    second, third = getattr(_node_at(server, 60), CARRY), getattr(_node_at(server, 80), CARRY)
    dropped_by_third = sorted(set(second.tolist()) - set(third.tolist()))
    assert dropped_by_third, "the third turn dropped some of what the second restored (this seed)"
    fourth = server.admit(100)
    server.before_prefill(fourth)
    assert torch.equal(getattr(fourth, RESTORED)[0], third)
    assert (server.row(fourth)[dropped_by_third] == HOLE).all()
    server.finish(fourth, insert=False)
    server.check()


def test_every_turns_prefix_and_keep_set_are_the_harness_reversible_carry_ones():
    """bench/reversible_probe.py's ``reversible-carry`` arm, replayed on sets of positions: the tree takes the new
    tokens each turn keeps; the next turn is prefilled over the tree's tokens and the last keep-set; every logical
    token is then a candidate, scored from its K as computed."""
    server = Server(slots=200, host_tokens=200)
    tree, resident, previous = set(), set(), 0
    for length in (40, 60, 80, 100):
        req = server.admit(length)
        server.before_prefill(req)
        prefix = set(is_live(server.row(req)[:previous]).nonzero().flatten().tolist())
        assert prefix == {p for p in tree | resident if p < previous}, f"turn of {length}: prefilled over"
        server.prefill_end(req)
        resident = set(_reference_keep(server, length, server.queries).nonzero().flatten().tolist())
        assert set(is_live(server.row(req)).nonzero().flatten().tolist()) == resident, f"turn of {length}: kept"
        tree |= {p for p in resident if p >= previous}
        server.finish(req)
        server.check()
        previous = length


def test_a_chunked_later_turn_keeps_its_carried_tokens_through_its_chunks():
    server = Server()
    server.finish(server.turn(40))
    server.finish(server.turn(60))
    carried = getattr(_node_at(server, 60), CARRY).clone()
    req = server.admit(80)
    server.before_prefill(req)  # chunk 1 (positions 60..69)
    # between chunks the plugin keeps the chunk with the request (stash hook), SGLang's next prepare_for_extend
    # writes that prefix back into the row, the hook runs again
    req.extend_range = SimpleNamespace(end=70)
    sched = SimpleNamespace(tree_cache=server.tree, req_to_token_pool=server.req_to_token)
    scheduler.stash_chunked_request_around(lambda *a: pytest.fail("SGLang's insert between chunks"), sched, req)
    row = server.row(req)
    assert torch.equal(req.prefix_indices[carried], row[carried]) and is_live(row[carried]).all()
    server.req_to_token.write((req.req_pool_idx, slice(0, 70)), req.prefix_indices.to(torch.int32))
    server.before_prefill(req)  # chunk 2: nothing more to bring back
    assert torch.equal(getattr(req, RESTORED)[0], carried) and req.cache_protected_len == 60
    server.prefill_end(req)
    assert torch.equal(is_live(server.row(req)), _reference_keep(server, 80, server.queries))
    server.finish(req)
    server.check()


def _adder(server, chunk=8192):
    """What the hooks read of SGLang's ``PrefillAdder``; ``take`` (its original method) appends the request."""
    adder = SimpleNamespace(can_run_list=[], new_chunked_req=None, rem_chunk_tokens=chunk, tree_cache=server.tree,
                            dllm_config=None, is_hybrid_swa=False)

    def take(self, req, *args, **kwargs):
        req.set_extend_range(len(req.prefix_indices), len(req.full_untruncated_fill_ids))
        self.can_run_list.append(req)
        return AddReqResult.CONTINUE
    return adder, take


def test_a_later_turn_that_will_restore_has_its_last_chunk_cut_one_token_short():
    server = Server()
    first = server.admit(40)
    adder, take = _adder(server)
    assert scheduler.add_one_req_around(take, adder, first, False, None) == AddReqResult.CONTINUE
    assert first.extend_range.end == 40 and adder.new_chunked_req is None  # nothing in host memory to restore
    server.before_prefill(first)
    server.prefill_end(first)
    server.finish(first)
    req = server.admit(60)
    adder, take = _adder(server)
    assert scheduler.add_one_req_around(take, adder, req, has_chunked_req=False,
                                        truncation_align_size=None) == AddReqResult.OTHER
    assert (req.extend_range.start, req.extend_range.end) == (40, 59) and adder.new_chunked_req is req
    assert evict_at(req) == 59
    # its last chunk, after the cut one, is the last token alone: not cut again
    req.set_extend_range(59, 60)
    adder, take = _adder(server)
    assert scheduler.add_chunked_req_around(lambda self, r: self.can_run_list.append(r), adder, req) is None
    # a long prompt's last chunk is cut the same way
    req.set_extend_range(50, 60)
    adder, _ = _adder(server)
    assert scheduler.add_chunked_req_around(lambda self, r: self.can_run_list.append(r), adder, req) is req
    assert req.extend_range.end == 59
    # chunked prefill off; deterministic alignment; another request's chunks still running
    for chunk, chunking, align in ((None, False, None), (8192, False, 64), (8192, True, None)):
        req.set_extend_range(40, 60)
        adder, take = _adder(server, chunk)
        scheduler.add_one_req_around(take, adder, req, has_chunked_req=chunking, truncation_align_size=align)
        assert req.extend_range.end == 60 and adder.new_chunked_req is None
    setattr(req, EVICT_AT, 59)  # a retracted request's earlier cut
    with_rescore = dataclasses.replace(RESTORE, history="rescore")
    STATE.configure(with_rescore)
    try:
        adder, take = _adder(server)
        scheduler.add_one_req_around(take, adder, req, False, None)
        assert req.extend_range.end == 60 and evict_at(req) is None  # taken whole: no cut, none remembered
    finally:
        STATE.configure(RESTORE)
    server.finish(req, insert=False)
    server.check()


def test_sglangs_own_prefill_adder_cuts_through_the_plugins_hooks(monkeypatch):
    """SGLang 0.5.17's ``PrefillAdder`` (hooked by ``load_plugins`` above; the context-parallel switches a server
    publishes stubbed off) takes a restoring later turn as its chunked request, one token short."""
    import sglang.srt.managers.schedule_policy as schedule_policy

    monkeypatch.setattr(schedule_policy, "is_dsa_prefill_cp_in_seq_split", lambda: False)
    monkeypatch.setattr(schedule_policy, "is_prefill_context_parallel_enabled", lambda: False)
    server = Server()
    server.finish(server.turn(40))
    reqs = [server.admit(60, rid="a"), server.admit(30, rid="b", first_token=100)]
    for req in reqs:  # what add_one_req reads of SGLang's Req besides SimReq's fields
        req.sampling_params = SimpleNamespace(custom_params=None, max_new_tokens=8, ignore_eos=False)
        req.host_hit_length = req.swa_host_hit_length = 0
        req.retracted_stain, req.needs_host_load_back = False, lambda: False
    adder = schedule_policy.PrefillAdder(1, server.tree, server.allocator, None, 1.0, 10000, 8192)
    assert adder.add_one_req(reqs[0], has_chunked_req=False, truncation_align_size=None) == AddReqResult.OTHER
    assert adder.new_chunked_req is reqs[0] and (reqs[0].extend_range.start, reqs[0].extend_range.end) == (40, 59)
    assert evict_at(reqs[0]) == 59
    fresh = schedule_policy.PrefillAdder(1, server.tree, server.allocator, None, 1.0, 10000, 8192)
    assert fresh.add_one_req(reqs[1], has_chunked_req=False, truncation_align_size=None) == AddReqResult.CONTINUE
    assert fresh.new_chunked_req is None and reqs[1].extend_range.end == 30  # another conversation: no host copy
    for req in reqs:
        server.tree.dec_lock_ref(req.last_node)
        server.finish(req, insert=False)
    server.check()


def test_a_cut_turn_evicts_after_its_cut_chunk_and_its_last_token_runs_over_the_restored_keep_set(caplog):
    caplog.set_level("INFO", logger="sgl_evict")
    server = Server()
    server.finish(server.turn(40))
    server.finish(server.turn(60))
    carried = getattr(_node_at(server, 60), CARRY).clone()
    req = server.admit(80)
    adder, take = _adder(server)
    scheduler.add_one_req_around(take, adder, req, False, None)
    assert (req.extend_range.start, req.extend_range.end) == (60, 79)
    server.before_prefill(req)  # the previous turn's restorations come back before the cut chunk
    assert is_live(server.row(req)[carried]).all()
    batch = server.prefill_forward(req, end=79)
    req.inflight_middle_chunks = 1  # SGLang's count of the request's chunks in flight, as for any chunk
    assert must_process_first(batch, STATE)  # the overlap scheduler processes this result before launching more
    server.evict(batch)
    req.inflight_middle_chunks = 0  # SGLang's processing of the result
    assert "held-out tokens from host memory; its last prompt token runs next" in caplog.text
    row = server.row(req)
    assert torch.equal(is_live(row[:79]), _reference_keep(server, 79, server.queries))  # scored by the cut chunk
    dropped = carried[~is_live(row[carried])]
    assert dropped.numel() > 0, "the cut chunk's keep-set drops some carried tokens (this seed)"
    restored = getattr(req, RESTORED)[0].clone()
    # between chunks: the stash hook keeps the chunk with the request, the last token's chunk is prepared
    sched = SimpleNamespace(tree_cache=server.tree, req_to_token_pool=server.req_to_token)
    scheduler.stash_chunked_request_around(lambda *a: pytest.fail("SGLang's insert between chunks"), sched, req)
    req.set_extend_range(79, 80)
    server.before_prefill(req)  # nothing is brought back again: what the cut chunk dropped stays dropped
    assert (server.row(req)[dropped] == HOLE).all() and torch.equal(getattr(req, RESTORED)[0], restored)
    last = server.prefill_forward(req, start=79, end=80)
    assert not must_process_first(last, STATE)
    assert server.evict(last) == 0 and torch.equal(server.row(req)[:79], row[:79])  # no second eviction
    assert evict_at(req) is None
    server.tree.cache_unfinished_req(req)
    server.check([req])
    server.finish(req)
    server.check()


def test_a_later_turn_with_room_for_every_token_restores_them_all():
    server = Server()
    server.finish(server.turn(40))
    wide = dataclasses.replace(RESTORE, budget=Budget(tokens=100))
    req = server.admit(50)
    req.sampling_params.custom_params = {"kv_evict": {"budget": 100}}
    req.extra_key = server.namespace  # the tree's namespace: a test shortcut to reach turn 1's copies
    assert wide.budget.num_tokens(50) >= 50
    server.prefill_end(req)
    assert (server.row(req) != HOLE).all()
    server.finish(req)
    server.check()


def test_restore_without_free_slots_restores_fewer_and_never_the_locked_prefix():
    server = Server(slots=64)
    server.finish(server.turn(40))  # 12 live slots in the tree
    req = server.admit(60)
    hog = server.allocator.alloc(server.allocator.available_size())  # someone else holds every free slot
    server.prefill_end(req)
    restored = getattr(req, RESTORED, None)
    freed_own = 20 - int(is_live(server.row(req)[40:]).sum())
    assert restored is None or restored[0].numel() <= freed_own
    server.allocator.free(hog)
    server.finish(req)
    server.check()


@pytest.mark.parametrize("policy, continuation", [("streaming", 0), ("dapq", 0), ("laprox", 0), ("tova", 0),
                                                  ("laprox", 3)])
def test_every_restorable_policy_restores_what_the_harness_rule_keeps(policy, continuation, monkeypatch):
    config = EvictionConfig(policy=policy, budget=Budget(tokens=12), window=WINDOW, sinks=2, pooling_kernel=3,
                            history="restore", host_pool_gb=1.0, continuation=continuation)
    STATE.configure(config)
    monkeypatch.setattr(STATE, "rope", RopeSpec(inv_freq=1.0 / (10000 ** (torch.arange(0, DIM, 2).float() / DIM))))
    gen = torch.Generator().manual_seed(7)
    monkeypatch.setattr(STATE, "value_norm_factors", {layer: torch.randn(KV_HEADS * GROUP, DIM, DIM, generator=gen)
                                                      for layer in range(LAYERS)})
    server = Server(config=config)
    server.finish(server.turn(40))
    req = server.admit(60)
    server.prefill_end(req)
    assert torch.equal(is_live(server.row(req)), _reference_keep(server, 60, server.queries, config))
    server.finish(req)
    server.check()


# ---- property: random conversations keep every device and host slot accounted for ------------------------------

@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(["turn", "finish", "retract", "evict", "flush"]), st.integers(0, 3)),
                min_size=3, max_size=14))
def test_random_conversations_keep_every_slot_accounted_for(ops):
    server = Server(slots=120, host_tokens=60)
    running = []
    lengths = [20, 30, 45, 60]
    for op, arg in ops:
        if op == "turn" and len(running) < 2:
            length = lengths[arg]
            if length - 1 > server.allocator.available_size() + server.tree.evictable_size():
                continue
            running.append(server.turn(length, rid=f"r{len(running)}-{arg}"))
        elif op in ("finish", "retract") and running:
            server.finish(running.pop(arg % len(running)), insert=op == "finish")
        elif op == "evict":
            server.tree.evict(EvictParams(num_tokens=10 * (arg + 1)))
        elif op == "flush" and not running:
            server.tree.reset()
            server.allocator.clear()
        server.check(running)
