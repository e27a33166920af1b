"""Side by side with NVIDIA kvpress on Gemma 3 270M: same prompts, same budgets, one metric code path.

Per prompt (one full prefill, one context prefill):

- ``full``: the uncompressed cache, whole prompt (the reference) and context + question (a sanity check: same);
- ``default`` mode, ours: whole-prompt prefill, then compression with the question inside the observation window;
- ``question-agnostic`` mode, ours and kvpress's: context prefill, compression, then the question is appended
  (kvpress's own way: its pipeline compresses the context and asks the question afterwards);
- ``cross``: our snapkv set up like SnapKVPress's defaults (window 64, average pooling 5, no sinks, mean over the
  GQA group), per layer and uniform, with its keep-set overlap with SnapKVPress's.

Every compression touches only Gemma 3's full-attention layers (5, 11, 17): ours by design, kvpress's through
adapter.py. Usage: python -m bench.peers.kvpress.run --help (run.sh sets up the venv and runs it).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.peers.kvpress import methods as M
from bench.peers.kvpress.adapter import full_attention_layers, kept_per_layer, record
from bench.peers.kvpress.metrics import make_reference, score, summarise
from bench.peers.kvpress.model import DEFAULT_MODEL, load
from bench.peers.kvpress.prompts import build_prompts

ROOT = Path(__file__).resolve().parents[3]
SOFT_TOKENS = ("bench/results/judgeq_gpu_gemma3-270m_2k.safetensors",
               "bench/results/judgeq_cpu_gemma3-270m_1k.safetensors")
DEV_SEEDS = "0-11"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--context", type=int, default=2048, help="prompt length in tokens (default 2048)")
    ap.add_argument("--prompts", type=int, default=30, help="prompts per cell, the 5 tasks in turn (default 30)")
    ap.add_argument("--seed", type=int, default=20261205, help="evaluation seed (default 20261205; dev used 0-11)")
    ap.add_argument("--budgets", default="0.1,0.2,0.5", help="kept fractions (default 0.1,0.2,0.5)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--model", default=str(DEFAULT_MODEL), help=f"HF checkpoint folder (default {DEFAULT_MODEL})")
    ap.add_argument("--horizon", type=int, default=64, help="teacher-forced fidelity tokens (default 64)")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="greedy answer length cap (default 32)")
    ap.add_argument("--presses", default="all", help="comma-separated press names of methods.py, or all")
    ap.add_argument("--ours", default=",".join(M.OURS) + ",judgeq", help="our policies (judgeq if a file fits)")
    ap.add_argument("--greedy", choices=("step", "draft"), default="step",
                    help="answers decoded token by token (step, default) or read off the teacher-forced pass while "
                         "they follow the full cache's continuation, decoded from where they leave it (draft: "
                         "the same tokens up to floating-point ties, far fewer decode steps)")
    ap.add_argument("--no-sweep", action="store_true", help="skip the every-press runs/fails sweep")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/kvpress_<date>_<device>_...json)")
    ap.add_argument("--resume", action="store_true", help="keep the prompts already in --out")
    ap.add_argument("--plot", default=None, help="PNG path, or auto: docs/img/<the JSON's name>.png (default: none)")
    ap.add_argument("--shard", type=shard_arg, default=None, metavar="K/N",
                    help="only prompts K, K+N, K+2N, ... (N processes together run all; the sweep only in shard 0); "
                         "python -m bench.peers.kvpress.merge joins their JSONs")
    return ap.parse_args(argv)


def shard_arg(text: str) -> tuple[int, int]:
    """``"K/N"`` -> ``(K, N)`` with ``0 <= K < N``."""
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard wants K/N, got {text!r}") from None
    if not 0 <= k < n:
        raise argparse.ArgumentTypeError(f"--shard {text}: need 0 <= K < N")
    return k, n


def write_json(path: Path, doc: dict) -> None:
    """Writes ``doc`` to ``path`` through a temporary file, so that a run stopped mid-write (a timeout) leaves the
    previous complete file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, path)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "kvpress", "accelerate"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def judgeq_policy(harness, names: list[str]) -> tuple[object | None, str]:
    """Our judgeq policy with the first soft-token file whose model fingerprint matches, else why not."""
    if "judgeq" not in names:
        return None, "not asked for"
    reasons = []
    for path in SOFT_TOKENS:
        policy = M.make_ours("judgeq", soft_tokens=str(ROOT / path))
        try:
            policy.load(harness.fingerprint())
            return policy, path
        except (ValueError, OSError) as err:
            reasons.append(f"{path}: {err}")
    return None, "; ".join(reasons)


