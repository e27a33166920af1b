"""Judge Q training on tiny random models: the loss falls, only the soft tokens change, files round-trip, CLI errors."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tiny_models import tiny_llama

from sgl_evict import Budget, make_policy
from sgl_evict.cli import main
from sgl_evict.harness import EvictionHarness
from sgl_evict.judgeq_train import (
    TRAIN_SEED_BASE,
    TrainConfig,
    attention_kl,
    build_example,
    freeze,
    initial_soft_tokens,
    soft_token_attention,
    train_soft_tokens,
)
from sgl_evict.soft_tokens import SoftTokens


@pytest.fixture(scope="module")
def trained():
    """A tiny Llama, 4 examples, and 20 training steps of 8 soft tokens."""
    model = tiny_llama()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    freeze(model)
    harness = EvictionHarness(model, window=8, sinks=2)
    gen = torch.Generator().manual_seed(1)
    examples = [build_example(harness, harness.prefill(torch.randint(0, 200, (1, 48), generator=gen)),
                              torch.randint(0, 200, (6,), generator=gen).tolist()) for _ in range(4)]
    init = initial_soft_tokens(model, 8, seed=0)
    result = train_soft_tokens(harness, examples, init, steps=20, lr=3e-2, seed=0)
    return model, harness, examples, init, result, before


def test_targets_are_distributions_over_the_context(trained):
    _, harness, examples, init, _, _ = trained
    for ex in examples:
        assert ex.target.shape == (len(harness.layers), 2, 48)
        assert torch.allclose(ex.target.sum(-1), torch.ones(len(harness.layers), 2), atol=1e-5)
    predicted = soft_token_attention(harness, examples[0], init)
    assert predicted.shape == examples[0].target.shape
    assert attention_kl(examples[0].target, examples[0].target).item() == pytest.approx(0.0, abs=1e-6)
    assert attention_kl(examples[0].target, predicted).item() > 0


def test_training_lowers_the_loss_on_the_same_examples(trained):
    _, _, _, _, result, _ = trained
    assert len(result.losses) == 20
    assert result.final_loss < 0.8 * result.initial_loss


def test_training_is_seeded(trained):
    _, harness, examples, init, result, _ = trained
    again = train_soft_tokens(harness, examples, init, steps=20, lr=3e-2, seed=0)
    assert torch.equal(again.embeddings, result.embeddings)


def test_only_the_soft_tokens_change(trained):
    model, _, _, init, result, before = trained
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
        assert not p.requires_grad
    assert not torch.equal(result.embeddings, init)
    assert torch.equal(init, initial_soft_tokens(model, 8, seed=0))  # the initial vectors are not trained in place


def test_trained_file_round_trips_and_runs_the_judgeq_policy(trained, tmp_path):
    _, harness, _, _, result, _ = trained
    path = tmp_path / "soft.safetensors"
    SoftTokens(result.embeddings, harness.fingerprint(), {"training": json.dumps({"steps": 20})}).save(path)
    loaded = SoftTokens.load(path, expect_fingerprint=harness.fingerprint())
    assert torch.equal(loaded.embeddings, result.embeddings)
    assert json.loads(loaded.metadata["training"]) == {"steps": 20}
    state = harness.prefill(torch.randint(0, 200, (1, 40), generator=torch.Generator().manual_seed(5)))
    res = harness.generate(state, make_policy("judgeq", soft_tokens_path=str(path)), Budget(fraction=0.3),
                           max_new_tokens=3)
    assert res.kept_tokens == [Budget(fraction=0.3).num_tokens(40)] * len(harness.layers)


def test_loading_into_another_model_is_a_clear_error(trained, tmp_path):
    _, harness, _, _, result, _ = trained
    path = tmp_path / "soft.safetensors"
    SoftTokens(result.embeddings, harness.fingerprint()).save(path)
    other = EvictionHarness(tiny_llama(hidden_size=32, seed=3), window=8, sinks=2)
    assert other.fingerprint() != harness.fingerprint()
    with pytest.raises(ValueError, match="trained for model fingerprint"):
        SoftTokens.load(path, expect_fingerprint=other.fingerprint())
    state = other.prefill(torch.randint(0, 200, (1, 40), generator=torch.Generator().manual_seed(5)))
    with pytest.raises(ValueError, match="train soft tokens for this model with `sgl-evict train-judgeq`"):
        other.generate(state, make_policy("judgeq", soft_tokens_path=str(path)), Budget(fraction=0.3))


def test_training_seeds_differ_from_eval_seeds():
    seeds = TrainConfig(examples=5, seed=0).sample_seeds()
    assert len(set(seeds)) == 5 and min(seeds) >= TRAIN_SEED_BASE


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "steps must be >= 1, got 0"),
    (["--soft-tokens", "0"], "soft tokens must be >= 1"),
    (["--tasks", "niah_single,haystack"], "unknown task 'haystack'"),
    (["--lr", "-1"], "learning rate must be > 0"),
    (["--model", "/nonexistent/checkpoint"], "--model: '/nonexistent/checkpoint' is neither"),
])
def test_cli_bad_arguments_exit_with_a_message(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train-judgeq", "--out", str(tmp_path / "s.safetensors"), *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"sgl-evict train-judgeq: error: {message}" in err
    assert "Traceback" not in err


def test_cli_trains_and_eval_runs_judgeq_with_the_file(checkpoint, tmp_path, capsys):
    out = tmp_path / "judgeq.safetensors"
    code = main(["train-judgeq", "--model", str(checkpoint), "--out", str(out), "--steps", "4", "--soft-tokens", "4",
                 "--context", "120", "--examples", "2", "--tasks", "niah_single,kv_retrieval", "--answer", "greedy",
                 "--answer-tokens", "4", "--dtype", "bfloat16", "--no-progress"])
    assert code == 0
    assert "loss" in capsys.readouterr().out
    soft = SoftTokens.load(out)
    assert soft.embeddings.shape == (4, 32)
    training = json.loads(soft.metadata["training"])
    assert training["steps"] == 4 and training["tasks"] == ["niah_single", "kv_retrieval"]
    assert training["sample_seeds"][0] >= TRAIN_SEED_BASE
    assert soft.metadata["command"].startswith("sgl-evict train-judgeq")
    # eval loads the model in float32: the fingerprint must not depend on the training dtype
    code = main(["eval", "--model", str(checkpoint), "--tasks", "niah_single", "--context", "120", "--samples", "1",
                 "--policies", "judgeq", "--soft-tokens", str(out), "--budgets", "0.5", "--window", "8",
                 "--max-new-tokens", "2", "--fidelity-tokens", "2", "--out", str(tmp_path / "r.json"),
                 "--plot", str(tmp_path / "r.png"), "--no-progress"])
    assert code == 0
    doc = json.loads((tmp_path / "r.json").read_text())
    assert {r["policy"] for r in doc["records"]} == {"full", "judgeq"}
