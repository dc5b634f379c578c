from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_same_run, read_losses
from safetensors.torch import load_file

from balcony_cli.checkpoint import CONFIG_NAME, WEIGHTS_NAME, load_balcony
from balcony_cli.data import build_splits, resolve_data
from balcony_cli.errors import BadInputError
from balcony_cli.recipe import Recipe
from balcony_cli.train import METRICS, RECIPE_FILE, SUMMARY, TrainRequest, train


def tiny_recipe(corpus_dir, eval_text=None, **changes) -> Recipe:
    settings = dict(
        exits=[1, 3],
        data=str(corpus_dir),
        seq_len=32,
        batch_size=2,
        max_steps=6,
        lr=1e-2,
        warmup_ratio=0.2,
        loss_chunk_tokens=16,
        val_blocks=4,
        eval_every=3,
        save_every=3,
        log_every=1,
        eval_text=str(eval_text) if eval_text else None,
        ppl_tokens=400,
        ppl_window=50,
    )
    settings.update(changes)
    return Recipe(**settings)


class StopAt:
    """A progress display that raises at one step, like a run killed between checkpoints."""

    def __init__(self, step: int) -> None:
        self.step = step

    def start(self, total_steps, completed_steps):
        pass

    def update(self, step, metrics):
        if step == self.step:
            raise KeyboardInterrupt

    def stop(self):
        pass


@pytest.fixture
def eval_text(tmp_path):
    path = tmp_path / "eval.txt"
    path.write_text("A quick brown fox jumps over the lazy dog.\r\n" * 20)
    return path


def test_training_lowers_kl_and_writes_outputs(tiny_model_dir, corpus_dir, eval_text, tmp_path):
    output = tmp_path / "run"
    recipe = tiny_recipe(corpus_dir, eval_text, max_steps=12, eval_every=6)
    result = train(TrainRequest(model=str(tiny_model_dir), recipe=recipe, output_dir=output))

    for name in (CONFIG_NAME, WEIGHTS_NAME, RECIPE_FILE, METRICS, SUMMARY):
        assert (output / name).is_file(), name
    config = json.loads((output / CONFIG_NAME).read_text())
    assert config["trained"] is True
    assert config["training"]["steps"] == 12
    assert result.steps == 12
    assert result.train_tokens == 12 * 2 * 32

    records = [json.loads(line) for line in (output / METRICS).read_text().splitlines()]
    validations = [r for r in records if r.get("split") == "validation"]
    assert [r["step"] for r in validations] == [6, 12]
    steps = [r for r in records if "loss" in r]
    assert steps[-1]["loss"] < steps[0]["loss"]

    # The exits moved towards the full model on the held-out blocks: compare with untrained exits.
    from conftest import char_tokenizer

    from balcony_cli.loading import load_base_model, resolve_model
    from balcony_cli.model import BalconyModel
    from balcony_cli.train import validate

    _, val_blocks = build_splits(resolve_data(str(corpus_dir)), char_tokenizer(), 32, 4, seed=0)
    untrained = BalconyModel(load_base_model(resolve_model(str(tiny_model_dir))), [1, 3])
    before = validate(untrained, val_blocks, recipe, batch_size=2)
    for k in (1, 3):
        assert validations[-1]["kl"][str(k)] < before["kl"][k]

    assert result.after.exits[1] != result.before.exits[1]
    assert result.before.full is not None
    assert set(result.before.naive) == {1, 3}
    assert result.teacher_tokens_per_s > 0

    model, _ = load_balcony(output)
    assert model.exits == [1, 3]


