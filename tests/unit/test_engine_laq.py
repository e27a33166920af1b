"""laq inside the engine on CPU: pending after prefill, hidden view, decode query capture, eviction after lookahead.

SGLang's objects are faked (as in test_engine.py); the scoring goes through the real paged kernel (Triton
interpreter on CPU) and the final keep-set is compared with the harness's LookaheadQCache policy on the same keys.
"""

from types import SimpleNamespace

import torch

from sgl_evict.config import EvictionConfig
from sgl_evict.engine.capture import DecodeQueryCapture
from sgl_evict.engine.compact_view import enter_compacted, leave_compacted
from sgl_evict.engine.evict_batch import evict_after_lookahead, evict_after_prefill
from sgl_evict.engine.lookahead import record_step
from sgl_evict.engine.runtime import STATE, EngineState
from sgl_evict.holes import HOLE
from sgl_evict.kernels.paged_scoring import attention_mass_paged
from sgl_evict.observation import LayerObservation
from sgl_evict.policies import make_policy
from sgl_evict.selection import Budget, select_keep

KV_HEADS, GROUP, DIM, WINDOW, SINKS, STEPS = 2, 2, 16, 4, 2, 3
Q_HEADS = KV_HEADS * GROUP
LAYERS = (0, 1)
SCALING = {0: 0.3, 1: 0.2}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _req(rid, pool_idx, protected=0, custom=None):
    return SimpleNamespace(rid=rid, req_pool_idx=pool_idx, cache_protected_len=protected, inflight_middle_chunks=0,
                           is_retracted=False, finished=lambda: False,
                           sampling_params=SimpleNamespace(custom_params=custom))


class Setup:
    """Two requests after prefill: ``a`` (laq, 40 prompt tokens, 6 of them a tree-owned prefix) and ``b`` (snapkv
    by its own override, 30 tokens), their keys in a per-layer pool, their window queries captured."""

    def __init__(self, seed=0, budget=10, reserve=0.0):
        gen = _gen(seed)
        self.lens = [40, 30]
        self.pools = {layer: torch.randn(200, KV_HEADS, DIM, generator=gen) for layer in LAYERS}
        self.table = torch.zeros(8, 64, dtype=torch.int32)
        perm = torch.randperm(150, generator=gen).to(torch.int32) + 1
        self.table[1, :40], self.table[2, :30] = perm[:40], perm[40:70]
        self.decode_slots = perm[70:]  # slots the decode tokens take
        self.row_a = self.table[1, :40].clone()  # a's slots before any eviction (the harness reads these keys)
        self.state = EngineState()
        self.config = EvictionConfig(policy="laq", budget=Budget(tokens=budget), window=WINDOW, sinks=SINKS,
                                     pooling_kernel=5, lookahead_steps=STEPS, lookahead_reserve=reserve)
        self.state.configure(self.config)
        self.state.shadow_offset = 4
        self.state.forward_id = 1
        self.state.capture.begin(1, self.lens, "cpu")
        self.prefill_q = {layer: torch.randn(sum(self.lens), Q_HEADS * DIM, generator=gen) for layer in LAYERS}
        for layer in LAYERS:
            self.state.capture.record(layer, self.prefill_q[layer], Q_HEADS, DIM, SCALING[layer])
        self.state.capture.end()
        self.reqs = [_req("a", 1, protected=6), _req("b", 2, custom={"kv_evict": {"policy": "snapkv"}})]
        self.freed = []
        self.lookahead_q = {layer: torch.randn(STEPS, Q_HEADS, DIM, generator=gen) for layer in LAYERS}

    def prefill(self):
        batch = SimpleNamespace(reqs=self.reqs, decoding_reqs=None, seq_lens_cpu=torch.tensor(self.lens))
        return evict_after_prefill(batch, self.state, self.table, self.pools.__getitem__, self.freed.append,
                                   attention_mass_paged)

    def decode_step(self, step):
        """One decode forward of both requests: a's queries recorded, each request's new token written."""
        for i, req in enumerate(self.reqs):
            self.table[req.req_pool_idx, self.lens[i] + step] = self.decode_slots[2 * step + i]
        taken = {layer: self.lookahead_q[layer][step:step + 1] for layer in LAYERS}  # rows: pending requests
        record_step(["a", "b"], [0], taken, self.state.pending)

    def finish_lookahead(self):
        batch = SimpleNamespace(reqs=self.reqs)
        return evict_after_lookahead(batch, self.state, self.table, self.pools.__getitem__, self.freed.append,
                                     attention_mass_paged)

    def observation(self, layer):
        """The harness's view of request a's prompt in ``layer``."""
        row = self.row_a.long()
        start = 40 - WINDOW
        window = self.prefill_q[layer][start:40].view(WINDOW, Q_HEADS, DIM).transpose(0, 1)
        return LayerObservation(keys=self.pools[layer][row].transpose(0, 1), scaling=SCALING[layer],
                                num_q_heads=Q_HEADS, window_queries=window,
                                lookahead_queries=self.lookahead_q[layer].transpose(0, 1))


