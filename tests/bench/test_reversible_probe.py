"""bench/reversible_probe.py: irreversible vs reversible eviction over later turns, on tiny random
HF models (CPU)."""

import math

import pytest
import torch
from tiny_models import CharTokenizer, tiny_gemma3, tiny_llama

from bench import reversible_probe as probe
from sgl_evict.observation import LayerObservation
from sgl_evict.policies import make_policy
from sgl_evict.quality.runner import Tokens
from sgl_evict.quality.tasks import Conversation, Turn
from sgl_evict.selection import Budget, KeepSet, select_keep

SINKS, WINDOW, TAIL = 2, 4, 8


@pytest.fixture(scope="module")
def harness():
    from sgl_evict.harness import EvictionHarness

    return EvictionHarness(tiny_llama(), window=WINDOW, sinks=SINKS, device="cpu",
                           protected_recent=TAIL)


def _ids(n: int, seed: int) -> list[int]:
    draw = torch.randint(3, 200, (n,), generator=torch.Generator().manual_seed(seed))
    return [int(x) for x in draw]


TURNS = [_ids(120, 1), _ids(20, 2), _ids(16, 3), _ids(18, 4)]


def _session(harness, policies=("snapkv",), budgets=(0.25,), turns=TURNS):
    """Runs ``turns``; per turn: ({arm: resident positions}, {arm: evict record}, {arm: answer})."""
    arms = probe.make_arms({p: make_policy(p) for p in policies},
                           [Budget(fraction=b) for b in budgets])
    session = probe.Session(harness, arms)
    history = []
    for new in turns:
        records = session.add(new)
        history.append(({a.name: a.resident.clone() for a in arms}, records, session.answers(6)))
    return {a.name: a for a in arms}, history


def test_with_a_budget_of_one_every_arm_keeps_everything_and_answers_as_the_full_cache(harness):
    _, history = _session(harness, ("snapkv", "laq"), (1.0,))
    for _, records, answers in history:
        assert len(set(map(tuple, answers.values()))) == 1 and len(answers) == 7
        assert all(r["restored"] == r["evicted"] == 0 for r in records.values())
    assert all(len(r) == sum(map(len, TURNS)) for r in history[-1][0].values())


def test_on_the_first_turn_every_mode_keeps_the_harness_keep_set_and_answers_alike(harness):
    _, history = _session(harness, ("snapkv", "laq"), (0.25,), TURNS[:1])
    residents, records, answers = history[0]
    state = harness.prefill(torch.tensor([TURNS[0]]))
    for policy in ("snapkv", "laq"):
        keep = harness.select(state, make_policy(policy), Budget(fraction=0.25), "uniform")
        names = [f"{policy}/0.25/{mode}" for mode in probe.MODES]
        assert all(torch.equal(residents[name], keep.indices[0][0]) for name in names)
        assert len({tuple(answers[name]) for name in names}) == 1
        assert all(records[name] == records[names[0]] for name in names)
        assert records[names[0]]["evicted"] == 120 - math.ceil(0.25 * 120)


@torch.inference_mode()
def _later_turn_directly(harness, keep: torch.Tensor, new: list[int], everything: bool):
    """Turn 2's keep-set at 25% computed without the probe: turn 1's compressed cache extended with
    ``new``, then snapkv's scores from the new window queries over the original keys of every token
    (``everything``) or of the resident ones, selected to the budget of the full length."""
    state = harness.prefill(torch.tensor([TURNS[0]]))
    heads = state.cache.layers[harness.layers[0]].keys.shape[1]
    cut = KeepSet([keep.expand(heads, -1)] * len(harness.layers), len(TURNS[0]))
    cache = harness._compressed_cache(state, cut)
    harness.ctx.queries = {}
    length = len(TURNS[0]) + len(new)
    positions = torch.arange(len(TURNS[0]), length)
    harness._extend(cache, positions, input_ids=torch.tensor([new]), record=True)
    queries = harness.ctx.take()
    scores = []
    for layer in harness.layers:
        keys = cache.layers[layer].keys[0]
        if everything:
            keys = torch.cat([state.cache.layers[layer].keys[0], keys[:, -len(new):]], dim=1)
        obs = LayerObservation(keys=keys, scaling=float(harness.attn[layer].scaling),
                               num_q_heads=queries[layer].shape[0],
                               window_queries=queries[layer][:, -WINDOW:])
        scores.append(make_policy("snapkv").score(obs))
    count = Budget(fraction=0.25).num_tokens(length)
    kept = select_keep(torch.stack(scores), Budget(tokens=count), SINKS, max(WINDOW, TAIL))
    candidates = torch.arange(length) if everything else torch.cat([keep, positions])
    return candidates[kept.indices[0][0]]


