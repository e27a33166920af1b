"""Judge Q in the scheduler process: the soft-token file, and the extra forward that runs the soft tokens.

Not a hook of its own: the scheduler hooks (:mod:`sgl_evict.patches.scheduler`) call it.

- At start (``Scheduler.__init__``, once the model is loaded), :func:`load_soft_tokens` reads the
  ``--kv-evict-soft-tokens`` file and checks it was trained for the served model (the fingerprint the harness
  computes: the text config's numbers and a sample of the embedding table), so a wrong file fails the launch with
  the flag and the file named, not with wrong keep-sets.
- After a prefill (``process_batch_result_prefill``), :class:`SoftTokenForward` runs the soft tokens of the batch's
  judgeq requests as one extend batch through ``ModelRunner.forward``: the forward hooks capture their queries
  (:mod:`sgl_evict.engine.judgeq` does the slot bookkeeping).
"""

from __future__ import annotations

import copy

import torch

from sgl_evict.engine.judgeq import ServedSoftTokens, SoftTokenExtend, load_served_soft_tokens, soft_token_queries
from sgl_evict.engine.runtime import STATE
from sgl_evict.soft_tokens import model_fingerprint


def served_model_fingerprint(hf_text_config, embedding_weight: torch.Tensor,
                             gather=None) -> str:
    """The fingerprint of the served model, as the harness computes it from the HF model.

    Args:
        hf_text_config: SGLang's ``model_config.hf_text_config`` (the harness reads the text config too).
        embedding_weight: ``[vocab rows on this rank (padded), hidden_size]`` SGLang's input embedding table.
        gather: with tensor parallelism, all-gathers the vocab-parallel shards along dim 0
            (``tensor_model_parallel_all_gather``); None with one rank.
    """
    table = embedding_weight if gather is None else gather(embedding_weight.contiguous(), dim=0)
    # SGLang pads the vocabulary to a multiple of its own (padding rows at the end); the checkpoint's rows come first
    return model_fingerprint(hf_text_config, table[: hf_text_config.vocab_size])


def load_soft_tokens(scheduler) -> ServedSoftTokens | None:
    """The server's soft tokens (None without ``--kv-evict-soft-tokens``), checked against ``scheduler``'s model.

    Raises:
        RuntimeError naming the flag and the file when it was trained for another model, or does not fit it, or
        when the model is not bfloat16.
    """
    path = STATE.config.soft_tokens
    if not path:
        return None
    runner = scheduler.tp_worker.model_runner
    gather = None
    if scheduler.server_args.tp_size > 1:
        from sglang.srt.distributed import tensor_model_parallel_all_gather as gather
    hf_config = scheduler.model_config.hf_text_config
    weight = runner.model.get_input_embeddings().weight
    if weight.dtype != torch.bfloat16:
        # ModelRunner._extend_forward_kwargs casts input_embeds to bfloat16 whatever the model's dtype
        raise RuntimeError(f"sgl-evict: --kv-evict-soft-tokens {path}: SGLang feeds input embeddings as bfloat16, "
                           f"and this model is {weight.dtype}; serve judgeq with --dtype bfloat16")
    fingerprint = served_model_fingerprint(hf_config, weight, gather)
    try:
        return load_served_soft_tokens(path, fingerprint, hf_config.hidden_size, weight.dtype, weight.device)
    except ValueError as err:
        raise RuntimeError(f"sgl-evict: {err}") from None


class SoftTokenForward:
    """Runs the soft tokens of a prefill batch's judgeq requests: ``[(batch index, row, prompt length)]`` ->
    :class:`sgl_evict.engine.judgeq.SoftTokenQueries` (or None), bound to one scheduler and one prefill batch."""

    def __init__(self, scheduler, batch):
        self.scheduler = scheduler
        self.batch = batch

    def __call__(self, judged: list[tuple[int, int, int]]):
        allocator = self.scheduler.token_to_kv_pool_allocator
        return soft_token_queries(judged, STATE.soft_tokens, self.scheduler.req_to_token_pool.req_to_token,
                                  allocator.alloc, allocator.free, STATE, self.run)

    def run(self, extend: SoftTokenExtend) -> None:
        """One eager extend forward of ``extend`` (its logits discarded)."""
        from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode, ForwardBatch

        # the hook's owner is the Scheduler (``tp_worker``) or, in SGLang 0.5.17's prefill result path, its
        # SchedulerBatchResultProcessor, which holds the scheduler's ``model_worker``: the target worker itself,
        # since speculative decoding (where it is the draft worker) is refused with eviction
        worker = getattr(self.scheduler, "tp_worker", None) or self.scheduler.model_worker
        runner = worker.model_runner
        forward_batch = ForwardBatch.init_new(soft_token_batch(self.batch, extend), runner,
                                              capture_hidden_mode=CaptureHiddenMode.NULL,
                                              return_hidden_states_before_norm=False)
        runner.forward(forward_batch)


def soft_token_batch(prefill_batch, extend: SoftTokenExtend):
    """A shallow copy of SGLang's prefill ``ScheduleBatch`` whose fields ``ForwardBatch.init_new`` reads describe
    ``extend``: the judged requests, each extending its prompt by the soft tokens (``input_embeds``, positions from
    the prompt length on), no logprobs, no sampling (the batch is never sampled), no multimodal inputs.

    The prefill batch itself is not changed: SGLang processes its result afterwards.
    """
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    n, k = len(extend.prompt_lens), extend.tokens_per_request
    device = extend.out_cache_loc.device
    seq_lens_cpu = torch.tensor([p + k for p in extend.prompt_lens], dtype=torch.int64)
    batch = copy.copy(prefill_batch)
    batch.reqs = [prefill_batch.reqs[i] for i in extend.batch_indices]
    batch.forward_mode = ForwardMode.EXTEND
    batch.input_ids = torch.zeros(n * k, dtype=torch.int64, device=device)  # read for shapes only: embeds are fed
    batch.input_embeds = extend.input_embeds
    batch.replace_embeds = batch.replace_positions = None
    batch.req_pool_indices = extend.req_pool_indices.to(device)
    batch.req_pool_indices_cpu = extend.req_pool_indices.cpu()
    batch.seq_lens = seq_lens_cpu.to(device)
    batch.seq_lens_cpu = seq_lens_cpu
    batch.orig_seq_lens = seq_lens_cpu.to(device=device, dtype=torch.int32)
    batch.seq_lens_sum = int(seq_lens_cpu.sum())
    batch.out_cache_loc = extend.out_cache_loc
    batch.extend_lens = [k] * n
    batch.prefix_lens = list(extend.prompt_lens)
    batch.extend_logprob_start_lens = [k] * n
    batch.extend_num_tokens = n * k
    batch.extend_input_logprob_token_ids = None
    batch.return_logprob = False
    batch.top_logprobs_nums = batch.token_ids_logprobs = None
    batch.multimodal_inputs = [None] * n
    batch.sampling_info = None
    batch.spec_info = None
    batch.global_num_tokens = batch.global_num_tokens_for_logprob = None
    batch.decoding_reqs = None
    batch.is_prefill_only = False  # its logits are computed and discarded; no pooled or embedding outputs
    return batch
