"""Self-distillation training of the Balcony layers, through accelerate, with resumable checkpoints."""

from __future__ import annotations

import json
import logging
import math
import os

import random
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from safetensors.torch import save_file

from balcony_cli.architectures import layout_for
from balcony_cli.checkpoint import (
    atomic_directory,
    atomic_write_bytes,
    atomic_write_json,
    balcony_config,
    check_output_dir,
    fingerprint_weights,
    load_balcony_weights,
    save_balcony,
)
from balcony_cli.data import (
    DataMixture,
    DataSource,
    build_mixture_splits,
    build_splits,
    load_text_dataset,
    resolve_data,
    resolve_mixture,
)
from balcony_cli.init_fit import calibration_blocks, fit_exits
from balcony_cli.errors import BadInputError
from balcony_cli.loading import check_decoder_only, load_base_model, load_config, load_tokenizer, resolve_model
from balcony_cli.model import BalconyModel, parse_exits
from balcony_cli.perplexity import (
    PerplexityTable,
    PredictionStatistics,
    default_eval_text,
    perplexity_table,
    perplexity_windows,
    read_eval_text,
)
from balcony_cli.recipe import Recipe
from balcony_cli.schedule import TimeBudgetSchedule
from balcony_cli.selfgen import GENERATED_FILE, GenerationSettings, generate_to_directory, read_generation

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
LATEST = "latest"
METRICS = "metrics.jsonl"
RECIPE_FILE = "recipe.yaml"
SUMMARY = "train_summary.json"
TABLE_BEFORE = "perplexity_before.json"
PREPARATION = "preparation.json"
SELF_GENERATED_DIR = "self-generated"
# Prompts sampled together when generating training text. A larger batch spreads the fixed cost of a
# decode step: on a busy 2-core CPU, SmolLM2-135M sampled 1.6 times as many tokens/s at 16 as at 8.
SELF_GENERATED_BATCH = 16
# Recipe fields that may differ between a run and its resumption.
RESUMABLE_CHANGES = {
    "max_steps", "max_minutes", "eval_every", "save_every", "log_every", "notes", "eval_text", "ppl_tokens",
}


class Progress(Protocol):
    """Progress display interface for the trainer; the CLI passes a rich progress bar on terminals."""

    def start(self, total_steps: int, completed_steps: int) -> None: ...

    def update(self, step: int, metrics: dict[str, Any]) -> None: ...

    def stop(self) -> None: ...


class NoProgress:
    def start(self, total_steps: int, completed_steps: int) -> None:
        pass

    def update(self, step: int, metrics: dict[str, Any]) -> None:
        pass

    def stop(self) -> None:
        pass


@dataclass
class TrainRequest:
    model: str
    recipe: Recipe
    output_dir: Path = Path("balcony-out")
    resume: bool = False
    overwrite: bool = False
    perplexity: bool = True
    """Compute the before/after perplexity table on the eval text (skipped when no eval text is found)."""
    allow_base_mismatch: bool = False
    """On --resume, continue even if the base weights differ from the ones the run started with."""


@dataclass
class TrainResult:
    output_dir: Path
    exits: list[int]
    num_layers: int
    steps: int
    train_tokens: int
    train_tokens_per_s: float
    teacher_tokens_per_s: float
    elapsed_s: float
    eval_text: str | None
    before: PerplexityTable | None
    after: PerplexityTable | None
    validation: dict[str, Any] = field(default_factory=dict)
    base_fingerprint: str = ""
    train_seconds: float = 0.0
    """Seconds spent in optimiser steps: what max_minutes limits."""
    stopped_by: str = "max_steps"
    """Why training stopped: "max_steps" or "max_minutes"."""
    preparation: dict[str, Any] = field(default_factory=dict)
    """Work done before the first step and its seconds: self-generated data, the fit initialisation."""
    is_main_process: bool = True
    """False on the other ranks of a multi-process run, whose results the CLI does not print."""

    @property
    def preparation_seconds(self) -> float:
        return sum(part["seconds"] for part in self.preparation.values())

    def to_dict(self) -> dict[str, Any]:
        def table(t: PerplexityTable | None):
            if t is None:
                return None
            return {"tokens": t.tokens, "full": t.full, "naive": t.naive, "exits": t.exits}

        return {
            "output_dir": str(self.output_dir),
            "exits": self.exits,
            "num_layers": self.num_layers,
            "steps": self.steps,
            "train_tokens": self.train_tokens,
            "train_tokens_per_s": self.train_tokens_per_s,
            "teacher_tokens_per_s": self.teacher_tokens_per_s,
            "elapsed_s": self.elapsed_s,
            "eval_text": self.eval_text,
            "perplexity_before": table(self.before),
            "perplexity_after": table(self.after),
            "validation": self.validation,
            "base_fingerprint": self.base_fingerprint,
            "train_seconds": self.train_seconds,
            "stopped_by": self.stopped_by,
            "preparation": self.preparation,
            "preparation_seconds": self.preparation_seconds,
        }


