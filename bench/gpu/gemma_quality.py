"""RULER-style quality of eviction through an SGLang server running Gemma 3 270M, against the HF harness (issue 6).

    PYTHONPATH=/tmp/site python3 -m bench.gpu.gemma_quality [--contexts 1024,2048,4096,8192,16384] [--out DIR]

(from the repository root; bundles a, b, c, gemma-tok, the gemma parts and the sgl-evict wheel in /tmp/site).

One server (Triton attention: FlashInfer's ragged prefill rejects Gemma 3's sliding-window batches in SGLang
0.5.17, docs/gpu.md) on the Gemma checkpoint converted by bench/gpu/smoke.py's ``convert_gemma``, started with
``--kv-evict-policy snapkv``; every request picks its policy and budget with ``custom_params["kv_evict"]`` (the
full-cache reference with policy ``none``). Gemma 3 has sliding-window layers (window 512), so the server keeps
every prompt's last 512 tokens (patches/scheduler.py ``sliding_window_tail``), and the harness runs with
``protected_recent=512`` to select the same keep-sets. Each request carries its own ``extra_key``: a request must
not start from another's evicted prefix in the radix cache (it would inherit that request's holes), as the
harness never does.

For every task of sgl_evict/eval/tasks.py, context length and sample (seeded), the prompt's token ids go to the
server and to the harness (bf16, same device after the server stopped); each policy x budget and the full cache
answer greedily, ``--max-new-tokens`` tokens cut at the first end-of-sequence token, scored by RULER string match.
Reported: accuracy of server and harness per policy, budget and context; token-exact agreement of their answers;
the kept tokens each eviction logged against the expected ``max(budget, sinks + 512)``. judgeq (``--soft-tokens
FILE``, e.g. bench/results/judgeq_gpu_gemma3-270m_2k.safetensors): the server starts with
``--kv-evict-soft-tokens FILE`` and the harness loads the same file. laq: the server decodes
its lookahead steps on the snapkv view and the rest on the laq cache; the harness reproduces exactly that (the
snapkv answer's first tokens, then laq with those tokens as its teacher-forced lookahead).

``--granularity per_layer [--layer-groups G]`` (issue 9) launches the layered server instead (``--kv-evict-granularity
per_layer``, Triton, ``--page-size 1``, eagerly with ``--disable-cuda-graph`` as on the H100 run of 2026-11-24;
laq and judgeq are not run there): each group of
the model's layers keeps its own keep-set, a group of sliding-window layers only the last 512 prompt tokens. The
harness runs the same granularity and layer groups (``EvictionHarness(layer_groups=G)``), and the log check counts
each eviction's group-slots. Run it once with each granularity to compare per-layer and uniform selection; the
summary's ``kv_fraction`` is the KV each policy@budget kept (layer x token entries over the full cache's), so the
two runs are compared at known memory.
Writes gemma_quality.json and the server log to --out; exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.gpu.smoke import SITE, Server, _version, convert_gemma, print_checks

# server answers are cut exactly as the harness cuts its own
from sgl_evict.eval.runner import answer_tokens
from sgl_evict.layer_groups import GroupLayout
from sgl_evict.policies import POLICIES as REGISTRY

POLICIES = ("snapkv", "dapq", "streaming", "random", "laq")
#: a per_layer server aborts their requests: they score after the prefill (lookahead, soft tokens), uniform only
NOT_PER_LAYER = tuple(name for name, cls in REGISTRY.items() if cls.compresses and not cls.scores_at_prefill())
BUDGETS = ("0.05", "0.1", "0.2", "0.5")
CONTEXTS = (1024, 2048, 4096, 8192, 16384)
FULL = "full"
WINDOW, SINKS = 32, 4  # sgl-evict eval's defaults
LOOKAHEAD_STEPS = 8  # --kv-evict-lookahead-steps' default
PORT = 31300


@dataclass(frozen=True)
class Run:
    """One request: a sample's prompt under one policy and budget (``FULL``/``FULL``: the full cache)."""

    task: str
    context: int
    seed: int
    policy: str
    budget: str

    @property
    def kv_evict(self) -> dict:
        """The request's ``custom_params["kv_evict"]``."""
        if self.policy == FULL:
            return {"policy": "none"}
        return {"policy": self.policy, "budget": float(self.budget)}

    @property
    def key(self) -> str:
        return f"{self.task}/{self.context}/{self.seed}/{self.policy}@{self.budget}"