def test_interrupted_run_resumes_to_same_curve(tiny_model_dir, corpus_dir, tmp_path):
    recipe = tiny_recipe(corpus_dir)
    straight = tmp_path / "straight"
    train(TrainRequest(model=str(tiny_model_dir), recipe=recipe, output_dir=straight, perplexity=False))

    resumed = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        train(
            TrainRequest(model=str(tiny_model_dir), recipe=recipe, output_dir=resumed, perplexity=False),
            progress=StopAt(5),
        )
    assert (resumed / "checkpoints" / "latest").read_text() == "step-0000003"
    assert not (resumed / WEIGHTS_NAME).exists()
    train(
        TrainRequest(model=str(tiny_model_dir), recipe=recipe, output_dir=resumed, resume=True, perplexity=False)
    )

    assert [step for step, _ in read_losses(resumed)] == [1, 2, 3, 4, 5, 6]
    assert_same_run(straight, resumed)


def test_resume_with_changed_recipe_rejected(tiny_model_dir, corpus_dir, tmp_path):
    output = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(
            TrainRequest(model=str(tiny_model_dir), recipe=tiny_recipe(corpus_dir), output_dir=output, perplexity=False),
            progress=StopAt(4),
        )
    changed = tiny_recipe(corpus_dir, lr=0.5)
    with pytest.raises(BadInputError, match="lr"):
        train(TrainRequest(model=str(tiny_model_dir), recipe=changed, output_dir=output, resume=True))


def test_blocks_are_packed_and_held_out(tmp_path):
    import random

    from conftest import char_tokenizer

    # Random letters, so that no two blocks share content and overlap would be visible.
    generator = random.Random(0)
    corpus_dir = tmp_path / "random"
    corpus_dir.mkdir()
    for name in ("a.txt", "b.txt"):
        (corpus_dir / name).write_text("".join(generator.choice("abcdefghij ") for _ in range(3000)))
    tokenizer = char_tokenizer()
    train_blocks, val_blocks = build_splits(resolve_data(str(corpus_dir)), tokenizer, 32, 4, seed=0)
    total_chars = sum(len(p.read_text()) + 1 for p in corpus_dir.iterdir())  # +1: EOS per file
    assert len(train_blocks) + len(val_blocks) == total_chars // 32
    assert len(val_blocks) == 4
    assert train_blocks[0]["input_ids"].shape == (32,)
    train_rows = {tuple(row.tolist()) for row in train_blocks["input_ids"]}
    assert not any(tuple(row.tolist()) in train_rows for row in val_blocks["input_ids"])


def test_jsonl_data_with_text_field(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"body": "hello world " * 20}) + "\n" for _ in range(10)))
    from conftest import char_tokenizer

    train_blocks, _ = build_splits(resolve_data(str(path)), char_tokenizer(), 16, 2, seed=0, text_field="body")
    assert len(train_blocks) > 0
    with pytest.raises(BadInputError, match="no column 'text'"):
        build_splits(resolve_data(str(path)), char_tokenizer(), 16, 2, seed=0)


def test_bf16_training_runs(tiny_model_dir, corpus_dir, tmp_path):
    output = tmp_path / "run"
    recipe = tiny_recipe(corpus_dir, precision="bf16", max_steps=2, eval_every=0, save_every=0)
    result = train(TrainRequest(model=str(tiny_model_dir), recipe=recipe, output_dir=output, perplexity=False))
    assert result.steps == 2
    losses = read_losses(output)
    assert all(0 < loss < 100 for _, loss in losses)
    weights = load_file(str(output / WEIGHTS_NAME))
    assert all(tensor.dtype == torch.float32 for tensor in weights.values())


def test_finished_run_extends_with_larger_max_steps(tiny_model_dir, corpus_dir, tmp_path):
    output = tmp_path / "run"
    recipe = tiny_recipe(corpus_dir, max_steps=4, save_every=0, eval_every=0)
    train(TrainRequest(model=str(tiny_model_dir), recipe=recipe, output_dir=output, perplexity=False))
    finished = load_file(str(output / WEIGHTS_NAME))

    with pytest.raises(BadInputError, match="already reached step 4"):
        train(TrainRequest(model=str(tiny_model_dir), recipe=recipe, output_dir=output, resume=True))
    assert torch.equal(load_file(str(output / WEIGHTS_NAME))["exit_norms.1.weight"], finished["exit_norms.1.weight"])

    longer = tiny_recipe(corpus_dir, max_steps=6, save_every=0, eval_every=0)
    result = train(TrainRequest(model=str(tiny_model_dir), recipe=longer, output_dir=output, resume=True,
                                perplexity=False))
    assert result.steps == 6
    assert [step for step, _ in read_losses(output)] == [1, 2, 3, 4, 5, 6]
    assert "max_steps: 6" in (output / RECIPE_FILE).read_text()