def _harness_mask(setup, policy, budget=None, among=None):
    """The harness policy's keep mask of request a; ``among``: a candidate mask outside which nothing is kept."""
    scores = torch.stack([policy.score(setup.observation(layer)) for layer in LAYERS])
    if among is not None:
        scores = scores * among
    return select_keep(scores, budget or setup.config.budget, SINKS, WINDOW, "uniform").mask(0)[0]


def test_laq_request_is_pending_after_prefill_with_the_snapkv_view_hidden_not_freed():
    setup = Setup()
    before = setup.table.clone()
    setup.prefill()
    entry = setup.state.pending["a"]
    assert torch.equal(setup.table[1], before[1])  # a's row untouched: nothing dropped yet
    assert setup.state.freed_slots == len(setup.freed[0]) == 30 - 10  # only b (snapkv) freed
    assert entry.prompt_len == 40 and entry.decoded == 0
    snapkv = _harness_mask(setup, make_policy("snapkv", pooling_kernel=5))
    assert torch.equal(entry.visible, snapkv)


def test_pending_request_attends_over_its_snapkv_view_plus_its_decode_tokens():
    setup = Setup()
    setup.prefill()
    setup.decode_step(0)
    visible = setup.state.pending["a"].visible
    mode = SimpleNamespace(is_extend=lambda: False)
    fb = SimpleNamespace(batch_size=2, forward_mode=mode, req_pool_indices=torch.tensor([1, 2]),
                         seq_lens=torch.tensor([41, 31]), seq_lens_cpu=torch.tensor([41, 31]), seq_lens_sum=72)
    saved = enter_compacted(fb, setup.table, setup.state.shadow_offset, [(0, visible)])
    row_a, row_b = setup.table[1, :41], setup.table[2, :31]
    expected_a = torch.cat((row_a[:40][visible], row_a[40:]))
    assert fb.seq_lens.tolist() == [expected_a.numel(), int((row_b != HOLE).sum())]
    assert torch.equal(setup.table[5, :expected_a.numel()], expected_a)
    assert torch.equal(setup.table[6, :fb.seq_lens[1]], row_b[row_b != HOLE])
    leave_compacted(fb, saved)
    assert (setup.table[1, :41] != HOLE).all()  # the logical row still holds every slot


def test_eviction_after_the_lookahead_steps_keeps_the_harness_laq_set_and_frees_once():
    setup = Setup()
    setup.prefill()
    row_before = setup.table[1, :40].clone()
    for step in range(STEPS - 1):
        setup.decode_step(step)
        assert setup.finish_lookahead() == 0 and "a" in setup.state.pending  # steps still to run
    setup.decode_step(STEPS - 1)
    freed = setup.finish_lookahead()
    expected = _harness_mask(setup, make_policy("laq", pooling_kernel=5, lookahead_steps=STEPS))
    row = setup.table[1, :40]
    assert torch.equal(row != HOLE, expected)
    assert "a" not in setup.state.pending
    # owned dropped slots freed exactly once; the tree-owned prefix only hidden; decode tokens kept
    dropped = ~expected
    owned = torch.arange(40) >= 6
    assert torch.equal(setup.freed[1], row_before[dropped & owned].long()) and freed == setup.freed[1].numel()
    assert setup.state.hidden_tokens == int((dropped & ~owned).sum())
    assert (setup.table[1, 40:40 + STEPS] != HOLE).all()
    assert setup.finish_lookahead() == 0 and len(setup.freed) == 2  # nothing freed twice
    all_freed = torch.cat(setup.freed)
    assert all_freed.unique().numel() == all_freed.numel()