def plan_runs(tasks, contexts, samples: int, seed: int, policies, budgets) -> list[Run]:
    """Every request of the benchmark, sample by sample: the full cache first, then each policy x budget."""
    runs = []
    for task in tasks:
        for context in contexts:
            for i in range(samples):
                s = seed * 100_003 + i  # sgl-evict eval's sample seeds
                runs.append(Run(task, context, s, FULL, FULL))
                runs.extend(Run(task, context, s, p, b) for p in policies for b in budgets)
    return runs


def payload(run: Run, ids: list[int], max_new_tokens: int) -> dict:
    """The /generate request of ``run``: greedy, ``max_new_tokens`` tokens (EOS cut afterwards, as the harness
    stops), its own radix namespace."""
    return {"input_ids": ids, "extra_key": f"gemma-quality:{run.key}",
            "sampling_params": {"temperature": 0, "max_new_tokens": max_new_tokens, "ignore_eos": True,
                                "custom_params": {"kv_evict": run.kv_evict}}}


def expected_kept(n: int, budget: str, sinks: int, tail: int) -> int:
    """Tokens a prompt of ``n`` keeps on a server protecting ``tail`` trailing tokens: the budget, or the sinks
    and the tail when they are more; ``n`` when that covers the prompt (nothing evicted, nothing logged)."""
    return min(n, max(math.ceil(float(budget) * n), sinks + tail))


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token (the shorter length if one is a prefix of the other), None if equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def query_server(server, runs: list[Run], prompt_ids: dict, max_new_tokens: int, eos: tuple[int, ...],
                 progress=print) -> dict[str, list[int]]:
    """Sends every run to ``server`` (anything with smoke.Server's ``generate(payload) -> (seconds, body)``), one
    at a time, so the eviction log lines come in the runs' order; returns run key -> answer tokens."""
    answers = {}
    for i, run in enumerate(runs):
        _, body = server.generate(payload(run, prompt_ids[(run.task, run.context, run.seed)], max_new_tokens))
        answers[run.key] = answer_tokens(body["output_ids"], max_new_tokens, eos)
        if i % 25 == 0 or i == len(runs) - 1:
            progress(f"[gemma_quality] server {i + 1}/{len(runs)} {run.key}")
    return answers


def eviction_log(text: str) -> list[tuple[int, int]]:
    """(kept, prompt length) of each eviction a server logged, in order; on a per_layer server (kept
    group-slots, prompt length)."""
    per_layer = re.findall(r"sgl-evict: request \S+ kept \d+ of (\d+) tokens in some group \((\d+) of", text)
    if per_layer:
        return [(int(k), int(n)) for n, k in per_layer]
    return [(int(k), int(n)) for k, n in re.findall(r"sgl-evict: request \S+ kept (\d+) of (\d+) tokens", text)]


def expected_group_slots(n: int, budget: str, tail: int, layout: GroupLayout) -> int:
    """Group-slots a prompt of ``n`` tokens keeps on a per_layer server: ``expected_kept`` in each group holding a
    full-attention layer (laprox: in total over them), the last ``tail`` tokens in each sliding-window-only group."""
    kept = expected_kept(n, budget, SINKS, max(WINDOW, tail))
    return len(layout.scored_groups) * kept + len(layout.window_only_groups) * min(n, tail)


def kv_fraction(n: int, budget: str, tail: int, layout: GroupLayout | None) -> float:
    """The KV a prompt of ``n`` tokens keeps after eviction, as (layer, token) entries over the full cache's:
    uniform (``layout`` None) keeps one keep-set in every layer; per_layer ``expected_group_slots`` of
    ``L / G`` layers each."""
    if budget == FULL or expected_kept(n, budget, SINKS, max(WINDOW, tail)) == n:
        return 1.0
    if layout is None:
        return expected_kept(n, budget, SINKS, max(WINDOW, tail)) / n
    return expected_group_slots(n, budget, tail, layout) / (layout.num_groups * n)


