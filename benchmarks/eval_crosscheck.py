"""Score the base with lm-evaluation-harness's own `hf` model; compare with `balcony eval`'s full row.

Usage:
    python benchmarks/eval_crosscheck.py EVAL_JSON

It reads the tasks, limit, data folder and batch size from the eval document's settings, loads the
checkpoint's base model the way the harness's `hf` model loads any model (from a path, with
`gguf_file` for a GGUF base), runs the same offline task files, and prints both rows metric by metric.
The exit code is 1 when any metric differs by more than 1e-9.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import lm_eval
from lm_eval.tasks import TaskManager

from balcony_cli.checkpoint import base_source, read_balcony_config
from balcony_cli.evaluate import BOOTSTRAP_ITERS
from balcony_cli.offline_tasks import write_task_files


def main(eval_json: str) -> int:
    document = json.loads(Path(eval_json).read_text())
    settings = document["settings"]
    full = next(row for row in document["rows"] if row["kind"] == "full")
    source = base_source(read_balcony_config(settings["checkpoint"]))
    model_args = {"pretrained": source.path, "dtype": settings["dtype"]}
    if source.gguf_file:
        model_args["gguf_file"] = source.gguf_file
    tasks = settings["tasks"]
    with tempfile.TemporaryDirectory() as task_dir:
        write_task_files(task_dir, settings["data_dir"], tasks)
        reference = lm_eval.simple_evaluate(
            model="hf",
            model_args=model_args,
            device=settings["device"],
            batch_size=settings["batch_size"],
            tasks=tasks,
            task_manager=TaskManager(include_path=task_dir),
            limit=settings["limit"],
            bootstrap_iters=BOOTSTRAP_ITERS,
            log_samples=False,
        )
    print(f"hf model_args: {model_args}")
    print(f"{'task':<14} {'metric':<16} {'balcony eval full':>18} {'harness hf':>12} {'difference':>11}")
    worst = 0.0
    for task in tasks:
        for metric, value in sorted(full["tasks"][task]["metrics"].items()):
            theirs = reference["results"][task][f"{metric},none"]
            worst = max(worst, abs(theirs - value))
            print(f"{task:<14} {metric:<16} {value:>18.6f} {theirs:>12.6f} {theirs - value:>11.2e}")
    print(f"largest difference: {worst:.2e}")
    return 0 if worst <= 1e-9 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
