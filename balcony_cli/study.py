"""`balcony study`: train a list of recipes at an equal time budget, score each with one protocol, tabulate.

A study file (YAML) names the base model, the time budget, the evaluation protocol and the rows. Each
row is a recipe file, a base recipe with overrides, or both. Rows run one after another. A row whose
result is already stored is skipped, so a study can span sessions:

- `OUTPUT/ROW/result.json` is written when a row finishes (the run's weights sit in `OUTPUT/ROW/run`);
- rows already in the results table (`table`.json) with the same recipe are taken from there, so that a
  committed table carries finished rows to a new machine.

The base is frozen, so the full model and the pruned baselines score the same against every row.
They are evaluated once, with the first row that is evaluated, and stored in `OUTPUT/reference.json`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from balcony_cli import __version__
from balcony_cli.checkpoint import (
    SCHEMA_VERSION,
    atomic_write_bytes,
    atomic_write_json,
    checkpoint_fingerprint,
)
from balcony_cli.data import expand_variables
from balcony_cli.errors import BadInputError
from balcony_cli.perplexity import CALIBRATION_BINS
from balcony_cli.recipe import Recipe, load_recipe

logger = logging.getLogger(__name__)

RESULT_FILE = "result.json"
REFERENCE_FILE = "reference.json"
RUN_DIR = "run"
PLOT_FILE = "validation-kl.png"
ROW_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
DATA_DIR_VARIABLE = "BALCONY_DATA_DIR"
TASK_LABELS = {"hellaswag": "HellaSwag", "arc_easy": "ARC-Easy", "arc_challenge": "ARC-Challenge"}


@dataclass
class EvalProtocol:
    """The evaluation every row gets."""

    tasks: list[str] = field(default_factory=lambda: ["hellaswag", "arc_easy"])
    """lm-evaluation-harness tasks, scored from the local task files under the data folder."""
    limit: int | None = 300
    """Examples per task (the first ones of the split)."""
    baselines: list[str] = field(default_factory=lambda: ["prune"])
    """Training-free rows at each exit's depth, evaluated once per study: naive, prune."""
    ppl_tokens: int = 20_000
    """Tokens of WikiText-2 test scored for perplexity."""
    ppl_window: int = 512
    """Non-overlapping perplexity window, in tokens."""
    batch_size: int = 8
    """Sequences per forward pass of the evaluation."""


@dataclass
class StudyRow:
    """One configuration: a recipe file and/or overrides of the study's base recipe."""

    name: str
    """Row label, also the folder name of its outputs."""
    recipe: str | None = None
    """Recipe file; default the study's base recipe."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Recipe fields set for this row only."""


@dataclass
class Study:
    """A study file: model, budget, protocol and rows."""

    model: str
    """Base model, as `balcony train` takes it."""
    rows: list[StudyRow]
    budget_minutes: float | None = 10.0
    """Minutes of optimiser steps per row (each row's max_minutes); None keeps each recipe's own limit."""
    recipe: str | None = None
    """Base recipe for rows that name none."""
    output: str | None = None
    """Folder for run directories and per-row results (weights included, so keep it out of the repository)."""
    table: str | None = None
    """Path prefix of the results table: PREFIX.md and PREFIX.json; default OUTPUT/results."""
    eval: EvalProtocol = field(default_factory=EvalProtocol)


def _check_keys(document: dict, cls: type, source: str) -> None:
    names = [f.name for f in dataclasses.fields(cls)]
    for key in document:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(names)}"
            raise BadInputError(f"{source}: unknown key {key!r}{hint}")