def check_kept(runs: list[Run], prompt_lens: dict, logged: list[tuple[int, int]], tail: int,
               layout: GroupLayout | None = None) -> dict:
    """Whether every evicting run logged the kept tokens it should (runs whose prompt the protected tokens cover
    log nothing); with a per_layer server's ``layout``, the group-slots it should."""
    expected = []
    for run in runs:
        n = prompt_lens[(run.task, run.context, run.seed)]
        if run.policy != FULL and expected_kept(n, run.budget, SINKS, max(WINDOW, tail)) < n:
            kept = (expected_kept(n, run.budget, SINKS, max(WINDOW, tail)) if layout is None
                    else expected_group_slots(n, run.budget, tail, layout))
            expected.append((kept, n))
    mismatches = [(i, e, g) for i, (e, g) in enumerate(zip(expected, logged)) if e != g]
    return {"ok": len(expected) == len(logged) and not mismatches, "expected": len(expected), "logged": len(logged),
            "first_mismatches": mismatches[:5]}


def summarize(runs: list[Run], server: dict, harness: dict, scores: dict, kv: dict | None = None) -> dict:
    """Accuracy of server and harness and their token-exact agreement, per policy@budget and per context;
    ``kv`` (run key -> :func:`kv_fraction`) adds the mean KV kept."""
    groups = defaultdict(lambda: {"n": 0, "server_score": 0.0, "harness_score": 0.0, "agree": 0, "kv": 0.0})
    for run in runs:
        for name in (f"{run.policy}@{run.budget}", f"{run.policy}@{run.budget}/{run.context}"):
            g = groups[name]
            g["n"] += 1
            g["server_score"] += scores[("server", run.key)]
            g["harness_score"] += scores[("harness", run.key)]
            g["agree"] += server[run.key] == harness[run.key]
            g["kv"] += kv[run.key] if kv else 0.0
    return {name: {"n": g["n"], "server_accuracy": g["server_score"] / g["n"],
                   "harness_accuracy": g["harness_score"] / g["n"], "token_agreement": g["agree"] / g["n"],
                   **({"kv_fraction": g["kv"] / g["n"]} if kv else {})}
            for name, g in sorted(groups.items())}


def agreement_checks(summary: dict, policies, budgets, slack: float) -> dict:
    """Each policy@budget agrees with the harness token for token about as often as the full cache does (bf16
    kernels differ between SGLang's Triton attention and HF's sdpa, so the full cache sets the bar)."""
    bar = summary[f"{FULL}@{FULL}"]["token_agreement"]
    checks = {}
    for p in policies:
        for b in budgets:
            got = summary[f"{p}@{b}"]["token_agreement"]
            checks[f"{p}@{b}: server answers agree with the harness's (full cache: {bar:.2f})"] = {
                "ok": got >= bar - slack, "agreement": got}
    return checks


def harness_answers(harness, runs: list[Run], prompt_ids: dict, max_new_tokens: int, eos: tuple[int, ...],
                    device: str, progress=print, stop_at: float = math.inf,
                    soft_tokens: str = "", granularity: str = "uniform") -> dict[str, list[int]]:
    """The harness's answer to every run, one prefill per sample (runs are grouped by sample); stops at the first
    new sample after ``stop_at`` (a ``time.time()``), so the answers cover whole samples. ``soft_tokens``: the
    judgeq file the server was started with; ``granularity``: the server's (per_layer: with the harness's layer
    groups)."""
    import torch

    from sgl_evict import Budget, make_policy

    answers, state, sample = {}, None, None
    for i, run in enumerate(runs):
        if (run.task, run.context, run.seed) != sample:
            if time.time() > stop_at:
                progress(f"[gemma_quality] harness: deadline reached after {i}/{len(runs)} runs")
                break
            sample = (run.task, run.context, run.seed)
            state = harness.prefill(torch.tensor([prompt_ids[sample]], device=device))
        if run.policy == FULL:
            tokens = harness.generate(state, make_policy("none"), Budget(fraction=1.0), max_new_tokens=max_new_tokens,
                                      eos_token_ids=eos).tokens
        elif run.policy == "laq":
            tokens = laq_as_served(harness, state, Budget.parse(run.budget), max_new_tokens, eos)
        else:
            options = {"soft_tokens_path": soft_tokens} if run.policy == "judgeq" else {}
            tokens = harness.generate(state, make_policy(run.policy, **options), Budget.parse(run.budget),
                                      granularity, max_new_tokens=max_new_tokens, eos_token_ids=eos).tokens
        answers[run.key] = answer_tokens(tokens, max_new_tokens, eos)
        if i % 25 == 0 or i == len(runs) - 1:
            progress(f"[gemma_quality] harness {i + 1}/{len(runs)} {run.key}")
    return answers