def test_a_later_keep_set_is_the_policys_selection_over_the_original_keys_with_new_queries(harness):
    _, history = _session(harness, ("snapkv",), (0.25,), TURNS[:2])
    first, second = history[0][0], history[1][0]
    rev, irr = "snapkv/0.25/reversible", "snapkv/0.25/irreversible"
    assert torch.equal(second[rev], _later_turn_directly(harness, first[rev], TURNS[1], True))
    assert torch.equal(second[irr], _later_turn_directly(harness, first[irr], TURNS[1], False))
    assert not torch.equal(second[rev], second[irr])
    assert torch.equal(second["snapkv/0.25/server"], second[irr])  # the tree: turn 1's keep-set


def test_a_token_evicted_at_turn_one_comes_back_in_reversible_and_never_in_irreversible(harness):
    _, history = _session(harness, ("snapkv", "laq"), (0.25,))
    length = len(TURNS[0])
    for policy in ("snapkv", "laq"):
        rev, irr = f"{policy}/0.25/reversible", f"{policy}/0.25/irreversible"
        turn1 = set(history[0][0][rev].tolist())
        back = [t for t in history[1][0][rev].tolist() if t < length and t not in turn1]
        assert back and history[1][1][rev]["restored"] == len(back)
        for (before, _, _), (after, records, _) in zip(history, history[1:]):
            allowed = set(before[irr].tolist()) | set(range(int(before[irr].max()) + 1, 1000))
            assert set(after[irr].tolist()) <= allowed and records[irr]["restored"] == 0


def test_the_server_mode_prefills_over_what_the_tree_holds_and_sees_hidden_tokens_again(harness):
    arms, history = _session(harness, ("snapkv",), (0.25,), TURNS[:3])
    server = "snapkv/0.25/server"
    (first, _, _), (second, records, _) = history[0], history[1]
    # turn 2 drops some of turn 1's tokens only from its view: the tree still holds them
    tree = sorted(set(first[server].tolist()) | {t for t in second[server].tolist() if t >= 120})
    assert records[server]["held"] == len(tree) > records[server]["resident"]
    arm = probe.Arm("snapkv", make_policy("snapkv"), Budget(fraction=0.25), "server")
    session = probe.Session(harness, [arm])
    session.add(TURNS[0])
    session.add(TURNS[1])
    assert arm.prefix.tolist() == tree and not torch.equal(arm.prefix, arm.resident)
    assert arm.prefix_cache(harness).layers[harness.layers[0]].keys.shape[2] == len(tree)
    hidden = set(first[server].tolist()) - set(second[server].tolist())
    third = set(history[2][0][server].tolist())
    assert history[2][1][server]["restored"] == len(third & hidden) > 0
    assert third <= set(tree) | set(range(140, 156))  # the tree and turn 3's new tokens


def test_the_resident_tokens_never_exceed_the_budget_of_the_logical_length(harness):
    arms, history = _session(harness, ("snapkv", "laq"), (0.05, 0.25))
    length = 0
    for (residents, records, _), new in zip(history, TURNS):
        length += len(new)
        for name, resident in residents.items():
            cap = max(arms[name].budget.num_tokens(length), SINKS + max(WINDOW, TAIL))
            assert len(resident) == records[name]["resident"] <= cap
            assert resident.unique().numel() == len(resident) and int(resident.max()) < length
            assert set(range(SINKS)) | set(range(length - TAIL, length)) <= set(resident.tolist())
        # 5% of at most 174 tokens is less than the sinks and the tail: such arms keep them alone
        assert all(r["protected_only"] == ("/0.05/" in name) for name, r in records.items())
        assert torch.equal(residents["snapkv/0.05/irreversible"], residents["laq/0.05/reversible"])


