"""Runs policies x budgets over task samples with one shared prefill per sample."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field

import torch

from sgl_evict.eval.tasks import TASKS, generate_sample, score_answer
from sgl_evict.policies import POLICIES, EvictionPolicy, make_policy, policy_class
from sgl_evict.selection import GRANULARITIES, Budget

FULL = "full"  # budget label of the uncompressed reference run


def policy_variant(text: str) -> tuple[str, dict]:
    """``laq`` or ``laq+reserve=2``: a registered policy name and options of it (values read as JSON where they
    parse, e.g. ``2`` or ``true``, else as text); ValueError naming an unknown policy or option."""
    name, *extras = text.split("+")
    options = {}
    for item in extras:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"policy {text!r}: an option is key=value, e.g. laq+reserve=2")
        try:
            options[key] = json.loads(value)
        except ValueError:
            options[key] = value
    make_policy(name, **{k: v for k, v in options.items()})  # unknown names and options fail here, listed
    return name, options


def variant_policy(text: str) -> EvictionPolicy:
    """The policy object of :func:`policy_variant`'s ``text`` (``laprox`` or ``laprox+continuation=3``)."""
    name, options = policy_variant(text)
    return make_policy(name, **options)


def default_policies() -> list[str]:
    """Every registered policy that compresses and needs no file of its own (soft tokens are trained per model)."""
    return [name for name, cls in POLICIES.items() if cls.compresses and not cls.uses("soft_token_queries")]