class Runner:
    """Holds the model, the harness and the methods; :meth:`prompt` runs every method on one prompt."""

    def __init__(self, args, model, tokenizer):
        from sgl_evict.harness import EvictionHarness

        self.args, self.model, self.tok = args, model, tokenizer
        # the prefill captures 64 window queries: ours use the last 32 (methods.settings), the cross-check all 64
        self.harness = EvictionHarness(model, window=64, sinks=M.OUR_SINKS, device=args.device)
        self.layers = full_attention_layers(model)
        self.budgets = [float(b) for b in args.budgets.split(",")]
        names = args.ours.split(",")
        self.ours = {n: M.make_ours(n) for n in names if n != "judgeq"}
        judgeq, self.judgeq_note = judgeq_policy(self.harness, names)
        if judgeq is not None:
            self.ours["judgeq"] = judgeq
        factories = M.press_factories()
        wanted = list(factories) if args.presses == "all" else args.presses.split(",")
        self.presses = {n: factories[n] for n in wanted}
        self.eos = tuple(sorted({t for t in (tokenizer.eos_token_id, model.config.eos_token_id) if isinstance(t, int)}))

    def _score(self, ref, cache, first_logits, prompt) -> dict:
        s = score(self.harness, self.tok, ref, cache, first_logits, prompt.answers, self.args.max_new_tokens,
                  self.eos, drafted=self.args.greedy == "draft")
        return dataclasses.asdict(s)

    def _with_question(self, cache, prompt):
        """Appends the question to ``cache`` (a copy, mutated); returns it and the question's last logits."""
        q = prompt.question_ids.to(self.harness.device)
        logits = self.harness._extend(cache, torch.arange(prompt.split, prompt.seq_len), input_ids=q)
        return cache, logits[-1]

    @torch.inference_mode()
    def prompt(self, p) -> list[dict]:
        h, out = self.harness, []

        def add(mode, family, method, budget, n, kept, cache, first_logits, t0, **extra):
            rec = dict(prompt=p.key, task=p.task, mode=mode, family=family, method=method, budget=budget,
                       n_keep=n, kept=kept, **self._score(ref, cache, first_logits, p), **extra)
            rec["seconds"] = round(time.time() - t0, 3)
            out.append(rec)

        full = h.prefill(p.ids)
        ref = make_reference(h, full.cache, full.last_logits, p.seq_len, self.args.horizon)
        t0 = time.time()
        add("default", "full", "full", 1.0, p.seq_len, [p.seq_len] * len(self.layers), full.cache,
            full.last_logits, t0)
        for kept in self.budgets:
            n = M.keep_count(kept, p.seq_len)
            for name, policy in self.ours.items():
                t0 = time.time()
                cache, keep = M.ours_cache(h, full, policy, n)
                add("default", "ours", name, kept, n, [int(i.shape[1]) for i in keep.indices], cache,
                    full.last_logits, t0)
        del full

        with record(self.model, self.layers) as rec:
            ctx = h.prefill(p.context_ids)
        t0 = time.time()
        cache, first = self._with_question(h._shallow_copy(ctx.cache), p)
        add("question-agnostic", "full", "full", 1.0, p.split, [p.split] * len(self.layers), cache, first, t0)
        for kept in self.budgets:
            n = M.keep_count(kept, p.split)
            for name, policy in self.ours.items():
                t0 = time.time()
                cache, keep = M.ours_cache(h, ctx, policy, n)
                kept_n = [int(i.shape[1]) for i in keep.indices]
                add("question-agnostic", "ours", name, kept, n, kept_n, *self._with_question(cache, p), t0)
            snap = None
            for name, factory in self.presses.items():
                t0 = time.time()
                cache = M.press_cache(factory(M.press_ratio(n, p.split)), self.model, h, ctx, rec)
                kept_n = kept_per_layer(cache, self.layers)
                if name == "SnapKVPress(w64,k5)":
                    snap = [M.recover_indices(ctx.cache.layers[i].keys[0, 0], cache.layers[i].keys[0, 0])
                            for i in self.layers]
                add("question-agnostic", "kvpress", name, kept, n, kept_n, *self._with_question(cache, p), t0)
            if snap is not None:
                matched = M.make_ours("snapkv", pooling_kernel=5, pooling_mode="avg", gqa_reduce="mean")
                for gran in ("per_layer", "uniform"):
                    t0 = time.time()
                    cache, keep = M.ours_cache(h, ctx, matched, n, gran, window=64, sinks=0)
                    ov = [M.overlap(keep.indices[j][0], snap[j]) for j in range(len(self.layers))]
                    add("question-agnostic", "cross", f"snapkv-as-SnapKVPress({gran})", kept, n,
                        [int(i.shape[1]) for i in keep.indices], *self._with_question(cache, p), t0, overlap=ov)
        return out