def test_a_sliding_window_model_runs_its_later_turns_through_both_modes():
    from sgl_evict.harness import EvictionHarness

    gemma = EvictionHarness(tiny_gemma3(), window=WINDOW, sinks=SINKS, device="cpu",
                            protected_recent=16)
    _, whole = _session(gemma, ("snapkv",), (1.0,), TURNS[:3])
    assert all(len(set(map(tuple, answers.values()))) == 1 for _, _, answers in whole)
    _, history = _session(gemma, ("snapkv",), (0.3,), TURNS[:3])
    assert history[-1][1]["snapkv/0.3/reversible"]["resident"] == math.ceil(0.3 * 156)
    assert history[-1][1]["snapkv/0.3/reversible"]["restored"] > 0




def test_rerunning_the_last_token_over_a_whole_cache_gives_the_prefill_logits_back():
    """Sliding layers (window 16) past their window give the token back only while recording."""
    from sgl_evict.harness import EvictionHarness

    gemma = EvictionHarness(tiny_gemma3(), window=WINDOW, sinks=SINKS, device="cpu",
                            protected_recent=16)
    with torch.inference_mode():
        state = gemma.prefill(torch.tensor([TURNS[0]]))
        logits, _ = probe.prefill_turn(gemma, state.cache, 120, TURNS[1])
        probe.record_past(state.cache)
        ids = TURNS[0] + TURNS[1]
        ids2 = ids + TURNS[2]
        logits2, _ = probe.prefill_turn(gemma, state.cache, len(ids), TURNS[2])
        cache, again = probe.rerun_last(gemma, state.cache, ids2)
    assert torch.allclose(again, logits2, atol=1e-4)
    assert cache.layers[0].get_seq_length() == len(ids2) == cache.layers[1].keys.shape[2]
    assert state.cache.layers[1].keys.shape[2] == len(ids2)  # the arm's cache is not mutated
    assert not torch.allclose(logits, logits2, atol=1e-2)


def test_the_rerun_mode_keeps_the_carry_keep_set_and_answers_from_its_last_token_run_again(harness):
    modes = (probe.CARRY, probe.RERUN)
    arms = probe.make_arms({"snapkv": make_policy("snapkv")}, [Budget(fraction=0.25)], modes)
    session, (carry, rerun) = probe.Session(harness, arms), arms
    session.add(TURNS[0])
    assert carry.first == rerun.first and carry.trail == rerun.trail  # nothing to rerun on turn 1
    session.add(TURNS[1])
    assert torch.equal(carry.resident, rerun.resident) and probe.RERUN in rerun.trail
    ids = TURNS[0] + TURNS[1]
    keys, values = (torch.stack([kv[j] for kv in rerun.store]) for j in (0, 1))
    with torch.inference_mode():  # the keep-set from the original KV, less its last token
        cache = harness._shallow_copy(carry.cache)
        for i, layer in enumerate(harness.layers):
            kept, entry = rerun.resident[:-1], cache.layers[layer]
            entry.keys, entry.values = keys[i][:, :, kept], values[i][:, :, kept]
        direct = harness._extend(cache, torch.tensor([len(ids) - 1]),
                                 input_ids=torch.tensor([[ids[-1]]]))[-1]
    assert rerun.first == int(direct.argmax())
    assert rerun.cache.layers[0].keys.shape[2] == len(rerun.resident)
    answers = session.answers(6)
    assert answers[rerun.name][0] == rerun.first and answers[carry.name][0] == carry.first


def test_a_conversation_gives_one_row_per_turn_and_arm_and_the_summary_counts_them(harness):
    text = "".join(chr(c) for c in _ids(90, 5) if chr(c) != "\n")
    turns = (Turn(text, "q1?", ("zz",)), Turn("", "q2?", ("",)), Turn("", "q3?", ("",)))
    arms = probe.make_arms({"snapkv": make_policy("snapkv")}, [Budget(fraction=0.3)])
    rows = probe.ask_conversation(harness, Tokens(CharTokenizer(200)), Conversation("doc_qa", 256, 0, 0, turns),
                                  arms, 8)
    assert [(r["turn"], r["arm"]) for r in rows][:4] == [(0, "full")] + [
        (0, f"snapkv/0.3/{mode}") for mode in probe.MODES]
    assert len(rows) == 12 and all(r["correct"] for r in rows if r["turn"] > 0)  # "" is in all
    assert rows[0]["prompt_len"] == 1 + len(text) + 3 and rows[1]["answer"] == rows[3]["answer"]
    assert rows[0]["first_as_full"] and "restored" not in rows[0] and rows[3]["restored"] == 0
    s = probe.summarize([{"family": "doc_qa", "target": 256, "conv": 0, **r} for r in rows])
    assert s["turns"]["doc_qa/256/full/1"]["accuracy"]["k"] == 1
    later = s["turns"]["doc_qa/256/snapkv/0.3/reversible/later"]["retention"]
    assert (later["k"], later["n"]) == (2, 2)
    assert s["paired_later"]["doc_qa/256/snapkv/0.3/server_vs_reversible"]["n"] == 2
    assert not any("reversible-k4" in pair for pair in s["paired_later"])  # a mode that did not run
    assert "| doc_qa/256/snapkv/0.3/reversible | 2 |" in probe.table(s)