def _write_table_before(output_dir: Path, table: PerplexityTable) -> None:
    atomic_write_json(
        output_dir / TABLE_BEFORE,
        {"tokens": table.tokens, "full": table.full, "naive": table.naive, "exits": table.exits},
    )


def _table_from_dict(document: dict | None) -> PerplexityTable | None:
    if document is None:
        return None
    return PerplexityTable(
        tokens=document["tokens"],
        full=document["full"],
        naive={int(k): v for k, v in document["naive"].items()},
        exits={int(k): v for k, v in document["exits"].items()},
    )


# Validation and throughput.


@torch.no_grad()
def validate(model: BalconyModel, blocks, recipe: Recipe, batch_size: int) -> dict[str, Any]:
    """Score each exit and the full model on held-out blocks.

    Per exit: mean KL(full || exit) at temperature 1 whatever the training temperature (so that runs
    compare), mean squared error of the hidden state against the full model's, perplexity, mean entropy
    of the predicted distribution, and the expected calibration error of its top-1 next-token guess.
    The full model gets the last three too.
    """
    was_training = model.training
    model.eval()
    device = next(model.base.parameters()).device
    kl_sums = dict.fromkeys(model.exits, 0.0)
    mse_sums = dict.fromkeys(model.exits, 0.0)
    statistics = {k: PredictionStatistics() for k in model.exits}
    full_statistics = PredictionStatistics()
    batches = 0
    for start in range(0, len(blocks), batch_size):
        input_ids = blocks[start : start + batch_size]["input_ids"].to(device)  # (batch, seq)
        out = model.forward_all(
            input_ids, loss_temperature=1.0, loss_chunk_tokens=recipe.loss_chunk_tokens, hidden_loss_weight=1.0
        )
        labels = input_ids[:, 1:]
        batches += input_ids.shape[0]
        full_statistics.add(model.head, out.full_hidden[:, :-1], labels)
        for index, k in enumerate(model.exits):
            kl_sums[k] += out.kl[index].item() * input_ids.shape[0]
            mse_sums[k] += out.hidden_mse[index].item() * input_ids.shape[0]
            statistics[k].add(model.head, out.exit_hidden[k][:, :-1], labels)
    model.train(was_training)
    return {
        "kl": {k: kl_sums[k] / batches for k in model.exits},
        "hidden_mse": {k: mse_sums[k] / batches for k in model.exits},
        "perplexity": {k: statistics[k].perplexity for k in model.exits},
        "entropy": {k: statistics[k].mean_entropy for k in model.exits},
        "ece": {k: statistics[k].expected_calibration_error for k in model.exits},
        "full_perplexity": full_statistics.perplexity,
        "full_entropy": full_statistics.mean_entropy,
        "full_ece": full_statistics.expected_calibration_error,
    }


@torch.no_grad()
def teacher_tokens_per_second(model: BalconyModel, input_ids: torch.Tensor, repeats: int = 5, autocast=None) -> float:
    """Time a teacher-only forward pass (base body and head on every token) at the training shape.

    `autocast` is a context manager factory for the training precision, such as accelerator.autocast.
    """
    import contextlib

    body = model.layout.body(model.base)
    context = autocast or contextlib.nullcontext
    with context():
        model.head(body(input_ids=input_ids, use_cache=False).last_hidden_state)  # warm-up
        timings = []
        for _ in range(repeats):
            start = time.perf_counter()
            model.head(body(input_ids=input_ids, use_cache=False).last_hidden_state)
            timings.append(time.perf_counter() - start)
    return input_ids.numel() / float(np.median(timings))