def load_study(path: Path) -> Study:
    """Read a study file, rejecting unknown keys with the closest valid one, and check every row's recipe."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"study file {str(path)!r} not found. Check the path.")
    try:
        document = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise BadInputError(f"{path}: invalid YAML ({error})") from error
    if not isinstance(document, dict):
        raise BadInputError(f"{path}: expected a mapping with model, rows and settings at the top level")

    _check_keys(document, Study, str(path))
    for key in ("model", "rows"):
        if key not in document:
            raise BadInputError(f"{path}: missing key {key!r}")
    eval_document = document.get("eval") or {}
    if not isinstance(eval_document, dict):
        raise BadInputError(f"{path}: eval must be a mapping of protocol settings")
    _check_keys(eval_document, EvalProtocol, f"{path}: eval")

    if not isinstance(document["rows"], list) or not document["rows"]:
        raise BadInputError(f"{path}: rows must be a non-empty list")
    rows = []
    for index, row in enumerate(document["rows"]):
        if not isinstance(row, dict) or "name" not in row:
            raise BadInputError(f"{path}: row {index + 1} must be a mapping with a name")
        _check_keys(row, StudyRow, f"{path}: row {row['name']!r}")
        overrides = row.get("overrides") or {}
        if not isinstance(overrides, dict):
            raise BadInputError(f"{path}: row {row['name']!r}: overrides must be a mapping of recipe fields")
        rows.append(StudyRow(name=row["name"], recipe=row.get("recipe"), overrides=overrides))

    study = Study(**{**document, "rows": rows, "eval": EvalProtocol(**eval_document)})
    _validate_study(study, path)
    return study


def _validate_study(study: Study, path: Path) -> None:
    names = [row.name for row in study.rows]
    for name in names:
        if not isinstance(name, str) or not ROW_NAME.match(name):
            raise BadInputError(f"{path}: row name {name!r}: use letters, digits, '.', '_' and '-' only")
        if names.count(name) > 1:
            raise BadInputError(f"{path}: row name {name!r} is used twice; give each row its own name")
    if study.budget_minutes is not None and not study.budget_minutes > 0:
        raise BadInputError(f"{path}: budget_minutes {study.budget_minutes}: must be positive")
    if study.eval.limit is not None and study.eval.limit < 1:
        raise BadInputError(f"{path}: eval limit {study.eval.limit}: must be positive")
    exits = {tuple(row_recipe(study, row).exits or ()) for row in study.rows}
    if len(exits) != 1 or not next(iter(exits)):
        raise BadInputError(
            f"{path}: rows must all train the same exits, so that they compare at the same depths "
            f"(found {sorted(list(e) for e in exits)})"
        )


def row_recipe(study: Study, row: StudyRow) -> Recipe:
    """Resolve a row's recipe: its file (or the study's base recipe), its overrides, then the study budget."""
    path = row.recipe or study.recipe
    overrides = dict(row.overrides)
    if study.budget_minutes is not None:
        overrides["max_minutes"] = float(study.budget_minutes)
    try:
        return load_recipe(path, overrides)
    except BadInputError as error:
        raise BadInputError(f"study row {row.name!r}: {error}") from None


def _expanded(recipe: Recipe, data_dir: Path) -> Recipe:
    """Expand $BALCONY_DATA_DIR (and other variables) in the recipe's data paths."""
    variables = {DATA_DIR_VARIABLE: str(data_dir)}
    changes: dict[str, Any] = {}
    if recipe.data is not None:
        changes["data"] = expand_variables(recipe.data, "data", variables)
    if recipe.data_mix is not None:
        changes["data_mix"] = {expand_variables(k, "data_mix", variables): v for k, v in recipe.data_mix.items()}
    if recipe.eval_text is not None:
        changes["eval_text"] = expand_variables(recipe.eval_text, "eval_text", variables)
    return dataclasses.replace(recipe, **changes)


@dataclass
class StudyRequest:
    study_path: Path
    data_dir: Path
    """A folder laid out like the shared data folder: task files, WikiText-2, Gutenberg."""
    output_dir: Path | None = None
    """Overrides the study file's output."""
    only: list[str] | None = None
    """Names of the rows to run; None runs them all. The table always lists every finished row."""


@dataclass
class StudyResult:
    rows: list[dict[str, Any]]
    reference: dict[str, Any] | None
    table_markdown: Path
    table_json: Path
    plot: Path | None
    skipped: list[str]
    """Rows whose stored results were used instead of training again."""


def _json_default(value: Any) -> Any:
    return str(value) if isinstance(value, Path) else value