def test_the_summary_pairs_the_modes_and_counts_retention_on_what_the_full_cache_solved():
    rows, arms = [], ("full", "snapkv/0.1/irreversible", "snapkv/0.1/reversible")
    for conv, later in enumerate([(1, 1, 1), (1, 0, 1), (0, 0, 1), (1, 0, 0)]):
        for turn, correct in ((0, (1, 1, 1)), (1, later)):
            for arm, c, restored in zip(arms, correct, (None, 0, 3)):
                extra = {} if restored is None else {"restored": restored, "evicted": 5,
                                                     "resident": 10, "protected_only": False}
                rows.append({"family": "doc_qa", "target": 64, "conv": conv, "turn": turn,
                             "arm": arm, "correct": bool(c), "first_as_full": arm != arms[2],
                             **extra})
    s = probe.summarize(rows)
    rev, irr = (s["turns"][f"doc_qa/64/snapkv/0.1/{m}/later"]
                for m in ("reversible", "irreversible"))
    assert (rev["accuracy"]["k"], rev["retention"]["k"], rev["retention"]["n"]) == (3, 2, 3)
    assert (irr["accuracy"]["k"], irr["retention"]["k"]) == (1, 1) and rev["first_as_full"] == 0
    assert s["paired_later"]["doc_qa/64/snapkv/0.1/irreversible_vs_reversible"] == {
        "n": 4, "only_irreversible": 0, "only_reversible": 2, "mcnemar_p": 0.5}
    assert "| doc_qa/64/snapkv/0.1/irreversible_vs_reversible | 4 | 0 | 2 | 0.5 |" in probe.table(s)
    assert s["turns"]["doc_qa/64/snapkv/0.1/reversible/1"]["restored"] == {"mean": 3.0, "max": 3,
                                                                        "total": 12}
    assert "restored" not in s["turns"]["doc_qa/64/full/1"]
    assert list(s["turns"])[:3] == ["doc_qa/64/full/0", "doc_qa/64/full/1", "doc_qa/64/full/later"]


def test_rounded_keys_keep_each_vectors_largest_magnitude_and_use_the_levels_of_their_bits():
    keys = torch.randn(2, 3, 5, 16, generator=torch.Generator().manual_seed(0))
    for bits in (4, 2):
        rounded = probe.rounded_keys(keys, bits)
        top = 2 ** (bits - 1) - 1
        scale = keys.abs().amax(-1, keepdim=True) / top
        levels = (rounded / scale).round()
        assert torch.allclose(rounded, levels * scale) and levels.min() >= -top - 1 and levels.max() <= top
        assert torch.allclose(rounded.abs().amax(-1), keys.abs().amax(-1))
        assert ((rounded - keys).abs() <= scale / 2 + 1e-6).all()
    assert torch.equal(probe.rounded_keys(torch.zeros(1, 4), 4), torch.zeros(1, 4))


