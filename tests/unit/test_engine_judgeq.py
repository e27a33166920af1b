"""judgeq inside the engine on CPU: the soft tokens' extra forward (temporary slots, rows put back), their queries
scoring the prompt as the harness's JudgeQ policy does, the soft-token file checked against the served model.

SGLang's objects and the model forward are faked (as in test_engine_laq.py): the fake forward does what the model
runner and attention hooks do, capturing given queries; the scoring goes through the real paged kernel (Triton
interpreter on CPU).
"""

from types import SimpleNamespace

import pytest
import torch

from sgl_evict.config import EvictionConfig
from sgl_evict.engine.evict_batch import evict_after_prefill
from sgl_evict.engine.judgeq import ServedSoftTokens, load_served_soft_tokens, soft_token_queries
from sgl_evict.engine.runtime import EngineState
from sgl_evict.holes import HOLE
from sgl_evict.kernels.paged_scoring import attention_mass_paged
from sgl_evict.observation import LayerObservation
from sgl_evict.patches.judgeq import served_model_fingerprint
from sgl_evict.policies import make_policy
from sgl_evict.selection import Budget, select_keep
from sgl_evict.soft_tokens import SoftTokens, model_fingerprint

KV_HEADS, GROUP, DIM, WINDOW, SINKS, K, HIDDEN = 2, 2, 16, 4, 2, 3, 8
Q_HEADS = KV_HEADS * GROUP
LAYERS = (0, 1)
SCALING = {0: 0.3, 1: 0.2}


def _req(rid, pool_idx, protected=0, custom=None):
    return SimpleNamespace(rid=rid, req_pool_idx=pool_idx, cache_protected_len=protected, inflight_middle_chunks=0,
                           is_retracted=False, finished=lambda: False,
                           sampling_params=SimpleNamespace(custom_params=custom))


class FakeAllocator:
    """Slots 150.. handed out in order; what was freed, recorded."""

    def __init__(self, room=50):
        self.next, self.room, self.freed = 150, room, []

    def alloc(self, n):
        if n > self.room:
            return None
        self.room -= n
        self.next += n
        return torch.arange(self.next - n, self.next, dtype=torch.int64)

    def free(self, slots):
        self.freed.append(slots.clone())
        self.room += slots.numel()


class FakeSoftForward:
    """Stands in for ``ModelRunner.forward`` on the soft tokens' batch: checks what the model would be fed, then
    captures ``queries`` (layer id -> ``[n * k, num_q_heads * dim]``) as the forward and attention hooks do."""

    def __init__(self, state, table, queries):
        self.state, self.table, self.queries = state, table, queries
        self.seen = []

    def __call__(self, extend):
        k = extend.tokens_per_request
        rows = [self.table[int(r), n:n + k].clone() for r, n in zip(extend.req_pool_indices, extend.prompt_lens)]
        self.seen.append((extend, rows, self.state.capture))
        self.state.forward_id += 1
        self.state.capture.begin(self.state.forward_id, [k] * len(extend.prompt_lens), "cpu")
        for layer, q in self.queries.items():
            self.state.capture.record(layer, q, Q_HEADS, DIM, SCALING[layer])
        self.state.capture.end()


def _soft(gen):
    return ServedSoftTokens(torch.randn(K, HIDDEN, generator=gen), "soft.safetensors")


def _state(config):
    state = EngineState()
    state.configure(config)
    state.forward_id = 1
    return state


def test_soft_token_forward_uses_temporary_slots_after_each_prompt_then_puts_the_rows_back():
    gen = torch.Generator().manual_seed(0)
    table = torch.randint(1, 100, (4, 64), generator=gen, dtype=torch.int32)
    before = table.clone()
    state = _state(EvictionConfig(policy="snapkv", budget=Budget(tokens=4), window=WINDOW))
    prefill_capture = state.capture
    queries = {layer: torch.randn(2 * K, Q_HEADS * DIM, generator=gen) for layer in LAYERS}
    forward, allocator, soft = FakeSoftForward(state, table, queries), FakeAllocator(), _soft(gen)
    found = soft_token_queries([(1, 3, 20), (0, 2, 11)], soft, table, allocator.alloc, allocator.free, state,
                               forward)
    extend, rows, capture = forward.seen[0]
    assert extend.batch_indices == [1, 0] and extend.req_pool_indices.tolist() == [3, 2]
    assert extend.prompt_lens == [20, 11] and extend.out_cache_loc.tolist() == list(range(150, 156))
    assert torch.equal(extend.input_embeds, soft.embeddings.repeat(2, 1))
    # during the forward each row held its temporary slots right after its prompt, and the capture took k rows
    assert rows[0].tolist() == [150, 151, 152] and rows[1].tolist() == [153, 154, 155]
    assert capture is not prefill_capture and capture.window == K
    # afterwards: rows as before, every temporary slot freed once, the prefill's capture back
    assert torch.equal(table, before)
    assert torch.equal(torch.cat(allocator.freed), extend.out_cache_loc) and allocator.room == 50
    assert state.capture is prefill_capture
    for j in range(2):
        for layer in LAYERS:
            expected = queries[layer][j * K:(j + 1) * K].view(K, Q_HEADS, DIM).transpose(0, 1)
            assert torch.equal(found.queries[j][layer], expected)
    assert found.scaling == SCALING