@dataclass
class EvalConfig:
    """What one evaluation covers. Budgets are strings as ``Budget.parse`` reads them."""

    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    context_tokens: int = 2048
    samples_per_task: int = 1
    policies: list[str] = field(default_factory=default_policies)
    budgets: list[str] = field(default_factory=lambda: ["0.05", "0.1", "0.2", "0.5"])
    granularity: str = "uniform"
    window: int = 32
    sinks: int = 4
    #: trailing tokens every keep-set keeps (the larger of this and ``window``); the server's sliding window
    protected_recent: int = 0
    #: per_layer only: the model's layers in this many groups sharing a keep-set, as a server's
    #: ``--kv-evict-layer-groups`` (None: one per layer)
    layer_groups: int | None = None
    max_new_tokens: int = 16
    fidelity_tokens: int = 16
    seed: int = 0
    soft_tokens: str | None = None

    def validate(self) -> None:
        """Fails with a message naming the bad setting, before any model work starts."""
        for t in self.tasks:
            if t not in TASKS:
                raise ValueError(f"unknown task {t!r}; choose from: {', '.join(TASKS)}")
        for b in self.budgets:
            Budget.parse(b)
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {self.granularity!r}")
        if self.layer_groups is not None and (self.granularity != "per_layer" or self.layer_groups < 1):
            raise ValueError(f"layer groups ({self.layer_groups}) need granularity per_layer and at least 1 group")
        for name in self.policies:
            if policy_class(policy_variant(name)[0]).uses("soft_token_queries") and not self.soft_tokens:
                raise ValueError(f"policy {name!r} needs --soft-tokens FILE (soft tokens trained for this model)")
        for name, value in (("context tokens", self.context_tokens), ("samples per task", self.samples_per_task),
                            ("max new tokens", self.max_new_tokens), ("window", self.window)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.fidelity_tokens < 1 or self.sinks < 0 or self.protected_recent < 0:
            raise ValueError("fidelity tokens must be >= 1, sinks and protected recent tokens >= 0")
        self.build_policies()

    def build_policies(self) -> dict[str, EvictionPolicy]:
        """Each entry of ``policies`` (a name, or a variant such as ``laq+reserve=2``) as its policy object."""
        out = {}
        for text in self.policies:
            name, options = policy_variant(text)
            if policy_class(name).uses("soft_token_queries"):
                options["soft_tokens_path"] = self.soft_tokens
            out[text] = make_policy(name, **options)
        return out


@dataclass
class RunRecord:
    """One (sample, policy, budget) result. ``kl`` and ``top1`` compare with the full cache."""

    task: str
    seed: int
    policy: str
    budget: str
    score: float
    top1: float
    kl: float
    seq_len: int
    kept_tokens: list[int]
    output: str


def _decode(tokenizer, tokens: list[int]) -> str:
    return tokenizer.decode(tokens, skip_special_tokens=True)


def run_evaluation(model, tokenizer, config: EvalConfig, progress: bool = True,
                   done: list[RunRecord] = (), on_record=None) -> list[RunRecord]:
    """Evaluates every policy and budget of ``config`` on freshly generated task samples.

    Per sample: one full prefill; the full-cache greedy answer (the ceiling) and its continuation
    of ``fidelity_tokens`` tokens, which the compressed runs are teacher-forced on for top-1
    agreement and KL; then each policy x budget generates its own greedy answer.

    ``done``: records of an interrupted run of the same config, kept and not run again (a sample all of whose
    runs are done is not even prefilled). ``on_record(record)``: called as each new record is made.
    """
    from tqdm.auto import tqdm

    from sgl_evict.harness import EvictionHarness

    config.validate()
    policies = config.build_policies()
    harness = EvictionHarness(model, window=config.window, sinks=config.sinks,
                              protected_recent=config.protected_recent, layer_groups=config.layer_groups)
    none = make_policy("none")
    full_budget = Budget(fraction=1.0)
    eos = tuple(sorted({t for t in (tokenizer.eos_token_id, getattr(model.config, "eos_token_id", None))
                        if isinstance(t, int)}))
    count = lambda text: len(tokenizer(text).input_ids)  # noqa: E731
    runs_per_sample = 1 + len(policies) * len(config.budgets)
    total = len(config.tasks) * config.samples_per_task * runs_per_sample
    finished = {(r.task, r.seed, r.policy, r.budget): r for r in done}
    records: list[RunRecord] = []

    def add(record: RunRecord) -> None:
        records.append(record)
        if on_record is not None:
            on_record(record)
        bar.update(1)

    bar = tqdm(total=total, desc="eval", unit="run", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    with torch.inference_mode():
        for task in config.tasks:
            for i in range(config.samples_per_task):
                seed = config.seed * 100_003 + i
                keys = [(task, seed, FULL, FULL)] + [(task, seed, name, b) for name in policies for b in config.budgets]
                if all(k in finished for k in keys):
                    records.extend(finished[k] for k in keys)
                    bar.update(len(keys))
                    continue
                sample = generate_sample(task, config.context_tokens, count, seed)
                ids = tokenizer(sample.prompt, return_tensors="pt").input_ids.to(model.device)
                state = harness.prefill(ids)
                reference = harness.generate(state, none, full_budget, config.granularity,
                                             max_new_tokens=max(config.max_new_tokens, config.fidelity_tokens))
                answer = answer_tokens(reference.tokens, config.max_new_tokens, eos)
                text = _decode(tokenizer, answer)
                if keys[0] in finished:
                    records.append(finished[keys[0]])
                    bar.update(1)
                else:
                    add(RunRecord(task, seed, FULL, FULL, score_answer(sample, text), 1.0, 0.0, reference.seq_len,
                                  [reference.seq_len], text))
                continuation = torch.tensor([reference.tokens[: config.fidelity_tokens]], device=ids.device)
                for name, policy in policies.items():
                    for budget_text in config.budgets:
                        if (task, seed, name, budget_text) in finished:
                            records.append(finished[(task, seed, name, budget_text)])
                            bar.update(1)
                            continue
                        bar.set_postfix_str(f"{task} {name}@{budget_text}")
                        budget = Budget.parse(budget_text)
                        res = harness.generate(state, policy, budget, config.granularity,
                                               max_new_tokens=config.max_new_tokens, eos_token_ids=eos)
                        fid = harness.fidelity(state, policy, budget, config.granularity, continuation, keep=res.keep)
                        text = _decode(tokenizer, res.tokens)
                        add(RunRecord(task, seed, name, budget_text, score_answer(sample, text),
                                      float(fid.top1_agreement), float(fid.kl), res.seq_len, list(res.kept_tokens),
                                      text))
    bar.close()
    return records


def answer_tokens(tokens: list[int], max_new_tokens: int, eos: tuple[int, ...]) -> list[int]:
    """The first ``max_new_tokens`` tokens, cut at the first end-of-sequence token."""
    out = []
    for t in tokens[:max_new_tokens]:
        if t in eos:
            break
        out.append(t)
    return out


def records_to_dicts(records: list[RunRecord]) -> list[dict]:
    return [asdict(r) for r in records]
