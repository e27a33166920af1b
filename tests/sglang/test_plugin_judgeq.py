"""judgeq in an SGLang 0.5.17 scheduler on CPU: the soft-token file loaded and checked at start, and the soft tokens'
extra forward built as SGLang's own ``ForwardBatch`` and run through the plugin's forward and attention hooks.

The model is a stand-in (one linear query projection per layer, fed through the real ``RadixAttention`` hook), so
what the soft tokens' queries are is known; SGLang's ``ScheduleBatch`` and ``ForwardBatch.init_new`` are real.
"""

from types import SimpleNamespace

import pytest
from sglang_guard import sglang_or_skip

with sglang_or_skip():
    import torch
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.managers.schedule_batch import ScheduleBatch
    from sglang.srt.model_executor.forward_batch_info import ForwardMode
    from sglang.srt.runtime_context import get_parallel

from sgl_evict.config import EvictionConfig
from sgl_evict.engine.judgeq import ServedSoftTokens
from sgl_evict.engine.runtime import STATE
from sgl_evict.patches import attention, model_runner, scheduler
from sgl_evict.patches.judgeq import SoftTokenForward, load_soft_tokens, served_model_fingerprint
from sgl_evict.selection import Budget
from sgl_evict.soft_tokens import SoftTokens

HIDDEN, HEADS, DIM, K, SHADOW = 8, 2, 4, 3, 4
LAYERS = (0, 1)


@pytest.fixture
def state():
    saved = STATE.config, STATE.shadow_offset, STATE.soft_tokens, STATE.forward_id, STATE.rope, STATE.protected_recent
    yield STATE
    STATE.configure(saved[0])
    STATE.shadow_offset, STATE.soft_tokens, STATE.forward_id, STATE.rope, STATE.protected_recent = saved[1:]


class QueryModel(torch.nn.Module):
    """Per layer: ``q = hidden @ proj[layer]`` ``[tokens, HEADS * DIM]`` through the plugin's attention hook."""

    def __init__(self, vocab=70):
        super().__init__()
        gen = torch.Generator().manual_seed(1)
        self.embed = torch.nn.Embedding(vocab, HIDDEN, dtype=torch.bfloat16)
        self.proj = {layer: torch.randn(HIDDEN, HEADS * DIM, generator=gen) for layer in LAYERS}
        self.attn = {layer: RadixAttention(HEADS, DIM, 0.5, HEADS, layer_id=layer) for layer in LAYERS}
        self.seen = []

    def get_input_embeddings(self):
        return self.embed

    def forward(self, forward_batch):
        self.seen.append(forward_batch)
        hidden = forward_batch.input_embeds.float()
        for layer in LAYERS:
            q = hidden @ self.proj[layer]
            attention.forward_around(lambda *args, **kwargs: None, self.attn[layer], q, q, q, forward_batch)


class FakeRunner:
    """What ``ForwardBatch.init_new`` and the model-runner hook read of SGLang's ``ModelRunner``."""

    def __init__(self, model, table):
        self.model, self.device, self.is_draft_worker = model, "cpu", False
        self.server_args = SimpleNamespace(attention_backend="torch_native", enable_lora=False)
        self.model_config = SimpleNamespace(model_is_mrope=False)
        self.ngram_embedding_manager = SimpleNamespace(enabled=False)
        self.req_to_token_pool = SimpleNamespace(req_to_token=table)

    def forward(self, forward_batch):
        return model_runner.forward_around(lambda runner, fb: runner.model(fb), self, forward_batch)


class FakeAllocator:
    def __init__(self):
        self.freed = []

    def alloc(self, n):
        return torch.arange(100, 100 + n, dtype=torch.int64)

    def free(self, slots):
        self.freed.append(slots)