def _metric(task: dict[str, Any] | None) -> dict[str, float | None] | None:
    if task is None:
        return None
    metrics = task["metrics"]
    return {"metric": task["primary"], "value": metrics[task["primary"]],
            "stderr": metrics.get(f"{task['primary']}_stderr"), "samples": task["samples"],
            "choices": task.get("choices"), "metrics": metrics}


def _scores(eval_row: dict[str, Any], tasks: list[str]) -> dict[str, Any]:
    """Condense one `evaluate()` row to the study's figures."""
    return {
        "name": eval_row["name"],
        "kind": eval_row["kind"],
        "k": eval_row["k"],
        "layers": eval_row["layers"],
        "tasks": {name: _metric(eval_row["tasks"].get(name)) for name in tasks},
        "perplexity": eval_row["perplexity"]["value"] if eval_row.get("perplexity") else None,
        "kept_layers": eval_row.get("kept_layers"),
    }


class StudyRunner:
    """Run the rows of one study; see the module docstring for what is stored where."""

    def __init__(self, study: Study, request: StudyRequest, on_row: Callable[[str, int, int], None] | None = None):
        self.study = study
        self.request = request
        self.on_row = on_row
        output = request.output_dir or (Path(study.output) if study.output else None)
        if output is None:
            raise BadInputError("no output folder: set output in the study file or pass -o DIR")
        self.output = Path(output)
        prefix = Path(study.table) if study.table else self.output / "results"
        self.table_markdown = prefix.with_name(prefix.name + ".md")
        self.table_json = prefix.with_name(prefix.name + ".json")
        self.data_dir = Path(request.data_dir)
        self.wikitext = self.data_dir / "wikitext2_raw" / "wiki.test.raw"
        books = sorted((self.data_dir / "gutenberg" / "books").glob("*.txt"))
        self.calibration_text = books[0] if books else None

    # Checks before any training.

    def check(self) -> None:
        if not self.wikitext.is_file():
            raise BadInputError(f"--data-dir {str(self.data_dir)!r}: no wikitext2_raw/wiki.test.raw for perplexity")
        if "prune" in self.study.eval.baselines and self.calibration_text is None:
            raise BadInputError(f"--data-dir {str(self.data_dir)!r}: no gutenberg/books/*.txt for the pruning score")
        from balcony_cli.evaluate import BASELINES
        from balcony_cli.offline_tasks import OFFLINE_TASKS

        unknown = [name for name in self.study.eval.tasks if name not in OFFLINE_TASKS]
        if unknown:
            raise BadInputError(f"study eval tasks {unknown}: expected tasks among {', '.join(OFFLINE_TASKS)}")
        for name in self.study.eval.tasks:
            if not (self.data_dir / OFFLINE_TASKS[name].relative_path).is_file():
                raise BadInputError(f"--data-dir {str(self.data_dir)!r}: no {OFFLINE_TASKS[name].relative_path}")
        bad = [b for b in self.study.eval.baselines if b not in BASELINES]
        if bad:
            raise BadInputError(f"study eval baselines {bad}: expected among {', '.join(BASELINES)}")
        if self.request.only:
            names = [row.name for row in self.study.rows]
            missing = [name for name in self.request.only if name not in names]
            if missing:
                raise BadInputError(f"--rows {','.join(missing)}: no such row; rows: {', '.join(names)}")
        for row in self.study.rows:
            recipe = _expanded(row_recipe(self.study, row), self.data_dir)
            if recipe.data is None and recipe.data_mix is None:
                raise BadInputError(f"study row {row.name!r}: its recipe sets neither data nor data_mix")

    # Stored results.

    def _table_rows(self) -> dict[str, dict[str, Any]]:
        if not self.table_json.is_file():
            return {}
        document = json.loads(self.table_json.read_text())
        return {row["name"]: row for row in document.get("rows", [])}

    def stored_result(self, row: StudyRow, recipe: Recipe) -> dict[str, Any] | None:
        """Return the row's stored result, None if there is none; reject one made from another recipe."""
        path = self.output / row.name / RESULT_FILE
        wanted = recipe.to_dict()
        if path.is_file():
            result = json.loads(path.read_text())
            if result["recipe"] != wanted:
                raise BadInputError(
                    f"study row {row.name!r}: {path} contains the result of a different recipe; delete "
                    f"{path.parent} to run the row again, or give the changed row a new name"
                )
            return result
        committed = self._table_rows().get(row.name)
        if committed is not None and committed["recipe"] == wanted:
            return committed
        return None

    def reference(self) -> dict[str, Any] | None:
        path = self.output / REFERENCE_FILE
        if path.is_file():
            return json.loads(path.read_text())
        if self.table_json.is_file():
            return json.loads(self.table_json.read_text()).get("reference")
        return None

    # One row.

    def run_row(self, row: StudyRow, recipe: Recipe) -> dict[str, Any]:
        from balcony_cli.evaluate import EvalRequest, evaluate
        from balcony_cli.train import CHECKPOINTS, LATEST, SUMMARY, TrainRequest, train

        run_dir = self.output / row.name / RUN_DIR
        expanded = _expanded(recipe, self.data_dir)
        if (run_dir / SUMMARY).is_file():
            logger.info("row %s: training finished earlier; evaluating %s", row.name, run_dir)
        else:
            resume = (run_dir / CHECKPOINTS / LATEST).is_file()
            logger.info("row %s: %s training in %s", row.name, "resuming" if resume else "starting", run_dir)
            train(TrainRequest(model=self.study.model, recipe=expanded, output_dir=run_dir, resume=resume,
                               overwrite=not resume, perplexity=False))
        summary = json.loads((run_dir / SUMMARY).read_text())

        reference = self.reference()
        protocol = self.study.eval
        request = EvalRequest(
            checkpoint=run_dir, tasks=list(protocol.tasks), data_dir=self.data_dir, limit=protocol.limit,
            baselines=list(protocol.baselines) if reference is None else [], perplexity_text=self.wikitext,
            ppl_tokens=protocol.ppl_tokens, ppl_window=protocol.ppl_window,
            calibration_text=self.calibration_text if "prune" in protocol.baselines else None,
            batch_size=protocol.batch_size, full=reference is None,
        )
        start = time.perf_counter()
        evaluation = evaluate(request)
        eval_seconds = time.perf_counter() - start
        eval_rows = [_scores(r, protocol.tasks) for r in evaluation.rows_json()]
        if reference is None:
            reference = {
                "rows": [r for r in eval_rows if r["kind"] != "exit"],
                "checkpoint": evaluation.checkpoint,
                "base_fingerprint": evaluation.base_fingerprint,
                "versions": evaluation.versions,
            }
            atomic_write_json(self.output / REFERENCE_FILE, reference)
        elif reference["base_fingerprint"] != evaluation.base_fingerprint:
            raise BadInputError(
                f"study row {row.name!r}: its base model differs from the one the reference rows were scored on "
                f"({reference['base_fingerprint']} against {evaluation.base_fingerprint}); delete "
                f"{self.output / REFERENCE_FILE} and the finished rows to start the study again"
            )
        validation = summary.get("validation") or {}
        result = {
            "schema_version": SCHEMA_VERSION,
            "balcony_version": __version__,
            "name": row.name,
            "recipe_path": row.recipe or self.study.recipe,
            "overrides": row.overrides,
            "recipe": recipe.to_dict(),
            "model": self.study.model,
            "base_fingerprint": evaluation.base_fingerprint,
            "checkpoint_fingerprint": checkpoint_fingerprint(run_dir),
            "train": {
                "steps": summary["steps"],
                "train_tokens": summary["train_tokens"],
                "train_tokens_per_s": summary["train_tokens_per_s"],
                "teacher_tokens_per_s": summary["teacher_tokens_per_s"],
                "train_seconds": summary.get("train_seconds"),
                "stopped_by": summary.get("stopped_by"),
                "preparation": summary.get("preparation", {}),
                "preparation_seconds": summary.get("preparation_seconds", 0.0),
                "validation": validation,
            },
            "eval_seconds": eval_seconds,
            "exits": [r for r in eval_rows if r["kind"] == "exit"],
            "versions": evaluation.versions,
        }
        atomic_write_json(self.output / row.name / RESULT_FILE, result)
        return result

    # The whole study.

    def run(self) -> StudyResult:
        self.check()
        self.output.mkdir(parents=True, exist_ok=True)
        results, skipped = [], []
        selected = [row for row in self.study.rows if not self.request.only or row.name in self.request.only]
        for index, row in enumerate(self.study.rows):
            recipe = row_recipe(self.study, row)
            stored = self.stored_result(row, recipe)
            if stored is not None:
                skipped.append(row.name)
                results.append(stored)
                continue
            if row not in selected:
                continue
            if self.on_row is not None:
                self.on_row(row.name, index, len(self.study.rows))
            results.append(self.run_row(row, recipe))
            self.write_table(results)
        plot = self.write_plot(results)
        self.write_table(results)
        return StudyResult(rows=results, reference=self.reference(), table_markdown=self.table_markdown,
                           table_json=self.table_json, plot=plot, skipped=skipped)

    def write_table(self, results: list[dict[str, Any]]) -> None:
        reference = self.reference()
        settings = {
            "model": self.study.model,
            "budget_minutes": self.study.budget_minutes,
            "eval": dataclasses.asdict(self.study.eval),
            "rows": [dataclasses.asdict(row) for row in self.study.rows],
        }
        document = {
            "schema_version": SCHEMA_VERSION,
            "balcony_version": __version__,
            "settings": settings,
            "base_fingerprint": reference["base_fingerprint"] if reference else None,
            "reference": reference,
            "rows": results,
        }
        self.table_json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.table_json, (json.dumps(document, indent=2, default=_json_default) + "\n").encode())
        atomic_write_bytes(self.table_markdown, render_markdown(self.study, results, reference).encode())

    def write_plot(self, results: list[dict[str, Any]]) -> Path | None:
        """Draw every row's validation KL curve that has a run directory here; skip rows without one."""
        from balcony_cli.plots import plot_validation_kl

        runs = {r["name"]: self.output / r["name"] / RUN_DIR for r in results
                if (self.output / r["name"] / RUN_DIR / "metrics.jsonl").is_file()}
        if not runs:
            return None
        path = self.output / PLOT_FILE
        try:
            plot_validation_kl(runs, path, title=f"{self.study.model}: validation KL against training tokens")
        except BadInputError as error:
            logger.warning("no validation KL plot: %s", error)
            return None
        return path