def test_lookahead_differs_from_snapkv_so_the_test_above_sees_the_lookahead():
    setup = Setup()
    laq = _harness_mask(setup, make_policy("laq", pooling_kernel=5, lookahead_steps=STEPS))
    assert not torch.equal(laq, _harness_mask(setup, make_policy("snapkv", pooling_kernel=5)))


def test_steps_without_recorded_queries_still_count_and_fall_back_to_the_snapkv_set():
    setup = Setup()
    setup.prefill()
    visible = setup.state.pending["a"].visible.clone()
    for _ in range(STEPS):  # each step launched, then its result processed
        record_step(["a", "b"], [0], {}, setup.state.pending)
        setup.finish_lookahead()
    assert torch.equal(setup.table[1, :40] != HOLE, visible)


def test_request_ending_during_its_lookahead_keeps_its_full_cache_and_frees_nothing(monkeypatch):
    from sgl_evict.patches.lookahead import req_row_free_before

    setup = Setup()
    monkeypatch.setattr(STATE, "config", setup.state.config)
    monkeypatch.setattr(STATE, "pending", setup.state.pending)
    setup.prefill()
    req = setup.reqs[0]
    # (the prefill-end radix insert leaves its prompt with it: tests/sglang/test_radix_holes.py, on SGLang's tree)
    setup.decode_step(0)
    before = setup.table.clone()
    assert req_row_free_before(None, req) is None  # SGLang frees its row: finished, aborted or retracted
    assert "a" not in STATE.pending
    assert setup.finish_lookahead() == 0 and torch.equal(setup.table, before) and len(setup.freed) == 1


def test_decode_capture_reads_gemma3s_batched_non_contiguous_queries():
    q = torch.randn(1, Q_HEADS, 4, DIM, generator=_gen(5)).permute(0, 2, 1, 3)  # Gemma 3: [1, bs, heads, dim]
    capture = DecodeQueryCapture()
    capture.allocate({2: (Q_HEADS, DIM)}, 2, q.dtype, "cpu")
    capture.begin([2, 0], "cpu")
    capture.record(2, q, Q_HEADS, DIM, capturing=True)
    assert torch.equal(capture.take()[2], q[0, [2, 0]])
    capture.begin([3], "cpu")
    capture.record(2, q, Q_HEADS, DIM, capturing=False)
    assert torch.equal(capture.take()[2], q[0, [3]])


def test_decode_capture_gathers_wanted_rows_eagerly_and_from_static_buffers():
    q = torch.randn(5, Q_HEADS * DIM, generator=_gen(3))
    rows = q.view(5, Q_HEADS, DIM)
    capture = DecodeQueryCapture()
    capture.allocate({7: (Q_HEADS, DIM)}, 2, q.dtype, "cpu")
    capture.begin([3, 1], "cpu")
    capture.record(7, q, Q_HEADS, DIM, capturing=False)  # an eager forward
    assert torch.equal(capture.take()[7], rows[[3, 1]])
    # in a graph the gather reads the static index begin() wrote, into the static buffer take() copies
    capture.begin([4, 0], "cpu")
    capture.record(7, q, Q_HEADS, DIM, capturing=True)
    taken = capture.take()[7]
    assert torch.equal(taken, rows[[4, 0]])
    capture.begin([1], "cpu")  # a smaller batch: no position of the larger one is left in the static index
    capture.record(7, q[:2], Q_HEADS, DIM, capturing=True)
    assert torch.equal(capture.take()[7], rows[[1]])
    capture.begin([4, 0, 2], "cpu")  # more than a replay can gather: the batch must run eagerly
    assert capture.needs_eager
    capture.begin([], "cpu")
    assert not capture.needs_eager and capture.take() == {}
    capture.begin([4], "cpu")
    capture.take()
    capture.begin([], "cpu")  # a batch wanting nothing still replays the gather: no stale position may remain
    capture.record(7, q[:2], Q_HEADS, DIM, capturing=True)
    assert capture.take() == {}


