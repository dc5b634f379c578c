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
from balcony_cli.train import METRICS, RECIPE_FILE, SUMMARY, TrainRequest, auto_precision, train


def tiny_recipe(corpus_dir, eval_text=None, **changes) -> Recipe:
    settings = dict(
        exits=[1, 3],
        # Fixed here, not left to the defaults: the tests below are written for copy-last's start far
        # from the full model, and for fp32 whatever the machine's bf16 support.
        init="copy-last",
        precision="fp32",
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


@pytest.mark.parametrize(
    ("avx512_bf16", "amx", "expected"), [(True, False, "bf16"), (False, True, "bf16"), (False, False, "fp32")]
)
def test_auto_precision_follows_cpu_support(monkeypatch, avx512_bf16, amx, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    assert auto_precision() == expected


def test_auto_precision_falls_back_to_fp32(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    assert auto_precision() == "fp32"


@pytest.mark.parametrize(("use_cpu", "expected"), [(None, "bf16"), ("false", "bf16"), ("true", "fp32")])
def test_auto_precision_on_bf16_gpu(monkeypatch, use_cpu, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    if use_cpu is None:
        monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    else:
        monkeypatch.setenv("ACCELERATE_USE_CPU", use_cpu)
    # With ACCELERATE_USE_CPU set, accelerate trains on the CPU, whose bf16 support decides.
    assert auto_precision() == expected


def test_auto_precision_kept_on_resume(tiny_model_dir, corpus_dir, tmp_path, monkeypatch):
    output = tmp_path / "run"
    monkeypatch.setattr("balcony_cli.train.auto_precision", lambda: "bf16")
    recipe = tiny_recipe(corpus_dir, precision="auto", max_steps=2, save_every=1, eval_every=0)
    train(TrainRequest(model=str(tiny_model_dir), recipe=recipe, output_dir=output, perplexity=False))
    assert "precision: bf16" in (output / RECIPE_FILE).read_text()

    # On a machine without bf16, the resumed run goes on in the precision it started with.
    monkeypatch.setattr("balcony_cli.train.auto_precision", lambda: "fp32")
    longer = tiny_recipe(corpus_dir, precision="auto", max_steps=3, save_every=1, eval_every=0)
    result = train(TrainRequest(model=str(tiny_model_dir), recipe=longer, output_dir=output, resume=True,
                                perplexity=False))
    assert result.steps == 3
    assert "precision: bf16" in (output / RECIPE_FILE).read_text()


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


def read_records(directory) -> list[dict]:
    return [json.loads(line) for line in (directory / METRICS).read_text().splitlines()]


class FakeClock:
    """A perf_counter that moves on by a fixed number of seconds at each reading, whatever the load."""

    def __init__(self, seconds_per_reading: float) -> None:
        self.now = 0.0
        self.seconds_per_reading = seconds_per_reading

    def perf_counter(self) -> float:
        self.now += self.seconds_per_reading
        return self.now


def test_max_minutes_stops_and_saves(tiny_model_dir, corpus_dir, tmp_path, monkeypatch):
    output = tmp_path / "run"
    # The trainer reads its clock a few times per step, so 1.2 s last a handful of steps on any machine.
    monkeypatch.setattr("balcony_cli.train.time", FakeClock(0.05))
    recipe = tiny_recipe(corpus_dir, max_steps=10_000, max_minutes=0.02, eval_every=0, save_every=0)
    result = train(TrainRequest(model=str(tiny_model_dir), recipe=recipe, output_dir=output, perplexity=False))

    assert 3 <= result.steps < 30
    assert result.stopped_by == "max_minutes"
    assert result.train_seconds >= 1.2
    assert (output / "checkpoints" / "latest").read_text() == f"step-{result.steps:07d}"
    summary = json.loads((output / SUMMARY).read_text())
    assert summary["steps"] == result.steps
    assert summary["stopped_by"] == "max_minutes"
    steps = [r for r in read_records(output) if "loss" in r]
    assert steps[-1]["step"] == result.steps
    # The time schedule ends at a learning rate of zero, as the step schedule does at max_steps.
    assert steps[-1]["lr"] == 0.0
    assert max(r["lr"] for r in steps) > 0

    with pytest.raises(BadInputError, match="already trained for"):
        train(TrainRequest(model=str(tiny_model_dir), recipe=recipe, output_dir=output, resume=True))
    monkeypatch.setattr("balcony_cli.train.time", FakeClock(0.05))
    longer = tiny_recipe(corpus_dir, max_steps=10_000, max_minutes=0.03, eval_every=0, save_every=0)
    extended = train(TrainRequest(model=str(tiny_model_dir), recipe=longer, output_dir=output, resume=True,
                                  perplexity=False))
    assert extended.steps > result.steps
    assert extended.train_seconds >= 1.8


def test_resume_rejects_switching_to_time_budget(tiny_model_dir, corpus_dir, tmp_path):
    output = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(TrainRequest(model=str(tiny_model_dir), recipe=tiny_recipe(corpus_dir), output_dir=output,
                           perplexity=False), progress=StopAt(4))
    with pytest.raises(BadInputError, match="max_minutes"):
        train(TrainRequest(model=str(tiny_model_dir), recipe=tiny_recipe(corpus_dir, max_minutes=1.0),
                           output_dir=output, resume=True, perplexity=False))


def test_fit_init_records_preparation(tiny_model_dir, corpus_dir, tmp_path):
    output = tmp_path / "run"
    recipe = tiny_recipe(corpus_dir, init="fit", fit_blocks=8, max_steps=2, eval_every=0, save_every=0,
                         eval_at_start=True)
    result = train(TrainRequest(model=str(tiny_model_dir), recipe=recipe, output_dir=output, perplexity=False))
    fit = result.preparation["init_fit"]
    assert fit["seconds"] > 0
    assert fit["blocks"] == 8
    assert fit["exits"]["1"]["relative_error_after"] < fit["exits"]["1"]["relative_error_before"]
    # Exit 3 of 4 layers starts as a copy of layer 4 in layer 4's place: the full model, with no error to fit.
    assert fit["exits"]["3"]["relative_error_before"] == pytest.approx(0.0, abs=1e-9)
    assert result.preparation_seconds == fit["seconds"]
    summary = json.loads((output / SUMMARY).read_text())
    assert summary["preparation"]["init_fit"]["seconds"] == fit["seconds"]
    assert json.loads((output / "preparation.json").read_text()) == result.preparation
    validations = [r for r in read_records(output) if r.get("split") == "validation"]
    assert [r["step"] for r in validations] == [0, 2]
    assert validations[0]["train_tokens"] == 0
    assert validations[1]["train_tokens"] == 2 * 2 * 32


def test_validation_reports_kl_entropy_and_calibration(tiny_model_dir, corpus_dir, tmp_path):
    output = tmp_path / "run"
    recipe = tiny_recipe(corpus_dir, hidden_loss_weight=0.5, temperature=2.0, max_steps=2, eval_every=2,
                         save_every=0)
    result = train(TrainRequest(model=str(tiny_model_dir), recipe=recipe, output_dir=output, perplexity=False))
    validation = result.validation
    for key in ("kl", "hidden_mse", "perplexity", "entropy", "ece"):
        assert set(validation[key]) == {1, 3}, key
    assert 0 <= validation["ece"][1] <= 1
    # A near-uniform random model over 100 tokens predicts with entropy close to ln 100 = 4.6 nats.
    assert 3.5 < validation["full_entropy"] < 4.61

    # Validation KL uses temperature 1, whatever the training temperature.
    from conftest import char_tokenizer

    from balcony_cli.checkpoint import load_balcony

    model, _ = load_balcony(output)
    _, val_blocks = build_splits(resolve_data(str(corpus_dir)), char_tokenizer(), 32, 4, seed=0)
    with torch.no_grad():
        out = model.forward_all(val_blocks[:4]["input_ids"], loss_temperature=1.0)
    assert validation["kl"][1] == pytest.approx(out.kl[0].item(), rel=1e-4)

    steps = [r for r in read_records(output) if "loss" in r]
    assert set(steps[-1]["hidden_mse"]) == {"1", "3"}
    # The logged loss is the KL at the training temperature plus half the hidden-state error, summed over exits.
    expected = sum(steps[-1]["kl"][k] + 0.5 * steps[-1]["hidden_mse"][k] for k in ("1", "3"))
    assert steps[-1]["loss"] == pytest.approx(expected, rel=1e-5)


def test_data_mix_trains_on_both_sources(tiny_model_dir, corpus_dir, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "c.txt").write_text("Once upon a time a cat sat on a mat.\n" * 80)
    output = tmp_path / "run"
    recipe = tiny_recipe(None, data=None, data_mix={str(corpus_dir): 1.0, str(other): 2.0}, max_steps=2,
                         eval_every=0, save_every=0)
    result = train(TrainRequest(model=str(tiny_model_dir), recipe=recipe, output_dir=output, perplexity=False))
    assert result.steps == 2
    data = json.loads((output / CONFIG_NAME).read_text())["training"]["data"]
    assert str(corpus_dir) in data
    assert str(other) in data


def test_self_generated_tokens_train_on_samples(tiny_model_dir, corpus_dir, tmp_path):
    from balcony_cli.selfgen import GENERATED_FILE

    output = tmp_path / "run"
    recipe = tiny_recipe(corpus_dir, self_generated_tokens=400, self_generated_new_tokens=40, max_steps=2,
                         eval_every=0, save_every=0, val_blocks=1)
    result = train(TrainRequest(model=str(tiny_model_dir), recipe=recipe, output_dir=output, perplexity=False))
    generated = output / "self-generated" / GENERATED_FILE
    assert generated.is_file()
    assert result.preparation["self_generated"]["generated_tokens"] >= 400
    assert result.preparation["self_generated"]["seconds"] > 0
    training = json.loads((output / CONFIG_NAME).read_text())["training"]
    assert training["data"] == str(generated)


def test_bf16_autocast_covers_teacher_and_exits():
    """Under the trainer's accelerate setup on CPU, the teacher's and the exits' matmuls run in bf16."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from conftest import VOCAB, tiny_model

    from balcony_cli.model import BalconyModel

    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(mixed_precision="bf16", cpu=True)
    model = accelerator.prepare(BalconyModel(tiny_model("llama"), [1, 2]))
    core = accelerator.unwrap_model(model)
    dtypes = {}
    probes = {"teacher layer 4": core.base.model.layers[3].mlp.down_proj,
              "exit 2 layer": core.exit_layers["2"].mlp.down_proj}
    handles = [module.register_forward_hook(lambda m, args, out, name=name: dtypes.__setitem__(name, out.dtype))
               for name, module in probes.items()]
    try:
        out = model(torch.randint(0, VOCAB, (2, 8)), exit="all", loss_temperature=1.0)
    finally:
        for handle in handles:
            handle.remove()
        AcceleratorState._reset_state(reset_partial_state=False)
    assert dtypes == {"teacher layer 4": torch.bfloat16, "exit 2 layer": torch.bfloat16}
    assert out.losses.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in core.balcony_parameters())