def _format_score(score: dict[str, Any] | None) -> str:
    if score is None:
        return "-"
    if score["stderr"] is None:
        return f"{score['value']:.3f}"
    return f"{score['value']:.3f} ± {score['stderr']:.3f}"


def _format_ppl(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.1f}" if value < 1e5 else f"{value:.2e}"


def render_markdown(study: Study, results: list[dict[str, Any]], reference: dict[str, Any] | None) -> str:
    """Render the results table: one line per row and exit, then the reference rows."""
    protocol = study.eval

    task_headers = []
    for name in protocol.tasks:
        metric = "acc_norm" if name == "hellaswag" else "acc"
        task_headers.append(f"{TASK_LABELS.get(name, name)} {metric}")
    headers = ["row", "exit", "tokens seen", "train tokens/s", "preparation (s)", "validation KL",
               *task_headers, "WikiText-2 ppl"]
    limit = f"the first {protocol.limit} examples" if protocol.limit else "the whole split"
    budget = (f"{study.budget_minutes:g} minutes of optimiser steps per row" if study.budget_minutes
              else "each recipe's own limit")
    lines = [
        f"# Study results: {study.model}",
        "",
        f"Budget: {budget}. Tasks: {limit} of each task, scored by lm-evaluation-harness from local files, so "
        "scores are close to, not equal to, published harness numbers (± is the standard error). Perplexity: "
        f"WikiText-2 test, first {protocol.ppl_tokens:,} tokens, {protocol.ppl_window}-token windows. "
        "Validation KL: KL(full ‖ exit) in nats per token on the row's own held-out training blocks, after "
        "the last step. Written by `balcony study`.",
        "",
        "| " + " | ".join(headers) + " |",
        "|" + "---|" * len(headers),
    ]

    for result in results:
        train = result["train"]
        kl = (train.get("validation") or {}).get("kl", {})
        for index, exit_row in enumerate(result["exits"]):
            k = exit_row["k"]
            cells = [
                result["name"] if index == 0 else "",
                str(k),
                f"{train['train_tokens']:,}" if index == 0 else "",
                f"{train['train_tokens_per_s']:.0f}" if index == 0 else "",
                f"{train['preparation_seconds']:.0f}" if index == 0 else "",
                f"{kl[str(k)]:.3f}" if str(k) in kl else "-",
                *(_format_score(exit_row["tasks"].get(name)) for name in protocol.tasks),
                _format_ppl(exit_row["perplexity"]),
            ]
            lines.append("| " + " | ".join(cells) + " |")

    if reference is not None:
        for ref in reference["rows"]:
            label = "full (reference)" if ref["kind"] == "full" else f"{ref['name']} (reference)"
            cells = [label, f"{ref['layers']} layers", "", "", "", "",
                     *(_format_score(ref["tasks"].get(name)) for name in protocol.tasks),
                     _format_ppl(ref["perplexity"])]
            lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.extend(_render_confidence(protocol.tasks, results, reference))
    return "\n".join(lines)