def default_out(args) -> Path:
    date = dt.date.today().isoformat()
    shard = f"_shard{args.shard[0]}-of-{args.shard[1]}" if args.shard else ""
    return ROOT / "bench" / "results" / f"kvpress_{date}_{args.device}_gemma3-270m_{args.context // 1024}k{shard}.json"


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(0)
    out = Path(args.out) if args.out else default_out(args)
    model, tok = load(args.model, args.device)
    runner = Runner(args, model, tok)
    doc = {
        "what": "issue 20: ours vs NVIDIA kvpress on Gemma 3 270M, single-turn quality-suite prompts",
        "commands": [" ".join(["python", "-m", "bench.peers.kvpress.run", *sys.argv[1:]])],
        "git_commit": git_commit(), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": args.device if args.device != "cuda" else torch.cuda.get_device_name(0),
        "cpu_threads": torch.get_num_threads(), "versions": versions(),
        "seeds": {"eval": args.seed, "development": DEV_SEEDS},
        "settings": {k: getattr(args, k) for k in ("context", "prompts", "budgets", "horizon", "max_new_tokens",
                                                   "greedy")},
        "model": args.model,
        "ours": {"policies": list(runner.ours), "window": M.OUR_WINDOW, "sinks": M.OUR_SINKS,
                 "granularity": "uniform", "protected_recent": 0, "judgeq": runner.judgeq_note},
        "presses": list(runner.presses), "compressed_layers": runner.layers, "nearest": M.NEAREST,
        "prompts": [], "records": [],
    }
    if args.resume and out.is_file():
        old = json.loads(out.read_text())
        before = old.get("settings", {}).get("greedy", "step")  # files written before the option decoded by step
        if before != args.greedy:
            raise SystemExit(f"run.py: --greedy {args.greedy}, but {out} was written with --greedy {before}: one "
                             "file holds one way of decoding (start another --out)")
        doc["prompts"], doc["records"] = old["prompts"], old["records"]
        doc["sweep"], doc["commands"] = old.get("sweep"), old["commands"] + doc["commands"]
        # the commits of every invocation that wrote to this file, the first one's first
        doc["git_commit"] = [*([old["git_commit"]] if isinstance(old["git_commit"], str) else old["git_commit"]),
                             doc["git_commit"]]
    if args.shard:
        doc["shard"] = list(args.shard)
    if not args.no_sweep and not doc.get("sweep") and (not args.shard or args.shard[0] == 0):
        from bench.peers.kvpress.sweep import sweep

        doc["sweep"] = sweep(args.model, args.device)
        write_json(out, doc)
    done = {p["key"] for p in doc["prompts"]}
    prompts = build_prompts(tok, args.context, args.seed, args.prompts, args.shard or (0, 1))
    start = time.time()
    for i, p in enumerate(prompts):
        if p.key in done:
            continue
        t0 = time.time()
        doc["records"].extend(runner.prompt(p))
        doc["prompts"].append({"key": p.key, "task": p.task, "seq_len": p.seq_len, "split": p.split,
                               "answers": list(p.answers)})
        doc["summary"] = summarise(doc["records"])
        write_json(out, doc)
        print(f"[kvpress] prompt {i + 1}/{len(prompts)} {p.task} {p.seq_len} tokens: {time.time() - t0:.0f} s "
              f"(total {time.time() - start:.0f} s)", file=sys.stderr, flush=True)
    if not doc["records"]:  # a shard with no prompt of its own (N above the prompt count)
        write_json(out, doc)
    print(f"[kvpress] wrote {out}", file=sys.stderr)
    if not doc["records"]:
        return 0
    from bench.peers.kvpress import report

    print(report.tables(doc) + "\n\n" + report.cross_table(doc) + "\n\n" + report.goal_table(doc))
    if args.plot:
        plot = ROOT / "docs" / "img" / (out.stem + ".png") if args.plot == "auto" else Path(args.plot)
        report.plot(doc, plot)
        print(f"[kvpress] plot {plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
