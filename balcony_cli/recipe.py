"""Typed training recipes, loaded from YAML and overridden from the command line."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from balcony_cli.errors import BadInputError
from balcony_cli.exits import INIT_CHOICES, parse_exits


@dataclass(frozen=True)
class InitSchedule:
    """The learning rate and warm-up a recipe gets for an initialisation when it sets neither."""

    lr: float
    warmup_ratio: float


# From the exit-learning study on SmolLM2-135M (docs/study/exit-learning.md, exit 20 after 10
# minutes): copy-last reached validation KL 1.204 at lr 1e-2, against 1.411 at 3e-3 and 1.770 at
# 1e-3. The fit starts close to the full model (KL 1.60 where copy-last starts at 8.4), and one AdamW
# step at lr 1.6e-3 undid it, so it gets a small rate and a long warm-up. At lr 3e-4 it reached the
# lowest KL of the study: 1.061 in fp32 and 1.019 in bf16. copy-next and random were measured at no
# other rate, and start as far from the full model as copy-last, so they take copy-last's schedule.
INIT_SCHEDULES = {
    "fit": InitSchedule(lr=3e-4, warmup_ratio=0.2),
    "copy-last": InitSchedule(lr=1e-2, warmup_ratio=0.05),
    "copy-next": InitSchedule(lr=1e-2, warmup_ratio=0.05),
    "random": InitSchedule(lr=1e-2, warmup_ratio=0.05),
}


@dataclass
class Recipe:
    """Everything that decides a training run, so that a run can be repeated from its saved recipe."""

    exits: list[int] | None = None
    """Layer indices (1-based) after which an exit is added; given here or with --exits."""
    init: Literal["copy-last", "copy-next", "fit", "random"] = "fit"
    """Balcony layer initialisation: copy of the last layer or of layer k + 1, fitted (see init_fit.py), or random."""
    fit_blocks: int = 32
    """Training blocks used as calibration text by init: fit."""
    fit_ridge: float = 1e-2
    """Ridge strength of init: fit, relative to the mean eigenvalue of the features' Gram matrix."""
    data: str | None = None
    """Training text: .txt/.jsonl/.parquet files, folders or globs (with $VARIABLES expanded), or a hub dataset id."""
    data_mix: dict[str, float] | None = None
    """Training text mixture instead of data: source (as in data) -> weight, its share of the training blocks."""
    self_generated_tokens: int = 0
    """Tokens to sample from the base model, prompted by data's paragraph starts, to train on instead of data; 0: off."""
    self_generated_new_tokens: int = 128
    """Tokens sampled after each prompt when self_generated_tokens is set."""
    text_field: str = "text"
    """Column that contains the text in .jsonl and .parquet data."""
    seq_len: int = 256
    """Tokens per packed training block."""
    batch_size: int = 4
    """Blocks per micro-batch on each process."""
    grad_accum_steps: int = 1
    """Micro-batches per optimiser step."""
    max_steps: int = 300
    """Optimiser steps; with max_minutes, the most steps the run may take."""
    max_minutes: float | None = None
    """Minutes of optimiser steps (validation and saving not counted) before training stops; the LR schedule follows time."""
    lr: float | None = None
    """Peak AdamW learning rate. When unset, INIT_SCHEDULES gives the one for `init`."""
    warmup_ratio: float | None = None
    """Share of max_steps (of max_minutes, when set) spent in linear warm-up before the cosine decay to zero.
    When unset, INIT_SCHEDULES gives the one for `init`."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    grad_clip: float = 1.0
    """Maximum global gradient norm; 0 turns clipping off."""
    temperature: float = 1.0
    """Distillation temperature applied to the full-model and the exit logits (validation KL always uses 1)."""
    hidden_loss_weight: float = 0.0
    """Weight of the MSE between each exit's normed hidden state and the full model's, added to the KL."""
    exit_weights: list[float] | None = None
    """Loss weight of each exit, in the order of `exits`; default 1.0 each."""
    loss_chunk_tokens: int = 1024
    """Tokens per chunk when the loss applies the LM head; bounds the memory held by logits."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Precision of the forward passes: bf16 autocast (the optimiser state stays fp32), fp32, or auto, which
    picks bf16 where the device computes it natively (train.auto_precision) and fp32 elsewhere."""
    seed: int = 0
    """Seed for initialisation, data order and everything random in the run."""
    val_blocks: int = 16
    """Blocks held out from the training data for validation."""
    eval_every: int = 100
    """Steps between validation passes (0: only at the end)."""
    eval_at_start: bool = False
    """Also run a validation pass before the first step, so that validation curves start at 0 tokens."""
    save_every: int = 100
    """Steps between checkpoints (0: only the final save)."""
    log_every: int = 10
    """Steps between lines in metrics.jsonl."""
    eval_text: str | None = None
    """Text file for the final perplexity table; default $BALCONY_DATA_DIR/wikitext2_raw/wiki.test.raw."""
    ppl_tokens: int = 20_000
    """Tokens of eval_text scored in the perplexity table."""
    ppl_window: int = 512
    """Non-overlapping window length for perplexity."""
    notes: str = ""
    """Free text saved with the run."""

    def __post_init__(self) -> None:
        errors = []
        schedule = INIT_SCHEDULES.get(self.init)
        if schedule is not None:
            if self.lr is None:
                self.lr = schedule.lr
            if self.warmup_ratio is None:
                self.warmup_ratio = schedule.warmup_ratio
        if self.exits is not None:
            self.exits = parse_exits(list(self.exits))
        if self.init not in INIT_CHOICES:
            errors.append(f"{_label('init')} {self.init!r}: expected one of {', '.join(INIT_CHOICES)}")
        for name in ("seq_len", "batch_size", "grad_accum_steps", "max_steps", "loss_chunk_tokens", "ppl_window",
                     "fit_blocks", "self_generated_new_tokens"):
            if getattr(self, name) < 1:
                errors.append(f"{_label(name)} {getattr(self, name)}: must be a positive integer")
        if self.seq_len < 2:
            errors.append(f"{_label('seq_len')} {self.seq_len}: must be at least 2")
        for name in ("val_blocks", "eval_every", "save_every", "log_every", "ppl_tokens", "self_generated_tokens"):
            if getattr(self, name) < 0:
                errors.append(f"{_label(name)} {getattr(self, name)}: must not be negative")
        if self.lr is not None and not self.lr > 0:
            errors.append(f"{_label('lr')} {self.lr}: must be positive")
        if self.warmup_ratio is not None and not 0 <= self.warmup_ratio < 1:
            errors.append(f"{_label('warmup_ratio')} {self.warmup_ratio}: must lie in [0, 1)")
        if not self.temperature > 0:
            errors.append(f"{_label('temperature')} {self.temperature}: must be positive")
        if not self.hidden_loss_weight >= 0:
            errors.append(f"{_label('hidden_loss_weight')} {self.hidden_loss_weight}: must not be negative")
        if not self.fit_ridge > 0:
            errors.append(f"{_label('fit_ridge')} {self.fit_ridge}: must be positive")
        if self.max_minutes is not None and not self.max_minutes > 0:
            errors.append(f"{_label('max_minutes')} {self.max_minutes}: must be positive, or unset for no time limit")
        errors += self._data_errors()
        if self.precision not in ("auto", "fp32", "bf16"):
            errors.append(f"{_label('precision')} {self.precision!r}: expected auto, fp32 or bf16")
        if self.exit_weights is not None:
            if self.exits is not None and len(self.exit_weights) != len(self.exits):
                errors.append(
                    f"exit_weights has {len(self.exit_weights)} values for {len(self.exits)} exits; "
                    "give one weight per exit"
                )
            if any(w < 0 for w in self.exit_weights):
                errors.append("exit_weights: weights must not be negative")
        self.adam_betas = tuple(self.adam_betas)
        if errors:
            raise BadInputError("invalid recipe: " + "; ".join(errors))

    def _data_errors(self) -> list[str]:
        errors = []
        if self.data_mix is not None:
            if self.data is not None:
                errors.append(
                    f"data ({self.data!r}) and data_mix are both set; train on one of them, so remove data or "
                    "data_mix (a --data flag counts as data)"
                )
            if not self.data_mix:
                errors.append("data_mix is empty; give at least one source with a weight, or remove it")
            for source, weight in self.data_mix.items():
                if not isinstance(source, str) or not source:
                    errors.append(f"data_mix key {source!r}: expected a data source such as a folder of .txt files")
                elif isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
                    errors.append(f"data_mix[{source!r}] {weight!r}: expected a positive weight")
            if self.self_generated_tokens:
                errors.append(
                    "self_generated_tokens takes its prompts from data, and data_mix is set; set data instead "
                    "of data_mix, or set self_generated_tokens to 0"
                )
        return errors

    def weights(self) -> list[float]:
        assert self.exits is not None
        return list(self.exit_weights) if self.exit_weights is not None else [1.0] * len(self.exits)

    def to_dict(self) -> dict[str, Any]:
        document = dataclasses.asdict(self)
        document["adam_betas"] = list(self.adam_betas)
        return document

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


RECIPE_FIELDS = [f.name for f in fields(Recipe)]
# Names used by other trainers (transformers' TrainingArguments, torchtune), mapped to ours.
SYNONYMS = {
    "learning_rate": "lr",
    "steps": "max_steps",
    "num_steps": "max_steps",
    "block_size": "seq_len",
    "max_seq_len": "seq_len",
    "sequence_length": "seq_len",
    "gradient_accumulation_steps": "grad_accum_steps",
    "per_device_train_batch_size": "batch_size",
    "warmup": "warmup_ratio",
    "max_grad_norm": "grad_clip",
    "dataset": "data",
}


def _label(name: str) -> str:
    """Name a recipe field the way a user may have set it: as a recipe key or a command-line flag."""
    return f"{name} (--{name.replace('_', '-')})"


def _check_type(name: str, value: Any) -> Any:
    """Check a recipe value against its field's annotation, converting ints to floats where needed."""
    annotation = typing.get_type_hints(Recipe)[name]
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (types.UnionType, typing.Union) and type(None) in args:
        if value is None:
            return None
        annotation = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        if value not in args:
            raise BadInputError(f"{_label(name)} {value!r}: expected one of {', '.join(map(str, args))}")
        return value
    expected = origin or annotation
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is tuple and isinstance(value, list):
        value = tuple(value)
    if expected in (int, float, str, bool, list, tuple, dict) and not (
        isinstance(value, expected) and not (expected is int and isinstance(value, bool))
    ):
        raise BadInputError(f"{_label(name)} {value!r}: expected {getattr(expected, '__name__', expected)}")
    return value