def _choice_cells(tasks: list[str], scores: dict[str, Any]) -> list[str]:
    cells = []
    for name in tasks:
        choices = (scores.get(name) or {}).get("choices")
        cells.append("-" if choices is None else
                     f"{choices['shortest_pick_rate']:.2f} / {choices['choice_entropy']:.2f}")
    return cells


def _render_confidence(tasks: list[str], results: list[dict[str, Any]], reference: dict[str, Any] | None) -> list[str]:
    """Render the second table: how flat and how length-biased each exit's choices are."""
    headers = ["row", "exit", "validation entropy", "validation ECE",
               *(f"{TASK_LABELS.get(name, name)} shortest picked / choice entropy" for name in tasks)]
    note = (
        f"Entropy and ECE (expected calibration error of the top-1 next token, {CALIBRATION_BINS} bins) are "
        "measured on the same held-out blocks as validation KL. Shortest picked: share of task items where "
        "the model's pick is a shortest answer; choice entropy: mean entropy in nats of the softmax over the "
        "answers' scores (1.386 for four answers it cannot tell apart)."
    )
    # Every row scores the same items, so the right answers' rate comes from any row that has it.
    scored_rows = [*(reference or {}).get("rows", []), *(exit_row for r in results for exit_row in r["exits"])]
    for name in tasks:
        rates = [row["tasks"][name]["choices"]["shortest_gold_rate"] for row in scored_rows
                 if (row["tasks"].get(name) or {}).get("choices")]
        if rates:
            note += f" On {TASK_LABELS.get(name, name)}, the right answer is a shortest one in {rates[0]:.2f} of items."
    lines = [
        note,
        "",
        "| " + " | ".join(headers) + " |",
        "|" + "---|" * len(headers),
    ]
    full_validation = None
    for result in results:
        validation = result["train"].get("validation") or {}
        full_validation = full_validation or validation
        for index, exit_row in enumerate(result["exits"]):
            k = str(exit_row["k"])
            entropy, ece = validation.get("entropy", {}).get(k), validation.get("ece", {}).get(k)
            cells = [result["name"] if index == 0 else "", k,
                     "-" if entropy is None else f"{entropy:.2f}", "-" if ece is None else f"{ece:.3f}",
                     *_choice_cells(tasks, exit_row["tasks"])]
            lines.append("| " + " | ".join(cells) + " |")
    for ref in (reference or {}).get("rows", []):
        if ref["kind"] != "full":
            continue
        entropy = (full_validation or {}).get("full_entropy")
        ece = (full_validation or {}).get("full_ece")
        cells = ["full (reference)", f"{ref['layers']} layers",
                 "-" if entropy is None else f"{entropy:.2f}", "-" if ece is None else f"{ece:.3f}",
                 *_choice_cells(tasks, ref["tasks"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def run_study(request: StudyRequest, on_row: Callable[[str, int, int], None] | None = None) -> StudyResult:
    """Load the study file and run it; see the module docstring."""
    study = load_study(request.study_path)
    return StudyRunner(study, request, on_row=on_row).run()