def test_model_runner_hook_hides_records_and_counts_a_decode_step(monkeypatch):
    from sgl_evict.patches import attention, model_runner

    setup = Setup()
    for name in ("config", "capture", "decode_capture", "pending", "shadow_offset"):
        monkeypatch.setattr(STATE, name, getattr(setup.state, name))
    setup.prefill()
    for i, req in enumerate(setup.reqs):
        setup.table[req.req_pool_idx, setup.lens[i]] = setup.decode_slots[i]
    visible = STATE.pending["a"].visible
    q = torch.randn(2, Q_HEADS * DIM, generator=_gen(4))
    mode = SimpleNamespace(is_extend=lambda: False, is_decode=lambda: True)
    fb = SimpleNamespace(batch_size=2, forward_mode=mode, req_pool_indices=torch.tensor([2, 1]), rids=["b", "a"],
                         seq_lens=torch.tensor([31, 41]), seq_lens_cpu=torch.tensor([31, 41]), seq_lens_sum=72)
    layer = SimpleNamespace(sliding_window_size=-1, layer_id=0, tp_q_head_num=Q_HEADS, qk_head_dim=DIM)
    seen = {}

    def model_forward(runner, batch):
        seen["lens"] = batch.seq_lens.tolist()
        attention.forward_around(lambda *a: None, layer, q, None, None, batch)

    runner = SimpleNamespace(req_to_token_pool=SimpleNamespace(req_to_token=setup.table))
    model_runner.forward_around(model_forward, runner, fb)
    assert seen["lens"] == [31 - 20, int(visible.sum()) + 1]
    entry = STATE.pending["a"]
    assert entry.decoded == 1 and torch.equal(entry.queries()[0][:, 0], q[1].view(Q_HEADS, DIM))
    assert fb.seq_lens.tolist() == [31, 41] and fb.rids == ["b", "a"]  # logical fields back


def test_decode_result_hook_evicts_before_sglang_processes_the_result(monkeypatch):
    from sgl_evict.patches import lookahead as hooks

    setup = Setup()
    for name in ("config", "pending"):
        monkeypatch.setattr(STATE, name, getattr(setup.state, name))
    setup.prefill()
    allocator = SimpleNamespace(get_kvcache=lambda: SimpleNamespace(get_key_buffer=setup.pools.__getitem__),
                                free=setup.freed.append, page_size=1)
    processor = SimpleNamespace(server_args=SimpleNamespace(tp_size=1), token_to_kv_pool_allocator=allocator,
                                req_to_token_pool=SimpleNamespace(req_to_token=setup.table))
    seen = []

    def process(self, batch, result):  # SGLang's: appends tokens, releases finished requests
        seen.append(int((setup.table[1, :40] == HOLE).sum()))
        return "processed"

    for step in range(STEPS):  # each step's result processed after its forward, as SGLang does
        setup.decode_step(step)
        assert hooks.process_batch_result_decode_around(process, processor, SimpleNamespace(reqs=setup.reqs),
                                                        None) == "processed"
    assert seen == [0] * (STEPS - 1) + [40 - 10] and "a" not in STATE.pending


def test_a_batch_with_more_pending_requests_than_a_replay_gathers_runs_eagerly(monkeypatch):
    from sgl_evict.patches.lookahead import can_run_graph_around

    capture = DecodeQueryCapture()
    capture.allocate({0: (Q_HEADS, DIM)}, 1, torch.float32, "cpu")
    monkeypatch.setattr(STATE, "decode_capture", capture)
    capture.begin([0], "cpu")
    assert can_run_graph_around(lambda *a: True, None, None)
    capture.begin([0, 1], "cpu")
    assert not can_run_graph_around(lambda *a: True, None, None)


def test_a_reserve_frees_all_but_the_snapkv_best_before_the_lookahead_and_chooses_among_them_after():
    setup = Setup(seed=1, reserve=2.0)
    row_before = setup.table[1, :40].clone()
    snapkv = make_policy("snapkv", pooling_kernel=5)
    wide = _harness_mask(setup, snapkv, budget=Budget(tokens=20))
    setup.prefill()
    entry = setup.state.pending["a"]
    owned = torch.arange(40) >= 6
    # right after prefill: a's row keeps its 20 snapkv-best (owned slots outside freed, the tree's prefix hidden)
    assert torch.equal(setup.table[1, :40] != HOLE, wide)
    assert torch.equal(setup.freed[0], row_before[~wide & owned].long())
    assert torch.equal(entry.visible, _harness_mask(setup, snapkv)) and not (entry.visible & ~wide).any()
    for step in range(STEPS):  # each step's result processed after it; the last one evicts
        setup.decode_step(step)
        freed = setup.finish_lookahead()
    # the re-score runs over the 20 candidates only (the others are gone, so attention renormalizes over them):
    # it keeps the budget, the protected sinks and window among them, and frees each dropped slot once
    kept = setup.table[1, :40] != HOLE
    assert int(kept.sum()) == 10 and not (kept & ~wide).any()
    assert kept[:SINKS].all() and kept[-WINDOW:].all()
    assert torch.equal(setup.freed[2], row_before[wide & ~kept & owned].long()) and freed == len(setup.freed[2])
    everything = torch.cat([setup.freed[0], setup.freed[2]])
    assert torch.equal(torch.sort(everything).values, torch.sort(row_before[~kept & owned].long()).values)
    assert setup.state.hidden_tokens == int((~kept & ~owned).sum())  # the tree's prefix: hidden, never freed