# Checkpoints.


def _rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.random.get_rng_state(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.random.set_rng_state(state["torch"])


def build_optimizer(model: BalconyModel, recipe: Recipe) -> torch.optim.AdamW:
    """AdamW over the Balcony parameters only, so that the frozen base carries no optimiser state."""
    return torch.optim.AdamW(
        model.balcony_parameters(), lr=recipe.lr, betas=recipe.adam_betas, weight_decay=recipe.weight_decay
    )


def balcony_weights(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep the Balcony entries of a BalconyModel state dict, as contiguous CPU tensors."""
    return {
        name: tensor.detach().contiguous().cpu()
        for name, tensor in state_dict.items()
        if name.startswith(("exit_layers.", "exit_norms."))
    }


def save_training_checkpoint(output_dir: Path, weights: dict, optimizer, scheduler, state: dict) -> Path:
    """Write checkpoints/step-N atomically, then point checkpoints/latest at it and drop older ones.

    accelerate's save_state would also write the frozen base's weights on every save, so the trainer
    writes only the Balcony parameters, the optimiser and scheduler states, and the RNG states.
    """
    root = output_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{state['step']:07d}"
    with atomic_directory(root / name, overwrite=True) as directory:
        save_file(weights, str(directory / "balcony.safetensors"))
        torch.save(
            {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_state()},
            directory / "trainer.pt",
        )
        (directory / "state.json").write_text(json.dumps(state, indent=2))
    atomic_write_bytes(root / LATEST, name.encode())
    for old in root.glob("step-*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return root / name


def load_training_checkpoint(output_dir: Path, model: BalconyModel, optimizer, scheduler) -> dict:
    root = output_dir / CHECKPOINTS
    latest = root / LATEST
    if not latest.is_file():
        raise BadInputError(
            f"--resume: {str(output_dir)!r} has no checkpoint to resume from; start it again with --overwrite"
        )
    # A run killed during a save leaves its temporary files behind. They never replaced the
    # latest checkpoint, so deleting them loses nothing.
    for leftover in root.glob(".*.tmp"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
    directory = root / latest.read_text().strip()
    model.load_balcony_state_dict(load_balcony_weights(directory / "balcony.safetensors"))
    try:
        trainer = torch.load(directory / "trainer.pt", weights_only=False)
        state = json.loads((directory / "state.json").read_text())
    except (OSError, RuntimeError, EOFError, json.JSONDecodeError) as error:
        raise BadInputError(
            f"--resume: checkpoint {directory} cannot be read ({error}); it is damaged, so start the run "
            "again with --overwrite"
        ) from error
    optimizer.load_state_dict(trainer["optimizer"])
    scheduler.load_state_dict(trainer["scheduler"])
    _set_rng_state(trainer["rng"])
    return state


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines written after the checkpoint a resumed run starts from."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if record.get("step", 0) <= step:
            kept.append(line)
    atomic_write_bytes(path, ("\n".join(kept) + "\n").encode() if kept else b"")


def _read_saved_recipe(output_dir: Path) -> dict[str, Any]:
    """Read the recipe fields that the run in `output_dir` started with."""
    import yaml

    return yaml.safe_load((output_dir / RECIPE_FILE).read_text()) or {}


def _check_resumed_recipe(output_dir: Path, recipe: Recipe) -> None:
    saved = _read_saved_recipe(output_dir)
    current = recipe.to_dict()
    # A recipe saved before a field existed ran with that field's default.
    defaults = Recipe().to_dict()
    changed = sorted(k for k in current if k not in RESUMABLE_CHANGES and saved.get(k, defaults[k]) != current[k])
    if (saved.get("max_minutes") is None) != (recipe.max_minutes is None):
        # The schedule follows steps without max_minutes and time with it; one cannot continue the other.
        changed.append("max_minutes")
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in changed)
        raise BadInputError(
            f"--resume: the recipe differs from the one the run started with ({details}); resume with the "
            f"same settings (saved in {output_dir / RECIPE_FILE}) or start a new run with --overwrite"
        )


# Data and preparation.


def _build_blocks(data: DataSource | DataMixture, tokenizer, recipe: Recipe):
    """Pack the training text into (train, validation) blocks and check that one batch fits."""
    if isinstance(data, DataMixture):
        train_blocks, val_blocks = build_mixture_splits(
            data, tokenizer, recipe.seq_len, recipe.val_blocks, recipe.seed, recipe.text_field
        )
    else:
        train_blocks, val_blocks = build_splits(
            data, tokenizer, recipe.seq_len, recipe.val_blocks, recipe.seed, recipe.text_field
        )
    logger.info("data: %d training blocks of %d tokens", len(train_blocks), recipe.seq_len)
    if len(train_blocks) < recipe.batch_size:
        raise BadInputError(
            f"--batch-size {recipe.batch_size}: larger than the {len(train_blocks)} training blocks; lower it "
            "or add text"
        )
    return train_blocks, val_blocks


def _read_preparation(output_dir: Path) -> dict[str, Any]:
    path = output_dir / PREPARATION
    return json.loads(path.read_text()) if path.is_file() else {}


def _self_generated_data(base, tokenizer, prompt_texts, output_dir: Path, recipe: Recipe, prompts_from: str):
    """Sample the run's training text from the base model, or reuse what an earlier start of the run wrote."""
    directory = output_dir / SELF_GENERATED_DIR
    settings = GenerationSettings(
        tokens=recipe.self_generated_tokens,
        new_tokens=recipe.self_generated_new_tokens,
        batch_size=SELF_GENERATED_BATCH,
        seed=recipe.seed,
    )
    existing = read_generation(directory)
    if existing is not None and existing.settings == settings and existing.prompts_from == prompts_from:
        logger.info("reusing %d self-generated tokens from %s", existing.generated_tokens, directory)
        return existing
    logger.info("sampling %d tokens from the base model for training", settings.tokens)
    with atomic_directory(directory, overwrite=True) as temporary:
        result = generate_to_directory(base, tokenizer, prompt_texts, temporary, settings, prompts_from)
    result.path = directory / GENERATED_FILE
    return result


# The run.


def auto_precision() -> str:
    """Choose the precision for `precision: auto`: bf16 where this machine computes it natively, else fp32.

    On the 2-core AMD EPYC of the exit-learning study, which has avx512_bf16, bf16 autocast trained
    1.4 times the tokens per second of fp32 with a validation KL as low (docs/study/exit-learning.md).
    CPUs without bf16 instructions emulate it, and can be slower than fp32.
    """
    from accelerate.utils import parse_flag_from_env

    # ACCELERATE_USE_CPU makes accelerate train on the CPU of a machine that has a GPU.
    if torch.cuda.is_available() and not parse_flag_from_env("ACCELERATE_USE_CPU"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    # torch 2.13 has no public query for CPU bf16 support. These private ones are looked up with
    # getattr, so that a torch without them trains in fp32 instead of failing.
    for query in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        if getattr(torch.cpu, query, lambda: False)():
            return "bf16"
    return "fp32"


def _resolve_precision(request: TrainRequest) -> TrainRequest:
    """Replace `precision: auto` with the precision the run trains in, which the saved recipe records.

    A resumed run keeps the precision it started with, even on another machine.
    """
    if request.recipe.precision != "auto":
        return request
    output_dir = Path(request.output_dir)
    if request.resume and (output_dir / RECIPE_FILE).is_file():
        # A recipe saved before the precision field existed ran in fp32.
        precision = _read_saved_recipe(output_dir).get("precision", "fp32")
    else:
        precision = auto_precision()
    logger.info("precision auto: training in %s", precision)
    return replace(request, recipe=replace(request.recipe, precision=precision))


def _validate_request(request: TrainRequest):
    """Check everything that can be checked before loading weights, so bad input fails fast."""
    recipe = request.recipe
    if recipe.exits is None:
        raise BadInputError("--exits is missing: pass layer indices such as --exits 10,15,20, or a recipe with exits")
    if request.resume and request.overwrite:
        raise BadInputError(
            "--resume and --overwrite contradict each other: --resume continues the run in the output "
            "directory, --overwrite deletes it; pass one of them"
        )
    check_output_dir(request.output_dir, overwrite=request.overwrite, resume=request.resume)
    if request.resume and not (request.output_dir / RECIPE_FILE).is_file():
        raise BadInputError(
            f"--resume: {str(request.output_dir)!r} contains no training run; start the run without --resume"
        )
    if request.resume and not (request.output_dir / CHECKPOINTS / LATEST).is_file():
        raise BadInputError(
            f"--resume: the run in {str(request.output_dir)!r} stopped before its first checkpoint, so there is "
            "nothing to resume; start it again with --overwrite"
        )
    data = resolve_mixture(recipe.data_mix) if recipe.data_mix is not None else resolve_data(recipe.data)
    source = resolve_model(request.model)
    config = load_config(source)
    check_decoder_only(config)
    layout_for(config)
    parse_exits(recipe.exits, config.num_hidden_layers)
    eval_text = None
    if request.perplexity:
        eval_text = Path(recipe.eval_text) if recipe.eval_text else default_eval_text()
        if eval_text is not None:
            read_eval_text(eval_text)
    if request.resume:
        _check_resumed_recipe(request.output_dir, recipe)
    return source, data, eval_text


def train(request: TrainRequest, progress: Progress | None = None) -> TrainResult:
    """Train the Balcony layers of `request.model` by self-distillation and save them."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader, RandomSampler
    from transformers import get_cosine_schedule_with_warmup

    request = _resolve_precision(request)
    recipe = request.recipe
    output_dir = Path(request.output_dir)
    source, data_source, eval_text = _validate_request(request)

    mixed_precision = "bf16" if recipe.precision == "bf16" else "no"
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") != mixed_precision:
        # accelerate keeps one state per process and rejects a second Accelerator with another
        # precision. train() can run twice in one process (notebooks, tests), so drop the old
        # settings; the process group in PartialState is kept. _reset_state is private (accelerate 1.16).
        AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(gradient_accumulation_steps=recipe.grad_accum_steps, mixed_precision=mixed_precision)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.num_processes != launched:
        # accelerate 1.16 on a machine without GPUs: `--multi_gpu` alone starts N processes that
        # each train alone as rank 0 and race on the same output directory.
        raise BadInputError(
            f"the launcher started {launched} processes, but accelerate sees {accelerator.num_processes}; "
            "on a machine without GPUs, set ACCELERATE_USE_CPU=true for a multi-process CPU run"
        )
    is_main = accelerator.is_main_process
    if not is_main:
        # Other ranks log warnings only, so that N processes do not print every line N times.
        # (accelerate's get_logger would do this too, but prefixes "[RANK 0]" even in one process.)
        logging.getLogger("balcony_cli").setLevel(logging.WARNING)
    progress = progress if (progress is not None and is_main) else NoProgress()
    set_seed(recipe.seed)
    run_start = time.perf_counter()

    tokenizer = load_tokenizer(source)
    logger.info("resolved recipe:\n%s", recipe.to_yaml())
    # Data problems (such as a corpus shorter than one block) surface here, before anything is written.
    # Self-generated text is sampled once the base model is loaded, so only its prompt text is read here.
    prompt_texts = None
    if recipe.self_generated_tokens:
        prompt_texts = list(load_text_dataset(data_source, recipe.text_field)["text"])
    else:
        with accelerator.main_process_first():
            train_blocks, val_blocks = _build_blocks(data_source, tokenizer, recipe)

    if is_main and not request.resume:
        if request.overwrite and output_dir.exists():
            shutil.rmtree(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(output_dir / RECIPE_FILE, recipe.to_yaml().encode())
        (output_dir / METRICS).touch()
    accelerator.wait_for_everyone()

    base = load_base_model(source).to(accelerator.device)
    fingerprint = fingerprint_weights(base)
    model = BalconyModel(base, recipe.exits, init=recipe.init, seed=recipe.seed)
    logger.info(
        "base %s: %d layers, exits %s, %d trainable parameters",
        source.spec,
        model.num_layers,
        model.exits,
        sum(p.numel() for p in model.balcony_parameters()),
    )

    # Preparation: work before the first step, timed apart from training.
    preparation = _read_preparation(output_dir) if request.resume else {}
    if prompt_texts is not None:
        with accelerator.main_process_first():
            generation = _self_generated_data(model.base, tokenizer, prompt_texts, output_dir, recipe, data_source.spec)
        preparation.setdefault("self_generated", {**generation.to_dict(), "seconds": generation.seconds})
        data_source = resolve_data(str(generation.path))
        with accelerator.main_process_first():
            train_blocks, val_blocks = _build_blocks(data_source, tokenizer, recipe)
    if recipe.init == "fit" and not request.resume:
        start = time.perf_counter()
        calibration = calibration_blocks(train_blocks, recipe.fit_blocks, recipe.seed)
        reports = fit_exits(model, calibration, ridge=recipe.fit_ridge, batch_size=recipe.batch_size)
        preparation["init_fit"] = {
            "seconds": time.perf_counter() - start,
            "blocks": len(calibration),
            "exits": {str(k): report.to_dict() for k, report in reports.items()},
        }
        logger.info("fit initialisation took %.1f s", preparation["init_fit"]["seconds"])
    if is_main and not request.resume:
        atomic_write_json(output_dir / PREPARATION, preparation)

    windows = None
    before = None
    if eval_text is not None:
        windows = perplexity_windows(tokenizer, read_eval_text(eval_text), recipe.ppl_tokens, recipe.ppl_window)
        if is_main:
            if request.resume and (output_dir / TABLE_BEFORE).is_file():
                before = _table_from_dict(json.loads((output_dir / TABLE_BEFORE).read_text()))
            else:
                logger.info("perplexity before training on %s", eval_text)
                before = perplexity_table(model, windows)
                if not request.resume:
                    _write_table_before(output_dir, before)

    sample = train_blocks[: recipe.batch_size]["input_ids"].to(accelerator.device)
    teacher_rate = teacher_tokens_per_second(model, sample, autocast=accelerator.autocast)
    logger.info("teacher-only forward: %.0f tokens/s", teacher_rate)

    optimizer = build_optimizer(model, recipe)
    # The scheduler is not passed to accelerator.prepare: prepared schedulers step once per process
    # per call, and this one must step once per optimiser step.
    budget_seconds = recipe.max_minutes * 60 if recipe.max_minutes is not None else None
    if budget_seconds is not None:
        scheduler = TimeBudgetSchedule(optimizer, recipe.warmup_ratio, recipe.max_steps, budget_seconds)
    else:
        warmup_steps = math.ceil(recipe.warmup_ratio * recipe.max_steps)
        scheduler = get_cosine_schedule_with_warmup(optimizer, warmup_steps, recipe.max_steps)
    generator = torch.Generator().manual_seed(recipe.seed)
    loader = DataLoader(
        train_blocks,
        batch_size=recipe.batch_size,
        sampler=RandomSampler(train_blocks, generator=generator),
        drop_last=True,
    )

    step, epoch, batch_in_epoch, train_tokens, train_seconds = 0, 0, 0, 0, 0.0
    if request.resume:
        if accelerator.distributed_type == DistributedType.FSDP:
            # TODO: resuming under FSDP needs each rank's optimizer shard; checkpoints keep rank 0's only.
            raise BadInputError(
                "--resume is not supported under FSDP yet: checkpoints keep only rank 0's optimiser state. "
                "Start a new run, or resume without FSDP (for example with DDP)"
            )
        state = load_training_checkpoint(output_dir, model, optimizer, scheduler)
        recorded = state.get("base_fingerprint")
        if recorded is not None and recorded != fingerprint:
            message = (
                f"--resume: the base model differs from the one the run started with (recorded {recorded}, "
                f"loaded {fingerprint})"
            )
            if not request.allow_base_mismatch:
                raise BadInputError(message + "; load the original base, or pass --allow-base-mismatch")
            logger.warning("%s; continuing because --allow-base-mismatch is set", message)
        if state["step"] >= recipe.max_steps and (output_dir / SUMMARY).is_file():
            raise BadInputError(
                f"--resume: the run in {str(output_dir)!r} already reached step {state['step']}, and max_steps "
                f"is {recipe.max_steps}; pass a larger --max-steps to train further"
            )
        if budget_seconds is not None and state["train_seconds"] >= budget_seconds and (output_dir / SUMMARY).is_file():
            raise BadInputError(
                f"--resume: the run in {str(output_dir)!r} already trained for {state['train_seconds'] / 60:.2f} "
                f"minutes, and max_minutes is {recipe.max_minutes:g}; pass a larger --max-minutes to train further"
            )
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        train_tokens, train_seconds = state["train_tokens"], state["train_seconds"]
        generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
        if is_main:
            _truncate_metrics(output_dir / METRICS, step)
            # Only now, with the resume accepted, record fields that may change, such as max_steps.
            atomic_write_bytes(output_dir / RECIPE_FILE, recipe.to_yaml().encode())
            if before is not None and not (output_dir / TABLE_BEFORE).is_file():
                _write_table_before(output_dir, before)
        logger.info("resumed from step %d", step)

    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    # Validation and the perplexity table run on rank 0 alone, which needs whole weights there.
    can_evaluate = accelerator.distributed_type != DistributedType.FSDP
    if not can_evaluate:
        logger.warning("validation and the after-training table are skipped under FSDP; evaluate the checkpoint")
    gathered_weights: dict[str, torch.Tensor] | None = None
    core = accelerator.unwrap_model(model)
    exit_weights = torch.tensor(recipe.weights(), device=accelerator.device)
    params = core.balcony_parameters()
    world_tokens = recipe.seq_len * recipe.batch_size * accelerator.num_processes
    metrics_path = output_dir / METRICS
    validation: dict[str, Any] = {}

    def write_metrics(record: dict) -> None:
        if is_main:
            with metrics_path.open("a") as file:
                file.write(json.dumps(record) + "\n")

    def budget_spent() -> bool:
        return budget_seconds is not None and train_seconds >= budget_seconds

    if recipe.eval_at_start and step == 0 and can_evaluate and val_blocks is not None and is_main:
        validation = {"step": 0, "train_tokens": 0, "train_seconds": 0.0,
                      **validate(core, val_blocks, recipe, recipe.batch_size)}
        write_metrics({"split": "validation", **validation})
        logger.info("validation before training: %s", validation)
    accelerator.wait_for_everyone()

    # NOTE: with max_minutes, the bar still counts steps against max_steps, so its ETA is too long.
    progress.start(recipe.max_steps, step)
    model.train()
    window_losses: list[torch.Tensor] = []
    window_kl: list[torch.Tensor] = []
    window_mse: list[torch.Tensor] = []
    try:
        while step < recipe.max_steps and not budget_spent():
            # The generator state at the start of an epoch fixes its order; a resume restores it.
            epoch_generator_state = generator.get_state()
            batches = accelerator.skip_first_batches(loader, batch_in_epoch) if batch_in_epoch else loader
            tick = time.perf_counter()
            for batch in batches:
                with accelerator.accumulate(model):
                    out = model(
                        batch["input_ids"],
                        exit="all",
                        loss_temperature=recipe.temperature,
                        loss_chunk_tokens=recipe.loss_chunk_tokens,
                        hidden_loss_weight=recipe.hidden_loss_weight,
                    )
                    losses = out.losses
                    loss = (exit_weights * losses).sum()
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and recipe.grad_clip > 0:
                        accelerator.clip_grad_norm_(params, recipe.grad_clip)
                    optimizer.step()
                    optimizer.zero_grad()
                batch_in_epoch += 1
                train_tokens += world_tokens
                window_losses.append(losses.detach())
                window_kl.append(out.kl.detach())
                if out.hidden_mse is not None:
                    window_mse.append(out.hidden_mse.detach())
                if not accelerator.sync_gradients:
                    continue
                step += 1
                now = time.perf_counter()
                train_seconds += now - tick
                tick = now
                if isinstance(scheduler, TimeBudgetSchedule):
                    scheduler.update(step, train_seconds)
                else:
                    scheduler.step()
                # The budget is checked after each whole step, so a run overshoots it by less than one step.
                last_step = step >= recipe.max_steps or budget_spent()
                mean_losses = accelerator.reduce(torch.stack(window_losses).mean(0), reduction="mean")
                mean_kl = accelerator.reduce(torch.stack(window_kl).mean(0), reduction="mean")
                window_losses, window_kl = [], []
                record = {
                    "step": step,
                    "loss": float((exit_weights * mean_losses).sum()),
                    "kl": {k: float(mean_kl[i]) for i, k in enumerate(core.exits)},
                    "lr": scheduler.get_last_lr()[0],
                    "train_tokens": train_tokens,
                    "train_seconds": train_seconds,
                    "tokens_per_s": train_tokens / max(train_seconds, 1e-9),
                    "elapsed_s": time.perf_counter() - run_start,
                }
                if window_mse:
                    mean_mse = accelerator.reduce(torch.stack(window_mse).mean(0), reduction="mean")
                    record["hidden_mse"] = {k: float(mean_mse[i]) for i, k in enumerate(core.exits)}
                    window_mse = []
                progress.update(step, record)
                if step % recipe.log_every == 0 or last_step:
                    write_metrics(record)
                if can_evaluate and val_blocks is not None and recipe.eval_every and step % recipe.eval_every == 0:
                    if is_main:
                        validation = {"step": step, "train_tokens": train_tokens, "train_seconds": train_seconds,
                                      **validate(core, val_blocks, recipe, recipe.batch_size)}
                        write_metrics({"split": "validation", **validation})
                        logger.info("step %d validation: %s", step, validation)
                    accelerator.wait_for_everyone()
                    tick = time.perf_counter()
                # The last step is saved too, so that --resume with a larger max_steps extends a finished run.
                if (recipe.save_every and step % recipe.save_every == 0) or last_step:
                    # Every rank joins the gather, because under FSDP each rank stores a shard of the weights.
                    gathered_weights = balcony_weights(accelerator.get_state_dict(model))
                    if is_main:
                        save_training_checkpoint(
                            output_dir,
                            gathered_weights,
                            optimizer,
                            scheduler,
                            {
                                "step": step,
                                "epoch": epoch,
                                "batch_in_epoch": batch_in_epoch,
                                "train_tokens": train_tokens,
                                "train_seconds": train_seconds,
                                "generator": epoch_generator_state.tolist(),
                                "base_fingerprint": fingerprint,
                            },
                        )
                    accelerator.wait_for_everyone()
                    tick = time.perf_counter()
                if last_step:
                    break
            else:
                epoch += 1
                batch_in_epoch = 0
    except KeyboardInterrupt:
        latest = output_dir / CHECKPOINTS / LATEST
        saved = f"the last checkpoint is {latest.read_text()}" if latest.is_file() else "no checkpoint was saved yet"
        logger.warning("training interrupted at step %d; %s. Continue with --resume.", step, saved)
        raise
    finally:
        progress.stop()

    core.eval()
    if is_main and can_evaluate and val_blocks is not None and validation.get("step") != step:
        validation = {"step": step, "train_tokens": train_tokens, "train_seconds": train_seconds,
                      **validate(core, val_blocks, recipe, recipe.batch_size)}
        write_metrics({"split": "validation", **validation})

    after = None
    if is_main:
        training = {
            "recipe": recipe.to_dict(),
            "steps": step,
            "train_tokens": train_tokens,
            "train_seconds": train_seconds,
            "data": data_source.spec,
        }
        save_balcony(
            output_dir,
            core,
            balcony_config(core, source, fingerprint, trained=True, training=training),
            weights=gathered_weights,
        )
        if windows is not None and can_evaluate:
            logger.info("perplexity after training on %s", eval_text)
            after = perplexity_table(core, windows, full=False, naive=False)
            # The base is frozen, so its full-model and naive-exit rows are the ones measured before.
            after.full, after.naive = before.full, dict(before.naive)
    accelerator.wait_for_everyone()

    result = TrainResult(
        output_dir=output_dir,
        exits=core.exits,
        num_layers=core.num_layers,
        steps=step,
        train_tokens=train_tokens,
        train_tokens_per_s=train_tokens / max(train_seconds, 1e-9),
        teacher_tokens_per_s=teacher_rate,
        elapsed_s=time.perf_counter() - run_start,
        eval_text=str(eval_text) if eval_text is not None else None,
        before=before,
        after=after,
        validation=validation,
        base_fingerprint=fingerprint,
        train_seconds=train_seconds,
        stopped_by="max_minutes" if budget_spent() and step < recipe.max_steps else "max_steps",
        preparation=preparation,
        is_main_process=is_main,
    )
    if is_main:
        atomic_write_json(output_dir / SUMMARY, result.to_dict())
    return result