def _scheduler(model, table, soft_path=None, tp_size=1):
    runner = FakeRunner(model, table)
    hf = SimpleNamespace(model_type="llama", hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=HEADS,
                         num_key_value_heads=HEADS, head_dim=DIM, vocab_size=model.embed.num_embeddings - 6)
    return SimpleNamespace(tp_worker=SimpleNamespace(model_runner=runner), model_config=SimpleNamespace(
        hf_text_config=hf), server_args=SimpleNamespace(tp_size=tp_size),
        req_to_token_pool=runner.req_to_token_pool, token_to_kv_pool_allocator=FakeAllocator())


def _prefill_batch(lens):
    reqs = [SimpleNamespace(rid=f"r{i}", lora_id=None, token_type_ids=None) for i in range(len(lens))]
    seq_lens = torch.tensor(lens, dtype=torch.int64)
    return ScheduleBatch(reqs=reqs, forward_mode=ForwardMode.EXTEND, seq_lens=seq_lens, seq_lens_cpu=seq_lens,
                         req_pool_indices=torch.tensor([1, 2]), input_ids=torch.ones(sum(lens), dtype=torch.int64),
                         extend_lens=list(lens), prefix_lens=[0] * len(lens), extend_num_tokens=sum(lens))


@pytest.mark.parametrize("owner", ["Scheduler", "SchedulerBatchResultProcessor"])
def test_soft_tokens_run_as_one_sglang_extend_batch_after_the_prompts(state, owner):
    """``owner``: what the prefill-result hook is bound to. SGLang 0.5.17 calls it on its
    SchedulerBatchResultProcessor, which holds the worker as ``model_worker`` (no ``tp_worker``)."""
    state.configure(EvictionConfig(policy="judgeq", budget=Budget(tokens=4), soft_tokens=__file__))
    state.shadow_offset = SHADOW
    soft = torch.randn(K, HIDDEN, generator=torch.Generator().manual_seed(0))
    state.soft_tokens = ServedSoftTokens(soft, "soft.safetensors")
    table = torch.zeros(2 * SHADOW, 32, dtype=torch.int32)
    table[1, :10], table[2, :6] = torch.arange(1, 11), torch.arange(11, 17)
    before = table.clone()
    model = QueryModel()
    sched = _scheduler(model, table)
    if owner == "SchedulerBatchResultProcessor":
        sched.model_worker = sched.tp_worker
        del sched.tp_worker
    prefill = _prefill_batch([10, 6])
    prefill_fields = (prefill.reqs, prefill.seq_lens, prefill.input_ids, prefill.forward_mode)
    with get_parallel().override(moe_ep_size=1):  # one process, no parallel groups initialised
        found = SoftTokenForward(sched, prefill)([(1, 2, 6), (0, 1, 10)])
    fb = model.seen[0]
    # positions continue each prompt; the rows were read with the soft tokens' slots after the prompts
    assert fb.positions.tolist() == [6, 7, 8, 10, 11, 12]
    assert fb.extend_prefix_lens_cpu == [6, 10] and fb.extend_seq_lens_cpu == [K, K]
    assert fb.out_cache_loc.tolist() == list(range(100, 106)) and fb.rids == ["r1", "r0"]
    assert torch.equal(fb.input_embeds, soft.repeat(2, 1)) and not fb.return_logprob
    # attention read each prompt's slots followed by its soft tokens' (the compacted shadow rows it is pointed at)
    assert table[SHADOW + 2, :9].tolist() == [*range(11, 17), 100, 101, 102]
    assert table[SHADOW + 1, :13].tolist() == [*range(1, 11), 103, 104, 105]
    # afterwards the logical rows, the prefill batch and the lengths are as before, the slots freed
    assert torch.equal(table[:SHADOW], before[:SHADOW]) and torch.equal(sched.token_to_kv_pool_allocator.freed[0], fb.out_cache_loc)
    assert prefill_fields == (prefill.reqs, prefill.seq_lens, prefill.input_ids, prefill.forward_mode)
    assert prefill.seq_lens_cpu.tolist() == [10, 6]
    for layer in LAYERS:
        expected = (soft @ model.proj[layer]).view(K, HEADS, DIM).transpose(0, 1)
        for j in range(2):
            assert torch.allclose(found.queries[j][layer], expected)
    assert found.scaling == {0: 0.5, 1: 0.5}


