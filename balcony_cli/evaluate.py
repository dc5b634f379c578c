"""`balcony eval`: score the full model, every exit and the baselines at each exit's depth.

Task scores come from lm-evaluation-harness itself (`simple_evaluate` with a `BalconyLM` per row), and
perplexity from the project protocol in `balcony_cli.perplexity`.
"""

from __future__ import annotations

import importlib.metadata
import logging
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from balcony_cli.checkpoint import base_source, checkpoint_fingerprint, load_balcony, read_balcony_config
from balcony_cli.errors import BadInputError
from balcony_cli.exits import parse_exits
from balcony_cli.offline_tasks import OFFLINE_TASKS, load_records, write_task_files

logger = logging.getLogger(__name__)

BASELINES = ("naive", "prune")
DTYPES = ("float32", "bfloat16", "float16")
# Standard errors of mean metrics (acc, acc_norm) are closed-form. Only aggregate metrics such as
# LAMBADA's perplexity are bootstrapped, and 1,000 resamples keep that to seconds.
BOOTSTRAP_ITERS = 1000


@dataclass
class EvalRequest:
    """An evaluation run's settings, resolved from flags and defaults."""

    checkpoint: Path
    tasks: list[str]
    """Expanded task names (groups such as arc already split)."""
    data_dir: Path | None = None
    """A folder laid out like the shared data folder; None uses the hub datasets."""
    limit: int | None = None
    exits: list[int] | None = None
    """Exits to evaluate; None means every exit of the checkpoint."""
    baselines: list[str] = field(default_factory=list)
    perplexity_text: Path | None = None
    ppl_tokens: int = 20000
    ppl_window: int = 512
    calibration_text: Path | None = None
    batch_size: int = 8
    device: str = "cpu"
    dtype: str = "float32"
    allow_base_mismatch: bool = False
    full: bool = True
    """Include the full model's row. A study leaves it out after the first checkpoint, because the
    frozen base scores the same on every checkpoint of one base."""

    def validate(self) -> None:
        """Check everything that can be checked before loading a model."""
        if self.limit is not None and self.limit <= 0:
            raise BadInputError(f"--limit {self.limit}: expected a positive number of examples per task")
        if self.batch_size <= 0:
            raise BadInputError(f"--batch-size {self.batch_size}: expected a positive integer")
        if self.ppl_tokens < 2 or self.ppl_window < 2:
            raise BadInputError("--ppl-tokens and --ppl-window must be at least 2")
        unknown = [b for b in self.baselines if b not in BASELINES]
        if unknown:
            raise BadInputError(
                f"--baselines {','.join(unknown)}: expected a comma list of {', '.join(BASELINES)}"
            )
        if self.dtype not in DTYPES:
            raise BadInputError(f"--dtype {self.dtype}: expected one of {', '.join(DTYPES)}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise BadInputError(f"--device {self.device}: no CUDA GPU is available; use --device cpu")
        if self.data_dir is not None:
            for name in self.tasks:
                load_path = self.data_dir / OFFLINE_TASKS[name].relative_path
                if not load_path.is_file():
                    raise BadInputError(
                        f"task {name}: local file not found at {load_path}; --data-dir must point at a "
                        f"folder that contains {OFFLINE_TASKS[name].relative_path}"
                    )
        for flag, path in (
            ("--perplexity", self.perplexity_text),
            ("--calibration-text", self.calibration_text),
        ):
            if path is not None and not Path(path).is_file():
                raise BadInputError(f"{flag} {str(path)!r}: file not found. Check the path.")
        if not self.tasks and self.perplexity_text is None:
            raise BadInputError("nothing to evaluate: give --tasks, --perplexity, or both")


@dataclass
class EvalRow:
    """One row of the table: a model, its cost, and its scores."""

    name: str
    kind: str
    k: int | None
    layers: int
    parameters: int
    relative_compute: float
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per task: metrics (each with its _stderr), the primary metric's name, and the sample count."""
    perplexity: dict[str, float] | None = None
    kept_layers: list[int] | None = None

    @property
    def average(self) -> float | None:
        scores = [task["metrics"][task["primary"]] for task in self.tasks.values()]
        return sum(scores) / len(scores) if scores else None


@dataclass
class EvalResult:
    """Every row, with what identifies the checkpoint they came from."""

    rows: list[EvalRow]
    checkpoint: dict[str, Any]
    base_fingerprint: str
    versions: dict[str, str]
    trained: bool

    def rows_json(self) -> list[dict[str, Any]]:
        return [{**asdict(row), "average": row.average} for row in self.rows]


def _harness_metrics(task_results: dict[str, Any]) -> dict[str, float]:
    """Turn the harness's "acc,none" / "acc_stderr,none" keys into plain metric names."""
    metrics = {}
    for key, value in task_results.items():
        name, _, filter_name = key.partition(",")
        if filter_name and isinstance(value, (int, float)):
            metrics[name] = float(value)
    return metrics


def _primary_metric(task: str, metrics: dict[str, float]) -> str:
    """Return the metric a table shows for `task`: the usual one for known tasks, else acc or the first."""
    if task in OFFLINE_TASKS:
        return OFFLINE_TASKS[task].primary_metric
    if "acc" in metrics:
        return "acc"
    return next(name for name in metrics if not name.endswith("_stderr"))


def _parameter_count(model: torch.nn.Module) -> int:
    """Count unique parameters, so tied embeddings count once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def evaluate(
    request: EvalRequest, on_row: Callable[[str, int, int], None] | None = None, progress: bool = False
) -> EvalResult:
    """Evaluate every requested row; `on_row(name, index, total)` is called as each row starts.

    `progress` shows the harness's progress bar for each row.
    """
    import lm_eval
    from lm_eval.tasks import TaskManager

    from balcony_cli.baselines import pruned_layers
    from balcony_cli.choice_bias import choice_statistics
    from balcony_cli.compute import ComputeProfile
    from balcony_cli.harness import BalconyLM, build_row, row_plan
    from balcony_cli.loading import load_tokenizer
    from balcony_cli.perplexity import model_perplexity, perplexity_table, perplexity_windows, read_eval_text

    request.validate()
    config = read_balcony_config(request.checkpoint)
    exits = (
        config["exits"]
        if request.exits is None
        else parse_exits(request.exits, config["base_model"]["num_layers"])
    )
    missing = [k for k in exits if k not in config["exits"]]
    if missing:
        raise BadInputError(
            f"--exits {','.join(map(str, missing))}: this checkpoint has exits "
            f"{','.join(map(str, config['exits']))}"
        )
    if "prune" in request.baselines and request.calibration_text is None:
        raise BadInputError(
            "--baselines prune needs a calibration text: pass --calibration-text FILE or set "
            "BALCONY_DATA_DIR to a folder with gutenberg/books/*.txt"
        )
    for name in request.tasks if request.data_dir is not None else []:
        load_records(name, request.data_dir)  # Parse errors surface before the model loads.

    dtype = getattr(torch, request.dtype)
    model, config = load_balcony(
        request.checkpoint, dtype=dtype, allow_base_mismatch=request.allow_base_mismatch
    )
    model.to(request.device)
    if not config.get("trained"):
        logger.warning(
            "checkpoint %s is untrained: its exits are evaluated as inserted, before any training",
            request.checkpoint,
        )
    tokenizer = load_tokenizer(base_source(config))
    profile = ComputeProfile.of(model.base)

    keep: dict[int, list[int]] = {}
    if "prune" in request.baselines:
        keep = pruned_layers(model.base, tokenizer, request.calibration_text, exits)
    plan = row_plan(exits, request.baselines, full=request.full)

    ppl_windows = None
    fast_ppl = None
    if request.perplexity_text is not None:
        ppl_windows = perplexity_windows(
            tokenizer, read_eval_text(request.perplexity_text), request.ppl_tokens, request.ppl_window
        )
        # One base pass scores the full model, the exits and the naive exits together.
        fast_ppl = perplexity_table(model, ppl_windows, exits=exits, naive="naive" in request.baselines)

    with tempfile.TemporaryDirectory(prefix="balcony-tasks-") as task_dir:
        task_manager = None
        if request.data_dir is not None and request.tasks:
            write_task_files(task_dir, request.data_dir, request.tasks)
            task_manager = TaskManager(include_path=task_dir)
        rows = []
        for index, (kind, k) in enumerate(plan):
            row = build_row(model, kind, k, pruned_keep=keep.get(k))
            if on_row is not None:
                on_row(row.name, index, len(plan))
            result = EvalRow(
                name=row.name,
                kind=row.kind,
                k=row.k,
                layers=row.layers,
                parameters=_parameter_count(row.model),
                relative_compute=profile.relative_compute(row.layers),
                kept_layers=row.kept_layers,
            )
            if request.tasks:
                lm = BalconyLM(
                    pretrained=row,
                    tokenizer=tokenizer,
                    device=request.device,
                    batch_size=request.batch_size,
                    progress=progress,
                )
                output = lm_eval.simple_evaluate(
                    model=lm,
                    tasks=list(request.tasks),
                    task_manager=task_manager,
                    limit=request.limit,
                    bootstrap_iters=BOOTSTRAP_ITERS,
                    # The logged samples give the length-bias figures; the table itself needs only results.
                    log_samples=True,
                )
                for name in request.tasks:
                    metrics = _harness_metrics(output["results"][name])
                    primary = _primary_metric(name, metrics)
                    result.tasks[name] = {
                        "metrics": metrics,
                        "primary": primary,
                        "samples": output["n-samples"][name]["effective"],
                        "choices": choice_statistics(output["samples"].get(name, []), primary),
                    }
            if ppl_windows is not None:
                tokens = fast_ppl.tokens
                if kind == "full":
                    value = fast_ppl.full
                elif kind == "exit":
                    value = fast_ppl.exits[k]
                elif kind == "naive":
                    value = fast_ppl.naive[k]
                else:
                    value = model_perplexity(row.model, ppl_windows)
                result.perplexity = {"value": value, "tokens": tokens}
            rows.append(result)

    return EvalResult(
        rows=rows,
        checkpoint={
            "path": str(Path(request.checkpoint).resolve()),
            "base_model": config["base_model"]["spec"],
            "num_layers": config["base_model"]["num_layers"],
            "exits": config["exits"],
            "trained": bool(config.get("trained")),
            "fingerprint": checkpoint_fingerprint(request.checkpoint),
        },
        base_fingerprint=config["base_fingerprint"],
        versions={name: importlib.metadata.version(name) for name in ("torch", "transformers", "lm_eval")},
        trained=bool(config.get("trained")),
    )