def laq_as_served(harness, state, budget, max_new_tokens: int, eos: tuple[int, ...]) -> list[int]:
    """laq as the server runs it (harness internals: ``_run_cache``, ``_greedy``, cache layers).

    Answer token 1 comes from the prompt's logits; tokens 2 .. LOOKAHEAD_STEPS + 1 are decoded on the snapkv view,
    whose decode steps' queries then re-score the prompt (teacher-forced lookahead on tokens 1 .. LOOKAHEAD_STEPS);
    the rest is decoded on the laq keep-set of the prompt followed by the lookahead tokens' KV as the view computed
    it (the server keeps those slots). Sliding-window layers keep the view's cache: they never lose a token.
    """
    import torch

    from sgl_evict import make_policy

    view, _, _ = harness._run_cache(state, make_policy("snapkv"), budget, "uniform")
    first = int(state.last_logits.argmax())
    head = harness._greedy(view, first, state.seq_len, min(max_new_tokens, LOOKAHEAD_STEPS + 1), eos)
    if len(head) < LOOKAHEAD_STEPS + 1 or head[-1] in eos or max_new_tokens == len(head):
        return head  # the answer ends within the lookahead steps (the server evicts later, unseen here)
    policy = make_policy("laq", lookahead_steps=LOOKAHEAD_STEPS, lookahead_tokens=tuple(head[:LOOKAHEAD_STEPS]))
    cache, _, _ = harness._run_cache(state, policy, budget, "uniform")
    for layer, entry in enumerate(cache.layers):
        decoded = view.layers[layer]
        if layer not in harness.layers:
            cache.layers[layer] = decoded
            continue
        entry.keys = torch.cat([entry.keys, decoded.keys[:, :, -LOOKAHEAD_STEPS:]], dim=2)
        entry.values = torch.cat([entry.values, decoded.values[:, :, -LOOKAHEAD_STEPS:]], dim=2)
    rest = harness._greedy(cache, head[-1], state.seq_len + LOOKAHEAD_STEPS, max_new_tokens - LOOKAHEAD_STEPS, eos)
    return head[:-1] + rest


def launch(model: Path, out: Path, context: int, soft_tokens: str = "", granularity: str = "uniform",
           layer_groups: int | None = None) -> Server:
    """The evicting Gemma server; ``granularity`` per_layer: the layered pool (eager Triton, page size 1), with
    ``layer_groups`` groups (None: one per layer)."""
    args = ["--model-path", str(model), "--skip-tokenizer-init", "--attention-backend", "triton",
            "--context-length", str(context), "--mem-fraction-static", "0.6", "--max-running-requests", "8",
            "--kv-evict-policy", "snapkv", "--kv-evict-budget", "0.1", "--kv-evict-window", str(WINDOW),
            "--kv-evict-sinks", str(SINKS), "--kv-evict-lookahead-steps", str(LOOKAHEAD_STEPS)]
    if soft_tokens:
        args += ["--kv-evict-soft-tokens", soft_tokens]
    if granularity == "per_layer":
        args += ["--kv-evict-granularity", "per_layer", "--disable-cuda-graph", "--page-size", "1"]
        if layer_groups is not None:
            args += ["--kv-evict-layer-groups", str(layer_groups)]
    return Server("gemma-evict", PORT, args, out)