def test_soft_token_forward_puts_the_rows_back_when_the_forward_fails():
    table = torch.arange(64, dtype=torch.int32).view(1, 64).repeat(3, 1)
    before = table.clone()
    state = _state(EvictionConfig(policy="snapkv", budget=Budget(tokens=4)))
    prefill_capture, allocator = state.capture, FakeAllocator()

    def failing(extend):
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        soft_token_queries([(0, 1, 30)], _soft(torch.Generator()), table, allocator.alloc, allocator.free, state,
                           failing)
    assert torch.equal(table, before) and len(allocator.freed) == 1 and state.capture is prefill_capture


class Setup:
    """A prefill batch of ``a`` (judgeq, 40 prompt tokens, 6 of them a tree-owned prefix) and ``b`` (snapkv by its
    own override, 30 tokens): keys in a per-layer pool, window queries captured, soft-token queries given."""

    def __init__(self, seed=0, budget=10, room=50):
        gen = torch.Generator().manual_seed(seed)
        self.lens = [40, 30]
        self.pools = {layer: torch.randn(200, KV_HEADS, DIM, generator=gen) for layer in LAYERS}
        self.table = torch.zeros(4, 64, dtype=torch.int32)
        perm = torch.randperm(140, generator=gen).to(torch.int32) + 1
        self.table[1, :40], self.table[2, :30] = perm[:40], perm[40:70]
        self.config = EvictionConfig(policy="judgeq", budget=Budget(tokens=budget), window=WINDOW, sinks=SINKS,
                                     pooling_kernel=5, soft_tokens=__file__)
        self.state = _state(self.config)
        self.state.soft_tokens = _soft(gen)
        self.state.capture.begin(1, self.lens, "cpu")
        for layer in LAYERS:
            self.state.capture.record(layer, torch.randn(70, Q_HEADS * DIM, generator=gen), Q_HEADS, DIM,
                                      SCALING[layer])
        self.state.capture.end()
        self.reqs = [_req("a", 1, protected=6), _req("b", 2, custom={"kv_evict": {"policy": "snapkv"}})]
        self.soft_q = {layer: torch.randn(K, Q_HEADS * DIM, generator=gen) for layer in LAYERS}
        self.allocator = FakeAllocator(room)
        self.forward = FakeSoftForward(self.state, self.table, self.soft_q)
        self.batch = SimpleNamespace(reqs=self.reqs, decoding_reqs=None, seq_lens_cpu=torch.tensor(self.lens))

    def soft_token_forward(self, judged):
        return soft_token_queries(judged, self.state.soft_tokens, self.table, self.allocator.alloc,
                                  self.allocator.free, self.state, self.forward)

    def prefill(self, page_size=1, with_forward=True):
        freed = []
        n = evict_after_prefill(self.batch, self.state, self.table, self.pools.__getitem__, freed.append,
                                attention_mass_paged, page_size=page_size,
                                soft_token_forward=self.soft_token_forward if with_forward else None)
        return n, freed

    def harness_mask(self):
        """The harness's JudgeQ keep-set of a's prompt from the same keys and soft-token queries."""
        row = self.table[1, :40].long()
        policy = make_policy("judgeq", pooling_kernel=5)
        scores = torch.stack([policy.score(LayerObservation(
            keys=self.pools[layer][row].transpose(0, 1), scaling=SCALING[layer], num_q_heads=Q_HEADS,
            soft_token_queries=self.soft_q[layer].view(K, Q_HEADS, DIM).transpose(0, 1))) for layer in LAYERS])
        return select_keep(scores, self.config.budget, SINKS, WINDOW, "uniform").mask(0)[0]