def test_a_summary_mode_scores_held_out_tokens_from_rounded_keys_and_restores_exact_kv(harness, monkeypatch):
    modes = ("reversible", "reversible-k4", "reversible-k2")
    arms = probe.make_arms({"snapkv": make_policy("snapkv")}, [Budget(fraction=0.25)], modes)
    session = probe.Session(harness, arms)
    by = {a.mode: a for a in arms}
    records = [session.add(new) for new in TURNS]
    assert "jaccard_vs_exact" not in records[0]["snapkv/0.25/reversible-k4"]  # turn 1 scores no held-out token
    for turn in records[1:]:
        for mode in ("reversible-k4", "reversible-k2"):
            assert 0 <= turn[f"snapkv/0.25/{mode}"]["jaccard_vs_exact"] <= 1
        assert "jaccard_vs_exact" not in turn["snapkv/0.25/reversible"]
    # two bits move some choices (each arm scores its own held-out keys, not the exact arm's keep-set)
    assert min(turn["snapkv/0.25/reversible-k2"]["jaccard_vs_exact"] for turn in records[1:]) < 1
    # the answering cache holds the exact KV of what the summary arm chose, whatever scored it
    arm = by["reversible-k2"]
    for i, (k, v) in zip(harness.layers, arm.store):
        layer = arm.cache.layers[i]
        assert torch.equal(layer.keys[0, 0], k[0, 0, arm.resident]) and torch.equal(layer.values[0, 0],
                                                                                    v[0, 0, arm.resident])
    # with rounding that changes nothing, the summary arm chooses exactly what the exact arm chooses
    monkeypatch.setattr(probe, "rounded_keys", lambda keys, bits: keys)
    arms = probe.make_arms({"snapkv": make_policy("snapkv")}, [Budget(fraction=0.25)], modes[:2])
    session = probe.Session(harness, arms)
    for new in TURNS:
        later = session.add(new)
    assert later["snapkv/0.25/reversible-k4"]["jaccard_vs_exact"] == 1.0
    assert torch.equal(arms[0].resident, arms[1].resident)


def test_the_tree_mode_prefills_over_the_trees_prefix_and_scores_every_logical_token(harness):
    modes = ("reversible", probe.TREE)
    arms = probe.make_arms({"snapkv": make_policy("snapkv")}, [Budget(fraction=0.25)], modes)
    session, (rev, tree_arm) = probe.Session(harness, arms), arms
    first = session.add(TURNS[0])
    kept_first = set(tree_arm.resident.tolist())
    second = session.add(TURNS[1])
    # turn 2: the same prefix as reversible (turn 1's keep-set), so the same candidates and keep-set
    assert torch.equal(rev.resident, tree_arm.resident)
    tree = sorted(kept_first | {t for t in tree_arm.resident.tolist() if t >= 120})
    assert tree_arm.prefix.tolist() == tree and second[tree_arm.name]["held"] == len(tree)
    assert second[rev.name]["held"] == second[rev.name]["resident"] < len(tree)
    assert tree_arm.prefix_cache(harness).layers[harness.layers[0]].keys.shape[2] == len(tree)
    third = session.add(TURNS[2])
    # turn 3 keeps tokens the tree no longer holds (dropped at turn 1): every logical token competed
    new = set(range(140, 156))
    back = set(tree_arm.resident.tolist()) - set(tree) - new
    assert back and third[tree_arm.name]["resident"] == len(tree_arm.resident)
    assert first[tree_arm.name] == first[rev.name]


def test_the_carry_mode_prefills_over_the_tree_and_what_the_previous_turn_restored(harness):
    modes = (probe.TREE, probe.CARRY)
    arms = probe.make_arms({"snapkv": make_policy("snapkv")}, [Budget(fraction=0.25)], modes)
    session, (tree_arm, carry) = probe.Session(harness, arms), arms
    session.add(TURNS[0])
    kept_first = set(carry.resident.tolist())
    second = session.add(TURNS[1])
    assert torch.equal(carry.resident, tree_arm.resident)  # same prefix and candidates at turn 2
    tree = kept_first | {t for t in carry.resident.tolist() if t >= 120}
    restored = set(carry.resident.tolist()) - kept_first - set(range(120, 140))
    assert restored and carry.tree.tolist() == sorted(tree) == tree_arm.prefix.tolist()
    assert carry.prefix.tolist() == sorted(tree | restored)
    assert second[carry.name]["held"] == len(tree | restored) > second[tree_arm.name]["held"] == len(tree)
    cache = carry.prefix_cache(harness).layers[harness.layers[0]]
    k, _ = carry.store[0]
    assert torch.equal(cache.keys, k[:, :, carry.prefix])  # the restored tokens' original keys
    session.add(TURNS[2])
    assert set(carry.tree.tolist()) == tree | {t for t in carry.resident.tolist() if t >= 140}