def recipe_from_dict(document: dict[str, Any], source: str = "recipe") -> Recipe:
    """Build a Recipe, rejecting unknown keys with the closest valid key as a hint."""
    if not isinstance(document, dict):
        raise BadInputError(f"{source}: expected a mapping of recipe fields at the top level")
    values = {}
    for key, value in document.items():
        if key not in RECIPE_FIELDS:
            close = [SYNONYMS[key]] if key in SYNONYMS else difflib.get_close_matches(str(key), RECIPE_FIELDS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(RECIPE_FIELDS)}"
            raise BadInputError(f"{source}: unknown key {key!r}{hint}")
        values[key] = _check_type(key, value)
    return Recipe(**values)


def load_recipe(path: str | Path | None, overrides: dict[str, Any] | None = None) -> Recipe:
    """Load a recipe file (or the defaults when `path` is None) and apply non-None overrides."""
    document: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            available = sorted(str(p) for p in Path("recipes").glob("**/*.yaml")) if Path("recipes").is_dir() else []
            hint = f" Available: {', '.join(available)}." if available else ""
            raise BadInputError(f"--recipe {source!r}: file not found.{hint}")
        try:
            document = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise BadInputError(f"--recipe {source!r}: invalid YAML ({error})") from error
    for key, value in (overrides or {}).items():
        if value is not None:
            document[key] = value
    return recipe_from_dict(document, source=source)