def model_layout(config: dict, granularity: str, layer_groups: int | None) -> GroupLayout | None:
    """The per_layer server's layer groups of the HF ``config`` (None for uniform); SystemExit naming the flag when
    ``layer_groups`` does not divide the model's layers."""
    if granularity != "per_layer":
        return None
    layers = config["num_hidden_layers"]
    types = config.get("layer_types") or ["full_attention"] * layers
    window = frozenset(i for i, kind in enumerate(types) if kind != "full_attention")
    try:
        return GroupLayout(layers, layer_groups or layers, window)
    except ValueError as err:
        raise SystemExit(f"gemma_quality: --layer-groups: {err}") from None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="", help="HF Gemma 3 checkpoint (default: convert the carried GGUF)")
    parser.add_argument("--contexts", default=",".join(map(str, CONTEXTS)))
    parser.add_argument("--tasks", default="", help="comma-separated (default: every task)")
    parser.add_argument("--samples", type=int, default=1, help="samples per task and context")
    parser.add_argument("--policies", default="",
                        help=f"comma-separated (default: {','.join(POLICIES)}; with per_layer without "
                             f"{' and '.join(NOT_PER_LAYER)}, which it does not run)")
    parser.add_argument("--granularity", choices=("uniform", "per_layer"), default="uniform",
                        help="per_layer: the layered server (--kv-evict-granularity per_layer) and the harness's "
                             "per_layer selection")
    parser.add_argument("--layer-groups", type=int, default=None,
                        help="per_layer: layer groups G (--kv-evict-layer-groups; default one per layer)")
    parser.add_argument("--budgets", default=",".join(BUDGETS))
    parser.add_argument("--soft-tokens", default="",
                        help="judgeq soft-token file for the server and the harness (needed for policy judgeq)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--slack", type=float, default=0.2, help="agreement allowed below the full cache's")
    parser.add_argument("--timeout", type=float, default=420, help="seconds to wait for the server")
    parser.add_argument("--deadline", type=float, default=math.inf,
                        help="seconds for the whole script: the harness stops at the first sample after it and the "
                             "comparison covers the samples it answered")
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    args = parser.parse_args()
    started_at = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sgl_evict.eval.tasks import TASKS, generate_sample, score_answer

    model = Path(args.model) if args.model else convert_gemma(SITE / "gemma-parts", Path("/tmp/gemma3-270m-hf"))
    config = json.loads((model / "config.json").read_text())
    tail = int(config["sliding_window"])  # what the server protects: HF's window = SGLang's window_left + 1
    tokenizer = AutoTokenizer.from_pretrained(model)
    eos = tuple(sorted({t for t in (tokenizer.eos_token_id, config.get("eos_token_id")) if isinstance(t, int)}))
    tasks = args.tasks.split(",") if args.tasks else list(TASKS)
    contexts = [int(c) for c in args.contexts.split(",")]
    per_layer = args.granularity == "per_layer"
    if args.layer_groups is not None and not per_layer:
        raise SystemExit("gemma_quality: --layer-groups needs --granularity per_layer")
    default_policies = [p for p in POLICIES if not per_layer or p not in NOT_PER_LAYER]
    policies = args.policies.split(",") if args.policies else default_policies
    budgets = args.budgets.split(",")
    if per_layer and set(policies) & set(NOT_PER_LAYER):
        raise SystemExit(f"gemma_quality: --granularity per_layer does not run {', '.join(NOT_PER_LAYER)} (the "
                         "server aborts those requests)")
    layout = model_layout(config, args.granularity, args.layer_groups)
    if "judgeq" in policies and not args.soft_tokens:
        raise SystemExit("gemma_quality: policy judgeq needs --soft-tokens FILE")
    soft_tokens = str(Path(args.soft_tokens).resolve()) if args.soft_tokens else ""
    runs = plan_runs(tasks, contexts, args.samples, args.seed, policies, budgets)

    count = lambda text: len(tokenizer(text).input_ids)
    samples, prompt_ids = {}, {}
    for run in runs:
        key = (run.task, run.context, run.seed)
        if key not in samples:
            samples[key] = generate_sample(run.task, run.context, count, run.seed)
            prompt_ids[key] = tokenizer(samples[key].prompt).input_ids
    prompt_lens = {k: len(v) for k, v in prompt_ids.items()}
    print(f"[gemma_quality] {len(samples)} samples, {len(runs)} runs, eos {eos}, protected tail {tail}")

    report = {"command": " ".join(sys.argv), "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "versions": {m: _version(m) for m in ("sglang", "torch", "triton", "transformers")},
              "device": torch.cuda.get_device_name(0), "model": str(model), "protected_tail": tail,
              "window": WINDOW, "sinks": SINKS, "granularity": args.granularity,
              "layer_groups": layout.num_groups if layout else None, "runs": [asdict(r) for r in runs],
              "checks": {}}
    checks = report["checks"]
    server = launch(model, out, max(prompt_lens.values()) + args.max_new_tokens + 64, soft_tokens,
                    args.granularity, layout.num_groups if layout else None)
    report["server"] = server.cmd
    served: dict[str, list[int]] = {}
    try:
        server.wait_healthy(args.timeout, every_s=3.0)
        checks["server healthy"] = {"ok": server.healthy_after is not None, "after_s": server.healthy_after}
        if server.healthy_after is not None:
            started = time.time()
            served = query_server(server, runs, prompt_ids, args.max_new_tokens, eos)
            report["server_s"] = time.time() - started
            time.sleep(15)  # idle: SGLang's scheduler checks available + evictable == total (raises on a leak)
            text = server.log_path.read_text()
            checks["kept tokens as expected (budget, or sinks + sliding window)"] = check_kept(
                runs, prompt_lens, eviction_log(text), tail, layout)
            checks["alive after idle, no leak or traceback"] = {
                "ok": server.proc.poll() is None and "leak" not in text and "Traceback" not in text}
    except Exception as err:
        checks["driver"] = {"ok": False, "error": repr(err)}
    finally:
        server.stop()
    # written now and again at the end: a run cut by the device's time limit keeps the server's side
    report["server_answers"] = served
    (out / "gemma_quality.json").write_text(json.dumps(report, indent=1))
    if served:
        try:
            from sgl_evict.harness import EvictionHarness

            hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16)
            harness = EvictionHarness(hf, window=WINDOW, sinks=SINKS, device="cuda", protected_recent=tail,
                                      layer_groups=layout.num_groups if layout else None)
            started = time.time()
            ours = harness_answers(harness, runs, prompt_ids, args.max_new_tokens, eos, "cuda",
                                   stop_at=started_at + args.deadline, soft_tokens=soft_tokens,
                                   granularity=args.granularity)
            report["harness_s"] = time.time() - started
            compared = [run for run in runs if run.key in ours]
            report["compared_runs"] = len(compared)
            checks["harness answered every run before the deadline"] = {"ok": len(compared) == len(runs),
                                                                        "answered": len(compared)}
            runs = compared
            scores = {}
            for run in runs:
                sample = samples[(run.task, run.context, run.seed)]
                for side, answers in (("server", served), ("harness", ours)):
                    scores[(side, run.key)] = score_answer(sample, tokenizer.decode(answers[run.key],
                                                                                     skip_special_tokens=True))
            report["answers"] = {run.key: {"server": served[run.key], "harness": ours[run.key],
                                           "diverge_at": first_divergence(served[run.key], ours[run.key]),
                                           "server_score": scores[("server", run.key)],
                                           "harness_score": scores[("harness", run.key)]} for run in runs}
            kv = {run.key: kv_fraction(prompt_lens[(run.task, run.context, run.seed)], run.budget, tail, layout)
                  for run in runs}
            report["summary"] = summarize(runs, served, ours, scores, kv)
            checks.update(agreement_checks(report["summary"], policies, budgets, args.slack))
        except Exception as err:
            checks["harness comparison"] = {"ok": False, "error": repr(err)}
    (out / "gemma_quality.json").write_text(json.dumps(report, indent=1))
    for name, row in report.get("summary", {}).items():
        if "/" not in name:
            print(f"[gemma_quality] {name:14s} server {row['server_accuracy']:.2f}  harness "
                  f"{row['harness_accuracy']:.2f}  agree {row['token_agreement']:.2f}  kv {row['kv_fraction']:.3f}  "
                  f"(n={row['n']})")
    return print_checks(checks)


if __name__ == "__main__":
    sys.exit(main())
