"""Curves of validation KL against training tokens, read from the metrics.jsonl of training runs."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

from balcony_cli.errors import BadInputError

METRICS = "metrics.jsonl"
RECIPE_FILE = "recipe.yaml"


def read_validation_curves(run_dir: Path) -> dict[int, list[tuple[int, float]]]:
    """Return, per exit, the (training tokens, validation KL) points of one run, in step order.

    Validation lines written before they carried train_tokens get it from the step line of the same
    step, or else from the step count and the recipe's tokens per step (one process assumed).
    """
    path = Path(run_dir) / METRICS
    if not path.is_file():
        raise BadInputError(f"run {str(run_dir)!r}: no {METRICS}; pass a directory written by `balcony train`")
    validations, tokens_at_step = [], {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if record.get("split") == "validation":
            validations.append(record)
        elif "train_tokens" in record:
            tokens_at_step[record["step"]] = record["train_tokens"]
    tokens_per_step = None
    recipe_path = Path(run_dir) / RECIPE_FILE
    if recipe_path.is_file():
        recipe = yaml.safe_load(recipe_path.read_text())
        tokens_per_step = recipe["seq_len"] * recipe["batch_size"] * recipe.get("grad_accum_steps", 1)
    curves: dict[int, list[tuple[int, float]]] = {}
    for record in validations:
        step = record["step"]
        tokens = record.get("train_tokens", tokens_at_step.get(step))
        if tokens is None and tokens_per_step is not None:
            tokens = step * tokens_per_step
        if tokens is None:
            continue
        for k, kl in record["kl"].items():
            curves.setdefault(int(k), []).append((tokens, kl))
    if not curves:
        raise BadInputError(
            f"run {str(run_dir)!r}: {METRICS} has no validation lines; train with eval_every > 0 or eval_at_start"
        )
    return curves


def plot_validation_kl(
    runs: Mapping[str, Path], path: Path, exits: Sequence[int] | None = None, title: str | None = None
) -> list[int]:
    """Draw validation KL(full || exit) against training tokens, one panel per exit, one line per run.

    `runs` maps a legend label to a run directory. `exits` defaults to every exit found in any run.
    Writes a PNG to `path` and returns the exits drawn.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not runs:
        raise BadInputError("no runs to plot; pass at least one run directory")
    curves = {label: read_validation_curves(directory) for label, directory in runs.items()}
    found = sorted({k for per_exit in curves.values() for k in per_exit})
    exits = found if exits is None else list(exits)
    missing = [k for k in exits if k not in found]
    if missing:
        raise BadInputError(f"--exits {','.join(map(str, missing))}: no run has validation KL for it; found {found}")
    figure, axes = plt.subplots(1, len(exits), figsize=(5.5 * len(exits), 4.2), squeeze=False)
    for axis, k in zip(axes[0], exits):
        for label, per_exit in curves.items():
            points = per_exit.get(k)
            if points:
                axis.plot([t for t, _ in points], [kl for _, kl in points], marker="o", markersize=3, label=label)
        axis.set_yscale("log")
        axis.set_title(f"exit {k}")
        axis.set_xlabel("training tokens")
        axis.set_ylabel("validation KL(full ‖ exit), nats per token")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize="small")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return exits