def test_scheduler_loads_the_soft_tokens_checked_against_the_model(state, tmp_path):
    model = QueryModel()
    sched = _scheduler(model, torch.zeros(2, 8, dtype=torch.int32))
    fingerprint = served_model_fingerprint(sched.model_config.hf_text_config, model.embed.weight)
    good, other = tmp_path / "good.safetensors", tmp_path / "other.safetensors"
    SoftTokens(torch.randn(K, HIDDEN), fingerprint).save(good)
    SoftTokens(torch.randn(K, HIDDEN), "another-model").save(other)
    state.configure(EvictionConfig(policy="judgeq", budget=Budget(tokens=4), soft_tokens=str(good)))
    loaded = load_soft_tokens(sched)
    assert loaded.count == K and loaded.embeddings.dtype == torch.bfloat16
    model.embed.float()
    with pytest.raises(RuntimeError, match=r"--kv-evict-soft-tokens .*good\.safetensors: SGLang feeds input "
                                           r"embeddings as bfloat16, and this model is torch\.float32"):
        load_soft_tokens(sched)
    model.embed.bfloat16()
    state.configure(EvictionConfig(policy="snapkv", budget=Budget(tokens=4), soft_tokens=str(other)))
    with pytest.raises(RuntimeError, match=r"--kv-evict-soft-tokens .*other\.safetensors: .*trained for model "
                                           r"fingerprint another-model"):
        load_soft_tokens(sched)
    state.configure(EvictionConfig(policy="snapkv", budget=Budget(tokens=4)))
    assert load_soft_tokens(sched) is None


def test_prefill_hook_hands_eviction_the_soft_token_forward(state, monkeypatch):
    calls = []
    monkeypatch.setattr(scheduler, "evict_after_prefill", lambda batch, st, **kwargs: calls.append(kwargs))
    monkeypatch.setattr(scheduler, "pool_arguments", lambda sched: {})
    state.configure(EvictionConfig(policy="snapkv", budget=Budget(tokens=4)))
    sched = SimpleNamespace(token_to_kv_pool_allocator=SimpleNamespace(
        get_kvcache=lambda: SimpleNamespace(get_value_buffer=None)),
        req_to_token_pool=SimpleNamespace(req_to_token=None))
    batch = SimpleNamespace(reqs=[], seq_lens_cpu=[])
    scheduler.process_batch_result_prefill_around(lambda *args: "result", sched, batch, None)
    assert calls[-1]["soft_token_forward"] is None  # no file: judgeq requests keep their full cache
    state.soft_tokens = ServedSoftTokens(torch.zeros(K, HIDDEN), "soft.safetensors")
    assert scheduler.process_batch_result_prefill_around(lambda *args: "result", sched, batch, None) == "result"
    forward = calls[-1]["soft_token_forward"]
    assert isinstance(forward, SoftTokenForward) and forward.batch is batch and forward.scheduler is sched


def test_scheduler_start_loads_the_soft_tokens(state, tmp_path):
    model = QueryModel()
    built = _scheduler(model, torch.zeros(2, 8, dtype=torch.int32))
    built.tp_worker.is_hybrid_swa = False
    built.tp_worker.model_runner.model_config = SimpleNamespace(attention_chunk_size=None)
    path = tmp_path / "soft.safetensors"
    SoftTokens(torch.randn(K, HIDDEN), served_model_fingerprint(built.model_config.hf_text_config,
                                                                model.embed.weight)).save(path)

    def original(self, server_args):
        self.__dict__.update(vars(built))

    sched = SimpleNamespace()
    config = EvictionConfig(policy="judgeq", budget=Budget(tokens=4), soft_tokens=str(path))
    scheduler.init_around(original, sched, SimpleNamespace(_kv_evict=config))
    assert state.soft_tokens is not None and state.soft_tokens.path == str(path)