def test_a_reserve_covering_the_prompt_keeps_what_laq_keeps_without_one():
    setup = Setup(seed=1, reserve=4.0)  # 4 x 10 tokens: every one of the 40
    setup.prefill()
    assert len(setup.freed) == 1  # only b's eviction: a's reserve holds its whole prompt
    for step in range(STEPS):
        setup.decode_step(step)
        setup.finish_lookahead()
    expected = _harness_mask(setup, make_policy("laq", pooling_kernel=5, lookahead_steps=STEPS))
    assert torch.equal(setup.table[1, :40] != HOLE, expected)


def test_the_reserve_changes_the_keep_set_here_so_the_test_above_sees_it():
    setup = Setup(seed=1)
    wide = _harness_mask(setup, make_policy("snapkv", pooling_kernel=5), budget=Budget(tokens=20))
    laq = make_policy("laq", pooling_kernel=5, lookahead_steps=STEPS)
    assert (_harness_mask(setup, laq) & ~wide).any()  # laq alone keeps tokens outside the reserve


def test_a_request_ending_during_its_lookahead_keeps_its_reserve(monkeypatch):
    from sgl_evict.patches.lookahead import req_row_free_before

    setup = Setup(reserve=2.0)
    monkeypatch.setattr(STATE, "config", setup.state.config)
    monkeypatch.setattr(STATE, "pending", setup.state.pending)
    setup.prefill()
    after_prefill = setup.table.clone()
    setup.decode_step(0)
    assert req_row_free_before(None, setup.reqs[0]) is None
    assert setup.finish_lookahead() == 0 and len(setup.freed) == 2  # b's eviction and a's reserve, nothing more
    assert torch.equal(setup.table[1, :40], after_prefill[1, :40])


def test_a_pending_request_keeps_its_config_so_its_decode_steps_do_not_parse_its_override_again(monkeypatch):
    setup = Setup()
    setup.prefill()
    assert setup.state.pending["a"].config == setup.state.config_of(setup.reqs[0])

    def parse_again(req):
        raise AssertionError(f"config_of({req.rid}) called during the lookahead steps")

    monkeypatch.setattr(setup.state, "config_of", parse_again)
    for step in range(STEPS):
        setup.decode_step(step)
        setup.finish_lookahead()
    assert "a" not in setup.state.pending and len(setup.freed) == 2


def test_log_keep_logs_the_lookahead_view_and_the_final_keep_set_for_the_soak_replay(monkeypatch, caplog):
    """With SGL_EVICT_LOG_KEEP=1 a laq request logs what its lookahead steps attend to and what it keeps in the
    end, in the lines bench/soak_replay.py parses (without the lookahead line a laq answer cannot be replayed)."""
    from bench.soak_replay import LoggedEvictions

    monkeypatch.setenv("SGL_EVICT_LOG_KEEP", "1")
    setup = Setup()
    with caplog.at_level("INFO", logger="sgl_evict"):
        setup.prefill()
        view = setup.state.pending["a"].visible.nonzero().flatten().tolist()
        for step in range(STEPS):
            setup.decode_step(step)
            setup.finish_lookahead()
    logged = LoggedEvictions.parse(caplog.text)
    assert logged.lookahead == {"a": [view]} and len(view) < 40
    assert logged.keeps["a"] == [(setup.table[1, :40] != HOLE).nonzero().flatten().tolist()]
    assert logged.keeps["a"][0] != view  # the lookahead changed the keep-set: both lines are needed
    assert logged.lengths["a"] == [40] and logged.lengths["b"] == [30] and "b" not in logged.lookahead