def test_resume_and_overwrite_conflict(tiny_model_dir, corpus_dir, tmp_path):
    output = tmp_path / "run"
    with pytest.raises(BadInputError, match="contradict"):
        train(TrainRequest(model=str(tiny_model_dir), recipe=tiny_recipe(corpus_dir), output_dir=output,
                           resume=True, overwrite=True))
    assert not output.exists()


def test_refused_resume_writes_nothing(tiny_model_dir, corpus_dir, tmp_path):
    output = tmp_path / "run"
    recipe = tiny_recipe(corpus_dir, max_steps=4, save_every=0, eval_every=0)
    train(TrainRequest(model=str(tiny_model_dir), recipe=recipe, output_dir=output, perplexity=False))
    before = {p.name: p.read_bytes() for p in output.iterdir() if p.is_file()}
    shorter = tiny_recipe(corpus_dir, max_steps=2, save_every=0, eval_every=0)
    with pytest.raises(BadInputError, match="already reached step 4"):
        train(TrainRequest(model=str(tiny_model_dir), recipe=shorter, output_dir=output, resume=True))
    after = {p.name: p.read_bytes() for p in output.iterdir() if p.is_file()}
    assert after == before


def test_resume_finishes_run_killed_after_last_step(tiny_model_dir, corpus_dir, tmp_path):
    output = tmp_path / "run"
    recipe = tiny_recipe(corpus_dir, max_steps=4, save_every=0, eval_every=0)
    train(TrainRequest(model=str(tiny_model_dir), recipe=recipe, output_dir=output, perplexity=False))
    finished = load_file(str(output / WEIGHTS_NAME))
    # A kill during the final phase leaves the last-step checkpoint but no final outputs.
    (output / SUMMARY).unlink()
    (output / WEIGHTS_NAME).unlink()
    result = train(TrainRequest(model=str(tiny_model_dir), recipe=recipe, output_dir=output, resume=True,
                                perplexity=False))
    assert result.steps == 4
    assert (output / SUMMARY).is_file()
    for name, tensor in finished.items():
        assert torch.equal(load_file(str(output / WEIGHTS_NAME))[name], tensor)


def test_damaged_training_checkpoint_named(tiny_model_dir, corpus_dir, tmp_path):
    output = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(TrainRequest(model=str(tiny_model_dir), recipe=tiny_recipe(corpus_dir), output_dir=output,
                           perplexity=False), progress=StopAt(5))
    trainer = output / "checkpoints" / "step-0000003" / "trainer.pt"
    trainer.write_bytes(trainer.read_bytes()[:50])
    with pytest.raises(BadInputError, match="step-0000003 cannot be read"):
        train(TrainRequest(model=str(tiny_model_dir), recipe=tiny_recipe(corpus_dir), output_dir=output,
                           resume=True, perplexity=False))


def test_resume_before_first_checkpoint_suggests_overwrite(tiny_model_dir, corpus_dir, tmp_path):
    output = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(TrainRequest(model=str(tiny_model_dir), recipe=tiny_recipe(corpus_dir), output_dir=output,
                           perplexity=False), progress=StopAt(1))
    with pytest.raises(BadInputError, match="--overwrite"):
        train(TrainRequest(model=str(tiny_model_dir), recipe=tiny_recipe(corpus_dir), output_dir=output,
                           resume=True, perplexity=False))