def test_judgeq_request_keeps_the_harness_judgeq_set_and_the_batch_keeps_its_lengths():
    setup = Setup()
    before = setup.table.clone()
    expected = setup.harness_mask()
    setup.prefill()
    row = setup.table[1, :40]
    assert torch.equal(row != HOLE, expected)
    assert int((row != HOLE).sum()) == 10 and int((setup.table[2, :30] != HOLE).sum()) == 10  # b: snapkv
    # only the judged request ran the soft tokens, once; the rows after the prompts and the lengths are as before
    assert len(setup.forward.seen) == 1 and setup.forward.seen[0][0].batch_indices == [0]
    assert torch.equal(setup.table[:, 40:], before[:, 40:]) and setup.batch.seq_lens_cpu.tolist() == [40, 30]
    # the temporary slots went back; a's dropped slots it owns (after its 6-token prefix) were freed
    assert torch.cat(setup.allocator.freed).tolist() == [150, 151, 152]


def test_judgeq_keeps_the_full_cache_without_soft_tokens_a_forward_room_or_single_token_pages():
    for case in ("no file", "no forward", "no room", "pages"):
        setup = Setup(room=0 if case == "no room" else 50)
        if case == "no file":
            setup.state.soft_tokens = None
        before = setup.table[1].clone()
        setup.prefill(page_size=4 if case == "pages" else 1, with_forward=case != "no forward")
        assert torch.equal(setup.table[1], before), case
        assert not setup.forward.seen and not setup.allocator.freed, case


def _save(path, fingerprint, rows=K, hidden=HIDDEN):
    SoftTokens(torch.randn(rows, hidden), fingerprint).save(path)
    return str(path)


def test_served_soft_tokens_are_checked_against_the_model(tmp_path):
    good = _save(tmp_path / "good.safetensors", "abc")
    loaded = load_served_soft_tokens(good, "abc", HIDDEN, torch.bfloat16, "cpu")
    assert loaded.count == K and loaded.embeddings.dtype == torch.bfloat16
    other = _save(tmp_path / "other.safetensors", "xyz")
    with pytest.raises(ValueError, match=r"--kv-evict-soft-tokens .*other\.safetensors: .*trained for model "
                                         r"fingerprint xyz, but the loaded model is abc"):
        load_served_soft_tokens(other, "abc", HIDDEN, torch.float32, "cpu")
    wide = _save(tmp_path / "wide.safetensors", "abc", hidden=HIDDEN + 1)
    with pytest.raises(ValueError, match=r"--kv-evict-soft-tokens .*wide\.safetensors: soft tokens must be "
                                         r"\[k >= 1, hidden_size=8\]"):
        load_served_soft_tokens(wide, "abc", HIDDEN, torch.float32, "cpu")
    with pytest.raises(ValueError, match="--kv-evict-soft-tokens .*missing: soft-token file not found"):
        load_served_soft_tokens(str(tmp_path / "missing"), "abc", HIDDEN, torch.float32, "cpu")


def test_served_model_fingerprint_equals_the_harness_fingerprint_padded_or_sharded():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=70, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    harness = model_fingerprint(config.get_text_config(), model.get_input_embeddings().weight)
    table = model.get_input_embeddings().weight.detach()
    padded = torch.cat((table, torch.zeros(58, 32)))  # SGLang pads the vocabulary to a multiple of 64 per rank
    assert served_model_fingerprint(config, padded) == harness
    shards = padded.chunk(2)  # two tensor-parallel ranks; all-gathered along the vocabulary
    assert served_model_fingerprint(config, shards[0], lambda t, dim: torch.cat(shards, dim)) == harness
    assert served_model_fingerprint(config, padded + 1e-2) != harness


def test_namespace_follows_the_soft_token_files_content(tmp_path):
    path = tmp_path / "soft.safetensors"
    path.write_bytes(b"first")
    config = EvictionConfig(policy="judgeq", budget=Budget(tokens=8), soft_tokens=str(path))
    first = config.fingerprint()
    assert EvictionConfig(policy="judgeq", budget=Budget(tokens=8), soft_tokens=str(path)).fingerprint() == first
    path.write_bytes(b"second, rewritten in place")
    assert config.fingerprint() != first
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(path.read_bytes())  # another path with the same vectors: the same keep-sets
    assert EvictionConfig(policy="judgeq", budget=Budget(tokens=8), soft_tokens=str(copy)).fingerprint() == \
        config.fingerprint()
