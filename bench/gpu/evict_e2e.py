"""End-to-end check of eviction inside a real SGLang server (GPU host, offline install of bench/gpu/).

    PYTHONPATH=/tmp/site python3 -m bench.gpu.evict_e2e [--out DIR] [--only NAME,...] [--timeout S] [--commit SHA]

(from the repository root; the sgl-evict wheel in /tmp/site gives servers the plugin's entry point).

Serves a 4-layer random-weight Llama (bench/gpu/smoke.py's, weight std 0.06 so attention and logits are not flat),
one server per setting, side by side. Each caps its KV pool with ``--max-total-tokens`` and passes SGLang's start
check with a large ``--mem-fraction-static`` (which must exceed the share of memory already in use, by the
servers started before it too), so the six fit on one GPU:

| server | what |
| --- | --- |
| ``plain`` | SGLang without the plugin (``SGLANG_PLUGINS`` names another plugin), FlashInfer |
| ``none`` | with the plugin, no eviction flags, FlashInfer |
| ``full`` | snapkv at budget 1.0: compacted views on every forward, nothing evicted |
| ``snapkv-fi`` / ``snapkv-tr`` | snapkv at 10% on FlashInfer / Triton |
| ``streaming`` | streaming at 10% (a keep-set known in advance), FlashInfer |
| ``snapkv-chunked`` | snapkv at 10%, prompts prefilled in chunks of 256 tokens |
| ``snapkv-eager`` | snapkv at 10%, decode without CUDA graphs |
| ``dapq`` | dapq at 10% (window queries re-rotated to the answer's positions), FlashInfer |
| ``snapkv-page16`` | snapkv at 10% with ``--page-size 16``: whole pages evicted, FlashInfer |
| ``snapkv-page64`` | the same with ``--page-size 64`` (issue 22 item 5); run only when named in ``--only`` |
| ``snapkv-tr-page16`` / ``-page64``, ``snapkv-fa3-page16`` / ``-page64`` | snapkv at 10%, whole pages evicted, on Triton and fa3 (opted in with ``SGL_EVICT_EXPERIMENTAL_PAGES=1``; issue 22 item 5): checked as the others, keep-sets' Jaccard with the FlashInfer server at that page size reported; run only when named in ``--only`` |
| ``random`` | random keep-set at 10% (the cheap baseline), FlashInfer |
| ``laq`` | laq at 10%: 8 decode steps on the snapkv view, then re-scored with their queries and evicted |
| ``laprox`` | laprox at 10% (window attention weighted by each value's norm through W_o), FlashInfer |
| ``laprox-cont3`` | laprox at 10% with ``--kv-evict-continuation 3`` (a kept token's next 3 tokens kept with it): its keep-sets' overlap with the harness's ``laprox+continuation=3``; run only when named in ``--only`` |
| ``plain-tp2`` / ``snapkv-tp2`` / ``laq-tp2`` | ``--tp 2`` (two GPUs): plain SGLang, snapkv and laq at 10%; run only when named in ``--only`` |
| ``plain-fa3`` / ``full-fa3`` / ``snapkv-fa3`` | SGLang's ``fa3`` backend (needs the full sgl_kernel: flash_ops, docs/gpu.md): plain, snapkv at budget 1.0 (token for token as plain fa3), snapkv at 10% (checked as the others; its keep-sets' Jaccard with ``snapkv-fi``'s reported, and with ``plain`` run too, whether plain fa3 answers as plain FlashInfer: the two backends round differently); run only when named in ``--only`` |
| ``plain-fp8`` / ``full-fp8`` / ``snapkv-fp8`` | ``--kv-cache-dtype fp8_e4m3`` (FlashInfer): plain, snapkv at budget 1.0 (token for token as plain), snapkv at 10% (evicted and freed as the others; its keep-sets' Jaccard with ``snapkv-fi``'s reported, FP8 keys round the scores); run only when named in ``--only`` |
| ``full-overlap`` / ``snapkv-overlap`` / ``laq-overlap`` / ``NAME-overlap`` | SGLang's overlap scheduler on, as eviction leaves it where it is verified (issue 22 item 2; the log must say so): budget 1.0 (token for token as ``plain``, which runs it too), snapkv and laq at 10% (keep-sets and answers equal to ``snapkv-fi``'s and ``laq``'s, which run with ``--disable-overlap-schedule``), and every ``OVERLAP_TWINS`` server ``NAME`` (chunked prefill, Triton, page 16, dapq, laprox, streaming, restore, fa3, FP8, page 64) again with it, checked against ``NAME`` (which then runs with ``--disable-overlap-schedule``); the fa3, FP8, page-64 and restore twins run only when named in ``--only`` (with ``NAME`` for the comparison) |
| ``plain-tr-eager``, ``layered-g1-full``, ``layered-full``, ``layered-snapkv``, ``layered-laprox`` | ``--kv-evict-granularity per_layer`` (Triton, no CUDA graphs, page 1) against plain SGLang with the same backend: one layer group at budget 1.0, a group per layer at 1.0, snapkv and laprox at 10% with a group per layer; run only when named in ``--only`` |

Checks: ``none`` and ``full`` answer token for token like ``plain``; every prompt is evicted to its budget and every
dropped slot is freed (none only hidden: also across chunks); a second turn hits the compressed first turn;
per-request overrides (no eviction, another budget) take other namespaces; new prompts sent to ``snapkv-fi`` at once
(prefilled in one batch: one scoring launch per layer) keep what ``snapkv-eager`` keeps for them one at a time; and on
``snapkv-fi`` a request asking for
laq is evicted after its lookahead steps (with ``lookahead_reserve`` 2: first to twice the budget, then to the
budget) and one asking for laprox is evicted to the budget; after the servers sit
idle (SGLang checks available + evictable == total) no leak is reported. Every prefill batch logs how it was
scored: the FlashInfer servers of snapkv, laq and laprox must read the keys once with the window LSE their prefill
attention returned (first turns, chunked prefill's last chunk, second turns over a compressed prefix, pages), the
Triton and dapq servers in two passes; ``snapkv-fi``, ``snapkv-chunked``, ``snapkv-page16`` and ``laprox`` run with
``SGL_EVICT_CHECK_LSE=1``, which scores every one-read layer in two passes too: they must agree within 1e-2 of the
largest mass. Every evicting server runs with ``SGL_EVICT_CHECK_KEPT=1``: each decode step's kept lengths, counted on
the host, are checked against the rows' (a mismatch stops the server). With ``--tp 2`` every rank logs its
evictions (SGLang prefixes its lines with `` TP<rank>``): rank 0's are checked as above, and each rank must keep
the same positions (scores are all-reduced before selection), equal to what the single-GPU harness selects.
The layered servers: at budget 1.0 (one group, or one per layer) they answer token for token like
``plain-tr-eager``; at 10% every group keeps the budget of every prompt (``G x ceil(0.1 n)`` group-slots) and frees
the rest, the second turn hits, no leak, and the harness's ``per_layer`` selection scores their answers much closer
than the full cache does.
Then, with the servers stopped, the HF harness scores each server's answer (token log-probabilities, teacher
forced) under the same policy and under the full cache: an evicting server must be much closer to the former.
The paged servers and fa3 (``LOGGED_KEEP_SCORED``) are scored under the keep-set each logged instead, since the
harness does not choose whole pages and fa3 rounds its scores apart: a backend that read the compacted rows wrong
would answer closer to the full cache.
For ``laq`` "the same policy" is what the server ran: its answer's tokens 2 .. 9 were decoded on the snapkv view
(the lookahead steps), the later ones on the laq cache, and the harness's laq looks ahead greedily on that same
snapkv view, so with greedy decoding its lookahead tokens are the server's answer tokens and both score the prompt
with the same queries: the keep-sets should agree (reported, as for snapkv and laprox).
Reported, not checked: for ``plain``, ``plain-fp8``, ``snapkv-fi`` and ``snapkv-fp8`` (those that ran), the KV
each holds for the first-turn prompts (``kv_memory``: the pool dtype SGLang logged, bytes per token, kept slots).
Writes evict_e2e.json and the server logs to --out; exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import random
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.gpu.smoke import Server, _version, write_tiny_llama
from bench.soak_replay import KEEPS, KEPT_OF

BUDGET = 0.1
WINDOW, SINKS = 16, 4
PROMPT_LENS = (700, 1100, 1500, 900)
NEW_TOKENS = 24
STAGGER_S = 8
PAGE = 16
POOL_TOKENS = 40000
LOOKAHEAD_STEPS = 8  # --kv-evict-lookahead-steps' default
#: how each server scores its prompts (the log line per prefill batch): FlashInfer's prefill returns the window
#: queries' LSE, so snapkv, laq and laprox read the keys once; Triton attention, dapq (re-rotated queries) and an FP8
#: pool (attention reads the new keys in bf16, the scorer the stored FP8 ones: patches/flashinfer_lse.py) two-pass
SCORING_MODES = {"snapkv-fi": "one-read", "snapkv-tr": "two-pass", "snapkv-chunked": "one-read",
                 "snapkv-eager": "one-read", "snapkv-page16": "one-read", "snapkv-page64": "one-read",
                 "dapq": "two-pass", "laq": "one-read",
                 "laprox": "one-read", "snapkv-tp2": "one-read", "laq-tp2": "one-read", "snapkv-fa3": "two-pass",
                 "snapkv-fp8": "two-pass"}
#: servers run with SGL_EVICT_CHECK_LSE=1: every one-read layer is scored in two passes too and compared
LSE_CHECKED = ("snapkv-fi", "snapkv-chunked", "snapkv-page16", "snapkv-page64", "laprox")
CHECK_LSE = {"SGL_EVICT_CHECK_LSE": "1"}
#: the evicting servers check the kept lengths counted on the host against the rows' (a mismatch stops them)
CHECK_KEPT = {"SGL_EVICT_CHECK_KEPT": "1"}
#: what a server logs once decode forwards took their kept lengths from the host (patches/model_runner.py)
HOST_LENGTHS = "took their kept lengths from the host's hole counts"
#: an FP8 KV cache (served with eviction on FlashInfer at page size 1, what the -fp8 servers verify)
FP8 = ["--kv-cache-dtype", "fp8_e4m3"]
#: servers run again as ``NAME-overlap`` with the overlap scheduler and checked against ``NAME`` (chunked prefill: a
#: prompt's last chunk finishes it while earlier chunks' results queue; Triton; pages; policies scored otherwise;
#: fa3, FP8 and page 64, whose twins run only when named, as their references)
OVERLAP_TWINS = ("snapkv-chunked", "snapkv-tr", "snapkv-page16", "dapq", "laprox", "streaming", "snapkv-restore",
                 "snapkv-fa3", "snapkv-fp8", "snapkv-page64")
SCORING_MODES.update({f"{name}-overlap": SCORING_MODES[name] for name in OVERLAP_TWINS if name in SCORING_MODES})
LSE_CHECKED += tuple(f"{name}-overlap" for name in OVERLAP_TWINS if name in LSE_CHECKED)
#: the servers the -overlap ones are checked against, run with --disable-overlap-schedule
OVERLAP_REFERENCES = ("snapkv-fi", "laq", *OVERLAP_TWINS)
#: page-granular eviction on Triton and fa3 (opted in with SGL_EVICT_EXPERIMENTAL_PAGES=1; issue 22 item 5)
PAGED_OTHER_BACKENDS = {f"snapkv-{tag}-page{page}": (backend, page)
                        for tag, backend in (("tr", "triton"), ("fa3", "fa3")) for page in (16, 64)}
SCORING_MODES.update({name: "two-pass" for name in PAGED_OTHER_BACKENDS})
#: servers whose answers the harness scores under the keep-sets they logged, not under its own choice (pages are
#: kept whole, fa3 rounds the scores apart from FlashInfer): a backend reading the compacted rows wrong shows there
LOGGED_KEEP_SCORED = ("snapkv-page16", "snapkv-page64", "snapkv-fa3", *PAGED_OTHER_BACKENDS)
#: the servers whose KV bytes per prompt are reported (an FP8 cache and eviction together, issue 22 item 4)
KV_MEMORY_SERVERS = ("plain", "plain-fp8", "snapkv-fi", "snapkv-fp8")


def prompts(seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, 31000) for _ in range(n)] for n in PROMPT_LENS]


def greedy(server: Server, ids: list[int], custom: dict | None = None) -> dict:
    params = {"temperature": 0, "max_new_tokens": NEW_TOKENS, "ignore_eos": True}
    if custom is not None:
        params["custom_params"] = custom
    _, body = server.generate({"input_ids": ids, "sampling_params": params, "return_logprob": True})
    return body


def rank_log(log: Path, rank: int = 0) -> str:
    """The lines of tensor-parallel ``rank`` in a server log (SGLang prefixes a TP>1 scheduler's lines with
    `` TP<rank>``); the whole log of a single-GPU server."""
    text = log.read_text()
    if not re.search(r" TP1[\] ]", text):
        return text
    return "\n".join(line for line in text.splitlines() if re.search(rf" TP{rank}[\] ]", line))


def eviction_lines(log: Path, rank: int = 0) -> list[tuple[int, ...]]:
    """(kept, prompt length, slots freed, tokens only hidden) of each eviction the server (TP rank) logged."""
    found = re.findall(r"sgl-evict: request \S+ kept (\d+) of (\d+) tokens, freed (\d+) slots, hid (\d+)",
                       rank_log(log, rank))
    return [tuple(map(int, line)) for line in found]


def scoring_lines(log: Path, rank: int = 0) -> list[tuple[int, int, int]]:
    """(one-read, mixed, two-pass) requests of each prefill batch the server (TP rank) scored from queries."""
    found = re.findall(r"sgl-evict: scoring after prefill: (\d+) one-read, (\d+) mixed, (\d+) two-pass",
                       rank_log(log, rank))
    return [tuple(map(int, line)) for line in found]


def one_read_check_errors(log: Path, rank: int = 0) -> list[float]:
    """Per layer and request scored in one read by a server run with ``SGL_EVICT_CHECK_LSE=1``: how far from two
    passes over the same keys (the larger of the largest difference relative to the largest mass and of the
    heads' total mass's relative error)."""
    found = re.findall(r"sgl-evict: one-read check: layer \d+, max difference (\S+) of the largest mass, head totals "
                       r"off by (\S+)", rank_log(log, rank))
    return [max(float(a), float(b)) for a, b in found]


def check_scoring_mode(name: str, server: Server, checks: dict, rank: int = 0) -> None:
    """The server scored every prefill batch in the mode :data:`SCORING_MODES` expects: one read of the keys with
    the window LSE its FlashInfer prefill returned, or two passes (Triton attention, dapq's re-rotated queries);
    with ``SGL_EVICT_CHECK_LSE=1`` every one-read layer also matched two passes within 1e-2 of the largest mass."""
    expected = SCORING_MODES[name]
    lines = scoring_lines(server.log_path, rank)
    column = {"one-read": 0, "two-pass": 2}[expected]
    checks[f"{name}: every prefill batch scored {expected}"] = {
        "ok": bool(lines) and all(line[column] == sum(line) for line in lines), "logged": lines}
    if name in LSE_CHECKED:
        errors = one_read_check_errors(server.log_path, rank)
        checks[f"{name}: one-read scores equal two-pass scores (SGL_EVICT_CHECK_LSE=1)"] = {
            "ok": bool(errors) and max(errors) < 1e-2, "checked_layers": len(errors),
            "max_difference": max(errors, default=None)}


def layered_eviction_lines(log: Path) -> list[tuple[int, ...]]:
    """(tokens kept in some group, prompt length, group-slots kept, group-slots in all, group-slots freed, logical
    slots freed, tokens only hidden) of each eviction a ``per_layer`` server logged."""
    found = re.findall(r"sgl-evict: request \S+ kept (\d+) of (\d+) tokens in some group \((\d+) of (\d+) "
                       r"group-slots\), freed (\d+) group-slots and (\d+) logical slots, hid (\d+)", log.read_text())
    return [tuple(map(int, line)) for line in found]


def check_layered_server(name: str, server: Server, ps: list[list[int]], answers: dict, checks: dict,
                         groups: int) -> None:
    """A ``per_layer`` server at 10%: every group of every prompt keeps the budget, the rest of its group-slots
    are freed (the prompts own all their tokens), and a second turn hits the compressed prefix."""
    lines = [line for line in layered_eviction_lines(server.log_path) if line[1] in PROMPT_LENS]
    checks[f"{name}: every group kept the budget of each prompt, every dropped group-slot freed"] = {
        "ok": len(lines) == len(ps) and all(
            kept_slots == groups * expected_kept(n, BUDGET, 1) and total == groups * n
            and freed == total - kept_slots and hid == 0 and expected_kept(n, BUDGET, 1) <= kept <= n
            for kept, n, kept_slots, total, freed, _, hid in lines), "logged": lines}
    turn2 = ps[0] + answers[name][0]["output_ids"] + prompts(seed=1)[0][:40]
    cached = greedy(server, turn2)["meta_info"].get("cached_tokens")
    checks[f"{name}: second turn hits the compressed prefix"] = {
        "ok": cached is not None and cached >= len(ps[0]), "cached_tokens": cached, "turn2_len": len(turn2)}


def launch(model: Path, out: Path, only: set[str]) -> dict[str, Server]:
    """Starts the servers named in ``only`` (every single-GPU one when empty; the ``-tp2`` and layered ones only
    if named)."""
    common = ["--model-path", str(model), "--skip-tokenizer-init", "--cuda-graph-max-bs", "8",
              "--max-running-requests", "8", "--max-total-tokens", str(POOL_TOKENS), "--mem-fraction-static", "0.88"]
    evict = ["--kv-evict-window", str(WINDOW), "--kv-evict-sinks", str(SINKS)]
    specs = {
        "plain": (["--attention-backend", "flashinfer"], {"SGLANG_PLUGINS": "not-sgl-evict"}),
        "none": (["--attention-backend", "flashinfer"], {}),
        "full": (["--attention-backend", "flashinfer", "--kv-evict-policy", "snapkv", "--kv-evict-budget", "1.0",
                  *evict], {}),
        "snapkv-fi": (["--attention-backend", "flashinfer", "--kv-evict-policy", "snapkv", "--kv-evict-budget",
                       str(BUDGET), *evict], {"SGL_EVICT_LOG_KEEP": "1", **CHECK_LSE}),
        "snapkv-tr": (["--attention-backend", "triton", "--kv-evict-policy", "snapkv", "--kv-evict-budget",
                       str(BUDGET), *evict], {"SGL_EVICT_LOG_KEEP": "1"}),
        "snapkv-chunked": (["--attention-backend", "flashinfer", "--kv-evict-policy", "snapkv", "--kv-evict-budget",
                            str(BUDGET), "--chunked-prefill-size", "256", *evict],
                           {"SGL_EVICT_LOG_KEEP": "1", **CHECK_LSE}),
        "snapkv-eager": (["--attention-backend", "flashinfer", "--kv-evict-policy", "snapkv", "--kv-evict-budget",
                          str(BUDGET), "--disable-decode-cuda-graph", *evict], {"SGL_EVICT_LOG_KEEP": "1"}),
        "streaming": (["--attention-backend", "flashinfer", "--kv-evict-policy", "streaming", "--kv-evict-budget",
                       str(BUDGET), *evict], {"SGL_EVICT_LOG_KEEP": "1"}),
        "dapq": (["--attention-backend", "flashinfer", "--kv-evict-policy", "dapq", "--kv-evict-budget",
                  str(BUDGET), *evict], {"SGL_EVICT_LOG_KEEP": "1"}),
        "snapkv-page64": (["--attention-backend", "flashinfer", "--kv-evict-policy", "snapkv", "--kv-evict-budget",
                           str(BUDGET), "--page-size", "64", *evict], {"SGL_EVICT_LOG_KEEP": "1", **CHECK_LSE}),
        "snapkv-page16": (["--attention-backend", "flashinfer", "--kv-evict-policy", "snapkv", "--kv-evict-budget",
                           str(BUDGET), "--page-size", str(PAGE), *evict], {"SGL_EVICT_EXPERIMENTAL_PAGES": "1",
                                                                            "SGL_EVICT_LOG_KEEP": "1", **CHECK_LSE}),
        # reversible eviction (issue 25): evicted K/V copied to a 1 GiB host pool, later turns restore
        "snapkv-restore": (["--attention-backend", "flashinfer", "--kv-evict-policy", "snapkv", "--kv-evict-budget",
                            str(BUDGET), "--kv-evict-history", "restore", "--kv-evict-host-pool-gb", "1", *evict],
                           {"SGL_EVICT_LOG_KEEP": "1"}),
        "random": (["--attention-backend", "flashinfer", "--kv-evict-policy", "random", "--kv-evict-budget",
                    str(BUDGET), *evict], {}),
        "laq": (["--attention-backend", "flashinfer", "--kv-evict-policy", "laq", "--kv-evict-budget", str(BUDGET),
                 "--kv-evict-lookahead-steps", str(LOOKAHEAD_STEPS), *evict], {"SGL_EVICT_LOG_KEEP": "1"}),
        "laprox": (["--attention-backend", "flashinfer", "--kv-evict-policy", "laprox", "--kv-evict-budget",
                    str(BUDGET), *evict], {"SGL_EVICT_LOG_KEEP": "1", **CHECK_LSE}),
        # a kept token's next 3 tokens kept with it (--kv-evict-continuation): its keep-sets against the harness's
        "laprox-cont3": (["--attention-backend", "flashinfer", "--kv-evict-policy", "laprox", "--kv-evict-budget",
                          str(BUDGET), "--kv-evict-continuation", "3", *evict], {"SGL_EVICT_LOG_KEEP": "1"}),
        "plain-tp2": (["--attention-backend", "flashinfer", "--tp", "2"], {"SGLANG_PLUGINS": "not-sgl-evict"}),
        "snapkv-tp2": (["--attention-backend", "flashinfer", "--tp", "2", "--kv-evict-policy", "snapkv",
                        "--kv-evict-budget", str(BUDGET), *evict], {"SGL_EVICT_LOG_KEEP": "1"}),
        "laq-tp2": (["--attention-backend", "flashinfer", "--tp", "2", "--kv-evict-policy", "laq",
                     "--kv-evict-budget", str(BUDGET), "--kv-evict-lookahead-steps", str(LOOKAHEAD_STEPS), *evict],
                    {"SGL_EVICT_LOG_KEEP": "1"}),
    }
    eager_triton = ["--attention-backend", "triton", "--disable-cuda-graph"]
    per_layer = [*eager_triton, "--kv-evict-granularity", "per_layer", *evict]
    specs.update({
        "plain-tr-eager": (eager_triton, {"SGLANG_PLUGINS": "not-sgl-evict"}),
        "layered-g1-full": ([*per_layer, "--kv-evict-policy", "snapkv", "--kv-evict-budget", "1.0",
                             "--kv-evict-layer-groups", "1"], {}),
        "layered-full": ([*per_layer, "--kv-evict-policy", "snapkv", "--kv-evict-budget", "1.0"], {}),
        "layered-snapkv": ([*per_layer, "--kv-evict-policy", "snapkv", "--kv-evict-budget", str(BUDGET)], {}),
        "layered-laprox": ([*per_layer, "--kv-evict-policy", "laprox", "--kv-evict-budget", str(BUDGET)], {}),
    })
    # SGLang's fa3 backend (needs the full sgl_kernel with flash_ops, docs/gpu.md): plain, budget 1.0 and 10%
    fa3 = ["--attention-backend", "fa3"]
    specs.update({
        "plain-fa3": (fa3, {"SGLANG_PLUGINS": "not-sgl-evict"}),
        "full-fa3": ([*fa3, "--kv-evict-policy", "snapkv", "--kv-evict-budget", "1.0", *evict], {}),
        "snapkv-fa3": ([*fa3, "--kv-evict-policy", "snapkv", "--kv-evict-budget", str(BUDGET), *evict],
                       {"SGL_EVICT_LOG_KEEP": "1"}),
    })
    # an FP8 KV cache (issue 22 item 4): plain, budget 1.0 (token for token as plain) and 10% (against snapkv-fi)
    fi = ["--attention-backend", "flashinfer"]
    specs.update({
        "plain-fp8": ([*fi, *FP8], {"SGLANG_PLUGINS": "not-sgl-evict"}),
        "full-fp8": ([*fi, *FP8, "--kv-evict-policy", "snapkv", "--kv-evict-budget", "1.0", *evict], {}),
        "snapkv-fp8": ([*fi, *FP8, "--kv-evict-policy", "snapkv", "--kv-evict-budget", str(BUDGET), *evict],
                       {"SGL_EVICT_LOG_KEEP": "1"}),
    })
    # SGLang's overlap scheduler on, the default (issue 22 item 2): against plain, snapkv-fi and laq
    specs.update({
        "full-overlap": ([*fi, "--kv-evict-policy", "snapkv", "--kv-evict-budget", "1.0", *evict], {}),
        "snapkv-overlap": ([*fi, "--kv-evict-policy", "snapkv", "--kv-evict-budget", str(BUDGET), *evict],
                           {"SGL_EVICT_LOG_KEEP": "1", **CHECK_LSE}),
        "laq-overlap": ([*fi, "--kv-evict-policy", "laq", "--kv-evict-budget", str(BUDGET),
                         "--kv-evict-lookahead-steps", str(LOOKAHEAD_STEPS), *evict],
                        {"SGL_EVICT_LOG_KEEP": "1"}),
    })
    # every OVERLAP_TWINS server again with the overlap scheduler, checked against it (same args, same keep-sets);
    # the references turn it off themselves: eviction leaves it on where it is verified
    specs.update({f"{name}-overlap": specs[name] for name in OVERLAP_TWINS})
    specs.update({name: (["--attention-backend", backend, "--kv-evict-policy", "snapkv", "--kv-evict-budget",
                          str(BUDGET), "--page-size", str(page), *evict],
                         {"SGL_EVICT_EXPERIMENTAL_PAGES": "1", "SGL_EVICT_LOG_KEEP": "1"})
                  for name, (backend, page) in PAGED_OTHER_BACKENDS.items()})
    for name in OVERLAP_REFERENCES:
        specs[name] = ([*specs[name][0], "--disable-overlap-schedule"], specs[name][1])
    named_only = ("-tp2", "plain-tr-eager", "layered-", "-fa3", "-page64", "-fp8", "-overlap", "-tr-page", "-restore",
                  "-cont")
    specs = {name: spec for name, spec in specs.items()
             if name in only or (not only and not any(tag in name for tag in named_only))}
    servers = {}
    for i, (name, (extra, env)) in enumerate(specs.items()):
        if i:
            time.sleep(STAGGER_S)
        if "--kv-evict-policy" in extra:  # every decode step's host-counted kept lengths checked against the rows
            env = {**env, **CHECK_KEPT}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        servers[name] = Server(name, 31100 + i, [*common, *extra], out)
        for key, value in saved.items():
            if value is None:
                del os.environ[key]
            else:
                os.environ[key] = value
    return servers


def expected_kept(n: int, budget: float, page: int) -> int:
    """Tokens a prompt of ``n`` keeps: the budget, or with pages ``ceil(budget / page)`` whole pages, one of them
    the prompt's last, partial page (always kept: it holds the protected window), and never fewer pages than the
    protected tokens touch (the sinks' first page and the pages of the last ``WINDOW`` tokens: with large pages
    those can outnumber the budget's)."""
    tokens = math.ceil(budget * n)
    if page == 1:
        return max(tokens, min(n, SINKS + WINDOW))
    tail = n % page or page
    window_pages = 1 + (math.ceil((WINDOW - tail) / page) if WINDOW > tail else 0)
    protected = window_pages + (1 if SINKS and (n - 1) // page - window_pages + 1 > 0 else 0)
    return (max(math.ceil(tokens / page), protected) - 1) * page + tail


def page_size_of(name: str) -> int:
    """The ``--page-size`` of a server of this script, from its name (``snapkv-page16``: 16; no ``page``: 1)."""
    found = re.search(r"-page(\d+)(-overlap)?$", name)
    return int(found.group(1)) if found else 1


def check_server(name: str, server: Server, ps: list[list[int]], answers: dict, checks: dict) -> None:
    log = server.log_path
    checks[f"{name}: decode forwards took their kept lengths from the host (checked against the rows)"] = {
        "ok": HOST_LENGTHS in log.read_text(errors="replace")}
    lines = [line for line in eviction_lines(log) if line[1] in PROMPT_LENS]
    page = page_size_of(name)
    checks[f"{name}: evicted each prompt to the budget, every dropped slot freed"] = {
        "ok": len(lines) == len(ps) and all(k == expected_kept(n, BUDGET, page) and freed == n - k and hid == 0
                                            for k, n, freed, hid in lines), "logged": lines}
    turn2 = ps[0] + answers[name][0]["output_ids"] + prompts(seed=1)[0][:40]
    cached = greedy(server, turn2)["meta_info"].get("cached_tokens")
    checks[f"{name}: second turn hits the compressed prefix"] = {
        "ok": cached is not None and cached >= len(ps[0]), "cached_tokens": cached, "turn2_len": len(turn2)}
    before = len(eviction_lines(log))
    off = greedy(server, ps[1], {"kv_evict": {"policy": "none"}})
    half = greedy(server, ps[2], {"kv_evict": {"budget": 0.5}})
    after = eviction_lines(log)[before:]
    checks[f"{name}: per-request overrides take their own namespaces"] = {
        "ok": len(after) == 1 and after[0][0] == expected_kept(PROMPT_LENS[2], 0.5, page)
        and off["meta_info"].get("cached_tokens") == 0 and half["meta_info"].get("cached_tokens") == 0,
        "logged_after": after, "none_cached_tokens": off["meta_info"].get("cached_tokens"),
        "half_cached_tokens": half["meta_info"].get("cached_tokens")}


def restore_lines(log: Path) -> list[tuple[int, int]]:
    """(restored, held out) of each later turn the server restored after its prefill."""
    found = re.findall(r"sgl-evict: request \S+ restored (\d+) of its (\d+) held-out tokens", log.read_text())
    return [tuple(map(int, line)) for line in found]


def cut_lines(log: Path) -> list[str]:
    """Request ids of the later turns whose last prompt token ran after their restore (engine/last_token.py)."""
    return re.findall(r"sgl-evict: request (\S+) restored \d+ of its \d+ held-out tokens from host memory; its last "
                      r"prompt token runs next", log.read_text())


def carried_lines(log: Path) -> list[int]:
    """Tokens each later turn brought back before its prefill (what the previous turn had restored and kept)."""
    return [int(n) for n in re.findall(r"sgl-evict: request \S+ brought back (\d+) tokens the previous turn",
                                       log.read_text())]


def conversation(server: Server, turns: int = 3) -> list[dict]:
    """A conversation of ``turns`` turns on a prompt no other check sends: each turn is the previous turn's prompt,
    its answer but the last token, and 40 new tokens. (With the overlap scheduler SGLang caches the answer's last
    token too, its KV computed by one more decode step, which the next turn would reuse where the server without
    it prefills the token: bf16 rounding then differs, and with it near-tied keep-sets.)"""
    ids, bodies = prompts(seed=5)[0], []
    for turn in range(turns):
        body = greedy(server, ids)
        bodies.append({"cached_tokens": body["meta_info"].get("cached_tokens"), "prompt_len": len(ids),
                       "output_ids": body["output_ids"]})
        ids = ids + body["output_ids"][:-1] + prompts(seed=2 + turn)[0][:40]
    return bodies


def check_restore_server(name: str, server: Server, checks: dict, report: dict) -> None:
    """Issue 25 in a launched server: a three-turn conversation hits the radix cache each turn, later turns
    restore held-out tokens after their prefill (all but its last token, which runs after the restore) and bring
    back the previous turn's before it."""
    before_restore, before_carry = len(restore_lines(server.log_path)), len(carried_lines(server.log_path))
    before_cut = len(cut_lines(server.log_path))
    turns = conversation(server)
    restored = restore_lines(server.log_path)[before_restore:]
    carried = carried_lines(server.log_path)[before_carry:]
    report[f"{name}_conversation"] = {"turns": turns, "restored": restored, "carried": carried}
    checks[f"{name}: later turns hit the radix cache"] = {
        "ok": all(t["cached_tokens"] is not None and t["cached_tokens"] >= p["prompt_len"]
                  for p, t in zip(turns, turns[1:])), "cached": [t["cached_tokens"] for t in turns]}
    checks[f"{name}: later turns restored held-out tokens after their prefill"] = {
        "ok": len(restored) == 2 and all(r > 0 for r, _ in restored), "restored": restored}
    checks[f"{name}: the third turn brought back the second's before its prefill"] = {
        "ok": len(carried) == 1 and carried[0] > 0, "carried": carried}
    cut = len(cut_lines(server.log_path)) - before_cut
    checks[f"{name}: later turns ran their last prompt token after the restore"] = {
        "ok": cut == len(restored) == 2, "cut": cut}


def check_laq_override(server: Server, ps: list[list[int]], checks: dict) -> None:
    """A request asking a snapkv server for laq is evicted after its lookahead steps, in laq's own namespace."""
    before = len(eviction_lines(server.log_path))
    body = greedy(server, ps[3], {"kv_evict": {"policy": "laq"}})
    after = eviction_lines(server.log_path)[before:]
    pending = "lookahead steps on" in server.log_path.read_text()
    checks["snapkv-fi: a request overriding the policy to laq is evicted to the budget after its lookahead"] = {
        "ok": pending and len(after) == 1 and after[0][:2] == (math.ceil(BUDGET * PROMPT_LENS[3]), PROMPT_LENS[3])
        and body["meta_info"].get("cached_tokens") == 0, "logged_after": after,
        "cached_tokens": body["meta_info"].get("cached_tokens")}


def check_laq_reserve_override(server: Server, ps: list[list[int]], checks: dict) -> None:
    """A laq request with ``lookahead_reserve`` 2 is evicted twice: to twice the budget right after prefill, then
    to the budget after its lookahead, each dropped slot freed once, in a namespace of its own."""
    n = PROMPT_LENS[3]
    before = len(eviction_lines(server.log_path))
    body = greedy(server, ps[3], {"kv_evict": {"policy": "laq", "lookahead_reserve": 2}})
    after = eviction_lines(server.log_path)[before:]
    wide, kept = math.ceil(2 * BUDGET * n), math.ceil(BUDGET * n)
    checks["snapkv-fi: a laq request with a reserve of 2 holds twice the budget through its lookahead"] = {
        "ok": after == [(wide, n, n - wide, 0), (kept, n, wide - kept, 0)]
        and body["meta_info"].get("cached_tokens") == 0, "logged_after": after, "expected": [wide, kept],
        "cached_tokens": body["meta_info"].get("cached_tokens")}


def check_laprox_override(server: Server, ps: list[list[int]], checks: dict) -> None:
    """A request asking a snapkv server for laprox is evicted to the budget at prefill, in laprox's own namespace."""
    before = len(eviction_lines(server.log_path))
    body = greedy(server, ps[3], {"kv_evict": {"policy": "laprox"}})
    after = eviction_lines(server.log_path)[before:]
    checks["snapkv-fi: a request overriding the policy to laprox is evicted to the budget"] = {
        "ok": len(after) == 1 and after[0] == (math.ceil(BUDGET * PROMPT_LENS[3]), PROMPT_LENS[3],
                                               PROMPT_LENS[3] - math.ceil(BUDGET * PROMPT_LENS[3]), 0)
        and body["meta_info"].get("cached_tokens") == 0, "logged_after": after,
        "cached_tokens": body["meta_info"].get("cached_tokens")}


def check_same_keep_sets(name: str, server, reference, ps: list[list[int]], ids: dict, checks: dict) -> None:
    """``server`` (another attention backend, same policy and budget) keeps the positions ``reference`` keeps for
    each first-turn prompt, and where they agree answers token for token as ``reference`` does."""
    ours, theirs = logged_keep_sets(server.log_path)[: len(ps)], logged_keep_sets(reference.log_path)[: len(ps)]
    overlap = [jaccard(a, b) for a, b in zip(ours, theirs)]
    same = [i for i, (a, b) in enumerate(zip(ours, theirs)) if a == b]
    checks[f"{name}: keeps what {reference.name} keeps (Jaccard >= 0.98 per prompt)"] = {
        "ok": len(overlap) == len(ps) and min(overlap) >= 0.98, "jaccard": overlap}
    checks[f"{name}: answers as {reference.name} where the keep-sets are equal"] = {
        "ok": bool(same) and all(ids[name][i] == ids[reference.name][i] for i in same), "prompts": same}


def check_overlap(up: dict, ps: list[list[int]], answers: dict, ids: dict, checks: dict) -> None:
    """The ``-overlap`` servers ran SGLang's overlap scheduler (their server args say so) and answer as the same
    setting without it: budget 1.0 token for token as ``plain``; snapkv and laq keep what ``snapkv-fi`` and ``laq``
    keep and answer token for token where they do."""
    pairs = (("full-overlap", "plain"), ("snapkv-overlap", "snapkv-fi"), ("laq-overlap", "laq"),
             *((f"{name}-overlap", name) for name in OVERLAP_TWINS))
    for name, reference in pairs:
        if name not in up:
            continue
        text = up[name].log_path.read_text(errors="replace")
        checks[f"{name}: SGLang's overlap scheduler on"] = {"ok": "disable_overlap_schedule=False" in text}
        if reference in up and reference != "plain":
            text = up[reference].log_path.read_text(errors="replace")
            checks[f"{reference}: SGLang's overlap scheduler off"] = {"ok": "disable_overlap_schedule=True" in text}
        if name != "full-overlap":
            check_server(name, up[name], ps, answers, checks)
        if reference not in up:
            continue
        if name == "full-overlap":
            checks[f"{name} == plain SGLang, token for token"] = {"ok": ids[name] == ids[reference]}
        else:
            check_same_keep_sets(name, up[name], up[reference], ps, ids, checks)


def kv_memory(server, ps: list[list[int]], model: Path) -> dict:
    """What a server's KV holds for the first-turn prompts: its pool's dtype and size as SGLang logged them, the
    bytes a token takes in it (the model's layers x KV heads x head dim x K and V x the dtype's size), the slots
    each prompt kept (its eviction lines; a server that does not evict keeps every token) and their bytes."""
    text = server.log_path.read_text(errors="replace")
    found = re.search(r"KV Cache is allocated\. dtype: torch\.(\w+), #tokens: (\d+), K size: ([\d.]+) GB, "
                      r"V size: ([\d.]+) GB", text)
    if not found:
        return {"error": "no 'KV Cache is allocated' line in the log"}
    dtype, tokens, k_gb, v_gb = found.group(1), int(found.group(2)), float(found.group(3)), float(found.group(4))
    itemsize = 1 if dtype.startswith("float8") else 2
    config = json.loads((model / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    per_token = config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim * 2 * itemsize
    lengths = {len(p) for p in ps}
    kept = [k for k, n, _, _ in eviction_lines(server.log_path) if n in lengths][: len(ps)] or [len(p) for p in ps]
    return {"dtype": dtype, "pool_tokens": tokens, "logged_k_plus_v_gb": k_gb + v_gb, "bytes_per_token": per_token,
            "pool_gb_from_bytes_per_token": round(tokens * per_token / 2**30, 4), "kept_slots": kept,
            "kv_bytes_held": per_token * sum(kept)}


def keep_set_jaccard(server, reference, prompts: int) -> list[float]:
    """Per first-turn prompt, the Jaccard overlap of the keep-sets two servers logged."""
    ours, theirs = logged_keep_sets(server.log_path)[:prompts], logged_keep_sets(reference.log_path)[:prompts]
    return [jaccard(a, b) for a, b in zip(ours, theirs)]


def jaccard(a, b) -> float:
    """|a & b| / |a | b| of two position lists (1 when both are empty)."""
    return len(set(a) & set(b)) / max(1, len(set(a) | set(b)))


def keep_sets_by_length(text: str) -> dict[int, list[int]]:
    """Prompt length -> kept positions of each eviction in a log excerpt of a server run with
    ``SGL_EVICT_LOG_KEEP=1`` (requests paired with their lengths by request id)."""
    kept, lengths = dict(KEEPS.findall(text)), dict(KEPT_OF.findall(text))
    return {int(lengths[rid]): json.loads(found) for rid, found in kept.items() if rid in lengths}


def check_batched_scoring(server: Server, reference: Server, checks: dict) -> None:
    """New prompts sent to ``server`` all at once (so that SGLang prefills them in one batch, which the plugin scores
    with one kernel launch per layer) keep what ``reference`` (same policy, budget and prefill path) keeps for them
    one at a time. Fails when no prefill batch held more than one of them (nothing batched to check)."""
    ps = prompts(seed=2)
    start = {s.name: len(s.log_path.read_text()) for s in (server, reference)}
    batches_before = len(scoring_lines(server.log_path))
    with ThreadPoolExecutor(len(ps)) as pool:
        list(pool.map(lambda ids: greedy(server, ids), ps))
    for ids in ps:
        greedy(reference, ids)
    batched = keep_sets_by_length(server.log_path.read_text()[start[server.name]:])
    single = keep_sets_by_length(reference.log_path.read_text()[start[reference.name]:])
    sizes = [sum(line) for line in scoring_lines(server.log_path)[batches_before:]]
    similar = {n: jaccard(batched[n], single[n]) for n in PROMPT_LENS if n in batched and n in single}
    checks[f"{server.name}: prompts prefilled in one batch keep what {reference.name} keeps one at a time "
           "(Jaccard >= 0.98)"] = {
        "ok": max(sizes, default=0) > 1 and len(similar) == len(ps) and min(similar.values()) >= 0.98,
        "requests_per_prefill_batch": sizes, "jaccard": similar,
        "equal": sum(batched[n] == single[n] for n in similar)}


def logged_keep_sets(log: Path, rank: int = 0) -> list[list[int]]:
    """Kept positions of each eviction, in order, from a server (TP rank) run with ``SGL_EVICT_LOG_KEEP=1``."""
    return [json.loads(found) for _, found in KEEPS.findall(rank_log(log, rank))]


def check_ranks_agree(name: str, server: Server, ps: list[list[int]], checks: dict) -> None:
    """Both tensor-parallel ranks of ``server`` kept the same positions for every eviction."""
    ranks = [logged_keep_sets(server.log_path, rank) for rank in (0, 1)]
    checks[f"{name}: both TP ranks keep the same positions"] = {
        "ok": len(ranks[0]) >= len(ps) and ranks[0] == ranks[1], "evictions_per_rank": [len(r) for r in ranks]}


def harness_policy(policy: str, answer: list[int]):
    """The harness's policy for a server's answer: laq's lookahead decodes the server's own first answer tokens
    (teacher-forced): on this random-weight model greedy choices are near-ties, and the harness's own greedy
    lookahead tokens differ from the server's after a step or two, and with them the queries."""
    from sgl_evict import make_policy
    from sgl_evict.eval.runner import variant_policy

    if policy != "laq":
        return variant_policy(policy)  # a name, or a variant such as laprox+continuation=3
    return make_policy("laq", lookahead_steps=LOOKAHEAD_STEPS, lookahead_tokens=tuple(answer[:LOOKAHEAD_STEPS]))


def served_logprobs(harness, state, name: str, policy: str, budget: float, tokens: list[int]) -> list[float]:
    """The harness's log-probabilities of a server's answer under the caches that server decoded it with.

    The laq server decodes its lookahead steps (answer tokens 2 .. LOOKAHEAD_STEPS + 1) on the snapkv view and the
    rest on the laq cache; every other server uses one cache for the whole answer.
    """
    from sgl_evict import Budget, make_policy

    granularity = "per_layer" if name.startswith("layered-") else "uniform"
    ours = harness.token_logprobs(state, harness_policy(policy, tokens), Budget(fraction=budget), granularity, tokens)
    if policy != "laq" or budget >= 1.0:
        return ours
    view = harness.token_logprobs(state, make_policy("snapkv"), Budget(fraction=budget), "uniform", tokens)
    return [ours[0], *view[1:LOOKAHEAD_STEPS + 1], *ours[LOOKAHEAD_STEPS + 1:]]


def mean_gap(served: list[float], ours: list[float]) -> float:
    """Mean |server log-prob - harness log-prob| over an answer's tokens."""
    return sum(abs(a - b) for a, b in zip(served, ours)) / len(ours)


def compare_with_harness(model: Path, ps: list[list[int]], answers: dict, checks: dict, report: dict,
                         keep_sets: dict[str, list[list[int]]], device: str = "cuda") -> None:
    """Mean |server log-prob - harness log-prob| of each server's answer, same policy vs full cache; overlap of
    the keep-sets logged by ``keep_sets``' servers with the harness's."""
    import torch
    from transformers import AutoModelForCausalLM

    from sgl_evict import Budget, make_policy
    from sgl_evict.harness import EvictionHarness
    from sgl_evict.selection import KeepSet

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16)
    harness = EvictionHarness(hf, window=WINDOW, sinks=SINKS, device=device)
    policies = {"plain": "none", "snapkv-fi": "snapkv", "snapkv-tr": "snapkv", "snapkv-chunked": "snapkv",
                "snapkv-eager": "snapkv", "streaming": "streaming", "dapq": "dapq", "laq": "laq", "laprox": "laprox",
                "laprox-cont3": "laprox+continuation=3",
                "plain-tp2": "none", "snapkv-tp2": "snapkv", "laq-tp2": "laq",
                "plain-tr-eager": "none", "layered-snapkv": "snapkv", "layered-laprox": "laprox"}
    gaps = {name: {"same_policy": [], "full_cache": []} for name in policies if name in answers}
    overlaps = {name: [] for name in keep_sets if name in policies}
    logged_gaps = {name: {"logged_keep_set": [], "full_cache": []} for name in LOGGED_KEEP_SCORED
                   if name in answers and name in keep_sets}
    for i, ids in enumerate(ps):
        state = harness.prefill(torch.tensor([ids]))
        for name, gap in logged_gaps.items():
            if i < len(keep_sets[name]):
                body, heads = answers[name][i], state.cache.layers[harness.layers[0]].keys.shape[1]
                served = [lp for lp, _, _ in body["meta_info"]["output_token_logprobs"]]
                keep = KeepSet.uniform(keep_sets[name][i], len(harness.layers), heads, len(ids))
                for key, kept in (("logged_keep_set", keep), ("full_cache", None)):
                    ours = harness.token_logprobs(state, make_policy("snapkv" if kept else "none"),
                                                  Budget(fraction=BUDGET), "uniform", body["output_ids"], kept)
                    gap[key].append(mean_gap(served, ours))
        for name, logged in keep_sets.items():
            if name in overlaps and i < len(logged):
                policy = harness_policy(policies[name], answers[name][i]["output_ids"] if name in answers else [])
                ours = harness.select(state, policy, Budget(fraction=BUDGET), "uniform").indices[0][0]
                overlaps[name].append(len(set(ours.tolist()) & set(logged[i])) / len(ours))
        for name in gaps:
            body = answers[name][i]
            served = [lp for lp, _, _ in body["meta_info"]["output_token_logprobs"]]
            tokens = body["output_ids"]
            for key, policy, budget in (("same_policy", policies[name], BUDGET), ("full_cache", "none", 1.0)):
                ours = served_logprobs(harness, state, name, policy, budget, tokens)
                gaps[name][key].append(mean_gap(served, ours))
    summary = {name: {k: sum(v) / len(v) for k, v in g.items()} for name, g in gaps.items()}
    report["harness_logprob_gap"] = summary
    report["snapkv_keep_set_overlap_with_harness"] = overlaps.get("snapkv-fi", [])
    report["laq_keep_set_overlap_with_harness"] = overlaps.get("laq", [])
    report["laprox_keep_set_overlap_with_harness"] = overlaps.get("laprox", [])
    for name in ("snapkv-tp2", "laq-tp2", "laprox-cont3"):
        if name in overlaps:
            report[f"{name}_keep_set_overlap_with_harness"] = overlaps[name]
    for name, gap in summary.items():
        if name.startswith("plain"):
            continue
        checks[f"{name}: answer scored by the harness closer under its own policy than under the full cache"] = {
            "ok": gap["same_policy"] < 0.5 * gap["full_cache"], **gap}
    logged_summary = {name: {k: sum(v) / len(v) for k, v in g.items()}
                      for name, g in logged_gaps.items() if g["full_cache"]}
    report["harness_logprob_gap_under_logged_keep_sets"] = logged_summary
    for name, gap in logged_summary.items():
        checks[f"{name}: answer scored by the harness closer under its logged keep-set than under the full cache"] = {
            "ok": gap["logged_keep_set"] < 0.5 * gap["full_cache"], **gap}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    parser.add_argument("--timeout", type=float, default=420)
    parser.add_argument("--only", default="", help="comma-separated server names to run (default: all)")
    parser.add_argument("--commit", default="", help="the sgl-evict commit being run (the host has no .git)")
    args = parser.parse_args()
    out = Path(args.out)
    model = write_tiny_llama(Path("/tmp/tiny-llama-sharp"), initializer_range=0.06)
    servers = launch(model, out, set(filter(None, args.only.split(","))))
    num_layers = json.loads((model / "config.json").read_text())["num_hidden_layers"]  # G of a group per layer
    report = {"command": " ".join(sys.argv), "commit": args.commit,
              "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "versions": {m: _version(m) for m in ("sglang", "torch", "flashinfer", "triton", "transformers")},
              "servers": {n: s.cmd for n, s in servers.items()}, "checks": {}}
    import torch

    report["device"] = torch.cuda.get_device_name(0)
    deadline = time.time() + args.timeout
    while time.time() < deadline and not all(s.poll_health() or s.proc.poll() is not None for s in servers.values()):
        time.sleep(3)
    report["healthy_after_s"] = {n: s.healthy_after for n, s in servers.items()}
    checks = report["checks"]
    ps = prompts()
    answers: dict[str, list[dict]] = {}
    try:
        up = {n: s for n, s in servers.items() if s.healthy_after is not None}
        checks["all servers healthy"] = {"ok": len(up) == len(servers), "up": sorted(up)}
        answers = {n: [greedy(s, p) for p in ps] for n, s in up.items()}
        ids = {n: [a["output_ids"] for a in outs] for n, outs in answers.items()}
        report["output_ids"] = ids
        for name in ("none", "full"):
            if "plain" in ids and name in ids:
                checks[f"{name} == plain SGLang, token for token"] = {"ok": ids["plain"] == ids[name]}
        for name in ("snapkv-fi", "snapkv-tr", "snapkv-chunked", "snapkv-eager", "streaming", "dapq",
                     "snapkv-page16", "snapkv-page64", "random", "laq", "laprox", "snapkv-tp2", "laq-tp2",
                     "snapkv-restore"):
            if name in up:
                check_server(name, up[name], ps, answers, checks)
        for name in ("snapkv-tp2", "laq-tp2"):
            if name in up:
                check_ranks_agree(name, up[name], ps, checks)
        for name, (_, page) in PAGED_OTHER_BACKENDS.items():
            if name in up:
                check_server(name, up[name], ps, answers, checks)
                reference = f"snapkv-page{page}"  # FlashInfer at that page size: backends round apart, a report
                if reference in up:
                    report[f"{name}_keep_set_jaccard_with_{reference}"] = keep_set_jaccard(
                        up[name], up[reference], len(ps))
        if "plain-fa3" in ids and "full-fa3" in ids:
            checks["full-fa3 == plain SGLang on fa3, token for token"] = {"ok": ids["plain-fa3"] == ids["full-fa3"]}
        if "snapkv-fa3" in up:
            check_server("snapkv-fa3", up["snapkv-fa3"], ps, answers, checks)
            if "snapkv-fi" in up:  # fa3 and FlashInfer round differently (plain answers differ): a report
                report["snapkv-fa3_keep_set_jaccard_with_snapkv-fi"] = keep_set_jaccard(
                    up["snapkv-fa3"], up["snapkv-fi"], len(ps))
        if "plain-fa3" in ids and "plain" in ids:
            report["plain-fa3_answers_equal_plain"] = [a == b for a, b in zip(ids["plain-fa3"], ids["plain"])]
        check_overlap(up, ps, answers, ids, checks)
        for name in ("snapkv-restore", "snapkv-restore-overlap"):
            if name in up:
                check_restore_server(name, up[name], checks, report)
        if "snapkv-restore" in up and "snapkv-restore-overlap" in up:
            ours, theirs = report["snapkv-restore-overlap_conversation"], report["snapkv-restore_conversation"]
            checks["snapkv-restore-overlap: the conversation as without the overlap scheduler"] = {
                "ok": ours["restored"] == theirs["restored"] and ours["carried"] == theirs["carried"]
                and [t["output_ids"] for t in ours["turns"]] == [t["output_ids"] for t in theirs["turns"]]}
        if "plain-fp8" in ids and "full-fp8" in ids:
            checks["full-fp8 == plain SGLang with an FP8 KV cache, token for token"] = {
                "ok": ids["plain-fp8"] == ids["full-fp8"]}
        if "snapkv-fp8" in up:
            check_server("snapkv-fp8", up["snapkv-fp8"], ps, answers, checks)
            if "snapkv-fi" in up:  # FP8 keys round the scores: near-ties may change, hence a report, not a check
                report["snapkv-fp8_keep_set_jaccard_with_snapkv-fi"] = keep_set_jaccard(
                    up["snapkv-fp8"], up["snapkv-fi"], len(ps))
        report["kv_memory"] = {name: kv_memory(up[name], ps, model) for name in KV_MEMORY_SERVERS if name in up}
        for name in ("layered-g1-full", "layered-full"):
            if "plain-tr-eager" in ids and name in ids:
                checks[f"{name} == plain SGLang (Triton, eager), token for token"] = {
                    "ok": ids["plain-tr-eager"] == ids[name]}
        for name in ("layered-snapkv", "layered-laprox"):
            if name in up:
                check_layered_server(name, up[name], ps, answers, checks, groups=num_layers)
        if "snapkv-fi" in up and "snapkv-eager" in up:
            check_batched_scoring(up["snapkv-fi"], up["snapkv-eager"], checks)
        if "snapkv-fi" in up:
            check_laq_override(up["snapkv-fi"], ps, checks)
            check_laq_reserve_override(up["snapkv-fi"], ps, checks)
            check_laprox_override(up["snapkv-fi"], ps, checks)
        for name in SCORING_MODES:
            if name in up:
                check_scoring_mode(name, up[name], checks)
        time.sleep(15)  # idle: SGLang's scheduler checks available + evictable == total (raises on a leak)
        for name, server in up.items():
            text = server.log_path.read_text()
            checks[f"{name}: alive after idle, no leak or traceback"] = {
                "ok": server.proc.poll() is None and "leak" not in text and "Traceback" not in text}
    except Exception as err:
        checks["driver"] = {"ok": False, "error": repr(err)}
    finally:
        for s in servers.values():
            s.stop()
    try:
        keep_sets = {name: logged_keep_sets(servers[name].log_path)[: len(ps)]
                     for name in ("snapkv-fi", "laq", "laprox", "snapkv-tp2", "laq-tp2", *LOGGED_KEEP_SCORED)
                     if name in servers}
        compare_with_harness(model, ps, answers, checks, report, keep_sets)
    except Exception as err:
        checks["harness comparison"] = {"ok": False, "error": repr(err)}
    (out / "evict_e2e.json").write_text(json.dumps(report, indent=1))
    for name, check in checks.items():
        print(f"{'PASS' if check['ok'] else 'FAIL'}  {name}  {({k: v for k, v in check.items() if k != 'ok'})}")
    return 0 if checks and all(c["ok"] for c in checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
