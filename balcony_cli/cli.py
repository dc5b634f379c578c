"""The `balcony` command line: one small function per verb over the core in balcony_cli."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Optional

import click
import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from balcony_cli import __version__
from balcony_cli.errors import BadInputError, BalconyError
from balcony_cli.recipe import INIT_SCHEDULES, Recipe

app = typer.Typer(
    help="Add trained early exits (Balcony layers) to a frozen decoder-only language model.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
error_console = Console(stderr=True)
logger = logging.getLogger("balcony_cli")
_state = {"debug": False}

DEFAULT_OUTPUT = Path("balcony-out")
RECIPE_DEFAULTS = {field.name: field.default for field in dataclasses.fields(Recipe)}


def _setup_logging(debug: bool) -> None:
    handler = RichHandler(console=error_console, show_path=False, show_time=False)
    logging.basicConfig(level=logging.WARNING, handlers=[handler], format="%(message)s", force=True)
    logging.getLogger("balcony_cli").setLevel(logging.DEBUG if debug else logging.INFO)


def _print_version(value: bool) -> None:
    if value:
        console.print(__version__)
        raise typer.Exit(0)


@app.callback()
def _main(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks and debug logs."),
    version: bool = typer.Option(
        False, "--version", help="Print the version and exit.", callback=_print_version, is_eager=True
    ),
) -> None:
    _state["debug"] = debug
    _setup_logging(debug)
    if not console.is_terminal:
        _disable_library_progress_bars()


def _disable_library_progress_bars() -> None:
    """Silence the tqdm bars of transformers, datasets and the GGUF loader, which write to stderr.

    tqdm reads TQDM_DISABLE when it is imported, so it is set before transformers is imported.
    """
    os.environ.setdefault("TQDM_DISABLE", "1")
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def _handle_errors(command):
    """Turn typed errors into one red line and an exit code: 2 for bad input, 1 for other failures.

    --debug prints the traceback first and keeps the exit code.
    """

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort, click.exceptions.ClickException):
            raise
        except BalconyError as error:
            if _state["debug"]:
                traceback.print_exc()
            error_console.print(f"[red]error:[/red] {error}", highlight=False, soft_wrap=True)
            raise typer.Exit(error.exit_code) from None
        except KeyboardInterrupt:
            error_console.print("[red]interrupted[/red]")
            raise typer.Exit(130) from None
        except Exception as error:
            if _state["debug"]:
                traceback.print_exc()
            hint = "" if _state["debug"] else " (rerun with --debug for a traceback)"
            error_console.print(
                f"[red]error:[/red] {type(error).__name__}: {error}{hint}", highlight=False, soft_wrap=True
            )
            raise typer.Exit(1) from None

    return wrapper


def _write_json(path: str, document: dict[str, Any], overwrite: bool) -> None:
    """Write a --json document; `-` means stdout. An existing file needs --overwrite."""
    text = json.dumps(document, indent=2, default=str)
    if path == "-":
        sys.stdout.write(text + "\n")
        return
    target = Path(path)
    if target.exists() and not overwrite:
        raise BadInputError(f"--json {path!r}: the file exists; pass --overwrite or choose another path")
    from balcony_cli.checkpoint import atomic_write_bytes

    atomic_write_bytes(target, (text + "\n").encode())


def _json_document(settings: dict[str, Any], fingerprint: str | None, **body: Any) -> dict[str, Any]:
    from balcony_cli.checkpoint import SCHEMA_VERSION

    return {
        "schema_version": SCHEMA_VERSION,
        "balcony_version": __version__,
        "settings": settings,
        "base_fingerprint": fingerprint,
        **body,
    }


def _absolute_if_local(path: str | None) -> str | None:
    """Make an existing local path absolute, so that --resume works from any working directory."""
    if path is None or not Path(path).expanduser().exists():
        return path
    return str(Path(path).expanduser().resolve())


def _recipe_help(field: str, text: str) -> str:
    """Help text for a flag that overrides a recipe field, with the field's default."""
    if field in ("lr", "warmup_ratio"):
        by_init = ", ".join(f"{getattr(schedule, field):g} for {init}" for init, schedule in INIT_SCHEDULES.items())
        return f"{text}. Overrides the recipe; default by --init: {by_init}."
    if RECIPE_DEFAULTS[field] is None:
        return f"{text}. Overrides the recipe; unset by default."
    return f"{text}. Overrides the recipe; default {RECIPE_DEFAULTS[field]}."


def _parse_exits_for(model: str, text: str) -> list[int]:
    """Parse --exits; "all" reads the model's config for its layer count."""
    from balcony_cli.loading import load_config, resolve_model
    from balcony_cli.model import parse_exits

    if text.strip() != "all":
        return parse_exits(text)
    return parse_exits("all", load_config(resolve_model(model)).num_hidden_layers)


class RichTrainingProgress:
    """A rich progress bar with loss, tokens/s and ETA, drawn only when stdout is a terminal."""

    def __init__(self) -> None:
        self._progress = Progress(
            TextColumn("[bold]training"),
            BarColumn(),
            TextColumn("step {task.completed}/{task.total}"),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[rate]} tok/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
        )
        self._task = None

    def start(self, total_steps: int, completed_steps: int) -> None:
        self._progress.start()
        self._task = self._progress.add_task("train", total=total_steps, completed=completed_steps, loss="-", rate="-")

    def update(self, step: int, metrics: dict[str, Any]) -> None:
        self._progress.update(
            self._task, completed=step, loss=f"{metrics['loss']:.3f}", rate=f"{metrics['tokens_per_s']:.0f}"
        )

    def stop(self) -> None:
        self._progress.stop()


def _format_ppl(value: float | None) -> str:
    if value is None:
        return "-"
    if value == float("inf"):
        return "inf"
    return f"{value:,.1f}" if value < 1e5 else f"{value:.2e}"


def perplexity_rich_table(result) -> Table:
    table = Table(
        title=f"Perplexity on {result.eval_text}\n({result.before.tokens:,} predicted tokens: every token but "
        "the first of each window)"
    )
    table.add_column("row")
    table.add_column("layers run", justify="right")
    table.add_column("naive early exit", justify="right")
    table.add_column("Balcony before training", justify="right")
    table.add_column("Balcony after training", justify="right")
    full = _format_ppl(result.before.full)
    # The full model is not trained, so it is the same reference in every column.
    table.add_row("full", str(result.num_layers), full, full, full)
    for k in result.exits:
        table.add_row(
            f"exit {k}",
            f"{k} + 1",
            _format_ppl(result.before.naive.get(k)),
            _format_ppl(result.before.exits.get(k)),
            _format_ppl(result.after.exits.get(k) if result.after else None),
        )
    return table


@app.command()
@_handle_errors
def insert(
    model: str = typer.Argument(..., help="Base model: smollm2-135m, a .gguf file, a local directory or a hub id."),
    exits: str = typer.Option(..., "--exits", help="Comma-separated layer indices (1-based), or 'all'."),
    output: Path = typer.Option(DEFAULT_OUTPUT, "--output", "-o", help="Directory to write the Balcony files to."),
    init: str = typer.Option(
        "copy-last", "--init", help="Balcony layer initialisation: copy-last, copy-next or random ('fit' needs "
        "`balcony train`)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output directory."),
    json_path: Optional[str] = typer.Option(None, "--json", help="Write the saved config as JSON ('-': stdout)."),
) -> None:
    """Add untrained Balcony layers to a base model and save only those layers."""
    from balcony_cli.insert import insert as insert_exits

    exit_list = _parse_exits_for(model, exits)
    document = insert_exits(model, exit_list, output, init=init, overwrite=overwrite)
    if json_path:
        _write_json(json_path, _json_document({"model": model, "exits": exit_list, "init": init,
                                               "output": str(output)}, document["base_fingerprint"],
                                              config=document), overwrite)
    if json_path != "-":
        console.print(f"Wrote Balcony exits {document['exits']} for {model} to {output}")


@app.command()
@_handle_errors
def train(
    model: str = typer.Argument(..., help="Base model: smollm2-135m, a .gguf file, a local directory or a hub id."),
    exits: Optional[str] = typer.Option(
        None, "--exits", help="Comma-separated layer indices (1-based), or 'all'; overrides the recipe."
    ),
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="YAML recipe file (see recipes/)."),
    data: Optional[str] = typer.Option(
        None, "--data", help="Training text: .txt/.jsonl/.parquet files, folders, globs, or a hub dataset id."
    ),
    output: Path = typer.Option(DEFAULT_OUTPUT, "--output", "-o", help="Output directory."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in the output directory."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete an existing output directory and start over."),
    init: Optional[str] = typer.Option(
        None, "--init", help=_recipe_help("init", "Balcony layer initialisation: copy-last, copy-next, fit or random")
    ),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help=_recipe_help("max_steps", "Optimiser steps")),
    max_minutes: Optional[float] = typer.Option(
        None, "--max-minutes",
        help=_recipe_help("max_minutes", "Minutes of optimiser steps before training stops; the LR schedule "
                          "then follows time"),
    ),
    lr: Optional[float] = typer.Option(None, "--lr", help=_recipe_help("lr", "Peak AdamW learning rate")),
    warmup_ratio: Optional[float] = typer.Option(
        None, "--warmup-ratio", help=_recipe_help("warmup_ratio", "Share of the budget spent in linear warm-up")
    ),
    temperature: Optional[float] = typer.Option(
        None, "--temperature", help=_recipe_help("temperature", "Distillation temperature")
    ),
    hidden_loss_weight: Optional[float] = typer.Option(
        None, "--hidden-loss-weight",
        help=_recipe_help("hidden_loss_weight", "Weight of the hidden-state MSE added to the KL"),
    ),
    self_generated_tokens: Optional[int] = typer.Option(
        None, "--self-generated-tokens",
        help=_recipe_help("self_generated_tokens", "Tokens to sample from the base model and train on, with "
                          "prompts from --data; 0 turns it off"),
    ),
    batch_size: Optional[int] = typer.Option(
        None, "--batch-size", help=_recipe_help("batch_size", "Blocks per micro-batch on each process")
    ),
    grad_accum_steps: Optional[int] = typer.Option(
        None, "--grad-accum-steps", help=_recipe_help("grad_accum_steps", "Micro-batches per optimiser step")
    ),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help=_recipe_help("seq_len", "Tokens per training block")),
    precision: Optional[str] = typer.Option(
        None, "--precision", help=_recipe_help(
            "precision", "bf16 autocast, fp32, or auto: bf16 where the CPU or GPU has native bf16, else fp32"
        )
    ),
    seed: Optional[int] = typer.Option(None, "--seed", help=_recipe_help("seed", "Random seed")),
    save_every: Optional[int] = typer.Option(
        None, "--save-every", help=_recipe_help("save_every", "Steps between checkpoints")
    ),
    eval_every: Optional[int] = typer.Option(
        None, "--eval-every", help=_recipe_help("eval_every", "Steps between validation passes (0: at the end only)")
    ),
    eval_text: Optional[str] = typer.Option(
        None,
        "--eval-text",
        help="Text file for the perplexity table. Default: wikitext2_raw/wiki.test.raw under $BALCONY_DATA_DIR.",
    ),
    ppl_tokens: Optional[int] = typer.Option(
        None, "--ppl-tokens", help=_recipe_help("ppl_tokens", "Tokens of the eval text scored for perplexity")
    ),
    ppl_window: Optional[int] = typer.Option(
        None, "--ppl-window", help=_recipe_help("ppl_window", "Perplexity window, in tokens")
    ),
    no_perplexity: bool = typer.Option(False, "--no-perplexity", help="Skip the before/after perplexity table."),
    allow_base_mismatch: bool = typer.Option(
        False, "--allow-base-mismatch", help="With --resume, continue even if the base weights changed."
    ),
    json_path: Optional[str] = typer.Option(None, "--json", help="Write the run summary as JSON ('-': stdout)."),
) -> None:
    """Train the Balcony layers by self-distillation from the full model, then print a perplexity table."""
    from balcony_cli.recipe import load_recipe
    from balcony_cli.train import TrainRequest
    from balcony_cli.train import train as run_training

    overrides = {
        "exits": _parse_exits_for(model, exits) if exits is not None else None,
        "data": _absolute_if_local(data),
        "init": init,
        "max_steps": max_steps,
        "max_minutes": max_minutes,
        "lr": lr,
        "warmup_ratio": warmup_ratio,
        "temperature": temperature,
        "hidden_loss_weight": hidden_loss_weight,
        "self_generated_tokens": self_generated_tokens,
        "batch_size": batch_size,
        "grad_accum_steps": grad_accum_steps,
        "seq_len": seq_len,
        "precision": precision,
        "seed": seed,
        "save_every": save_every,
        "eval_every": eval_every,
        "eval_text": _absolute_if_local(eval_text),
        "ppl_tokens": ppl_tokens,
        "ppl_window": ppl_window,
    }
    resolved = load_recipe(recipe, overrides)
    if json_path and json_path != "-" and Path(json_path).exists() and not overwrite:
        raise BadInputError(f"--json {json_path!r}: the file exists; pass --overwrite or choose another path")
    request = TrainRequest(
        model=model, recipe=resolved, output_dir=output, resume=resume, overwrite=overwrite,
        perplexity=not no_perplexity,
        allow_base_mismatch=allow_base_mismatch,
    )
    show_progress = console.is_terminal and json_path != "-"
    result = run_training(request, progress=RichTrainingProgress() if show_progress else None)
    if not result.is_main_process:
        return
    if json_path:
        _write_json(
            json_path,
            _json_document({"model": model, "recipe": resolved.to_dict(), "output": str(output)},
                           result.base_fingerprint, **result.to_dict()),
            overwrite,
        )
    # With --json -, stdout carries only the JSON document, so the human-readable report goes to stderr.
    report = error_console if json_path == "-" else console
    if result.before is not None:
        report.print(perplexity_rich_table(result))
    elif request.perplexity:
        report.print(
            "No perplexity table: no eval text found. Pass --eval-text FILE or set BALCONY_DATA_DIR to a folder "
            "with wikitext2_raw/wiki.test.raw.",
            soft_wrap=True,
        )
    stopped = ""
    if result.stopped_by == "max_minutes":
        stopped = (
            f" (stopped by the {request.recipe.max_minutes:g}-minute budget after "
            f"{result.train_seconds / 60:.1f} minutes of steps)"
        )
    preparation = ""
    if result.preparation:
        parts = [f"{name.replace('_', ' ')} {part['seconds']:.1f} s" for name, part in result.preparation.items()]
        preparation = f" Preparation before training: {', '.join(parts)}."
    report.print(
        f"Trained {result.steps} steps on {result.train_tokens:,} tokens{stopped}: "
        f"{result.train_tokens_per_s:.0f} training tokens/s; teacher-only forward "
        f"{result.teacher_tokens_per_s:.0f} tokens/s.{preparation} Saved to {result.output_dir}.",
        soft_wrap=True,
    )


@app.command()
@_handle_errors
def export(
    checkpoint: Path = typer.Option(DEFAULT_OUTPUT, "--checkpoint", "-c", help="Balcony checkpoint directory."),
    exit: str = typer.Option(..., "--exit", help="Exit to export (a layer index), or 'all' for one subfolder each."),
    output: Path = typer.Option(..., "--output", "-o", help="Directory to write the exported model to."),
    format: str = typer.Option(
        "hf", "--format", help="Output format: hf (a Hugging Face model directory) or gguf (one GGUF file)."
    ),
    gguf_type: Optional[str] = typer.Option(
        None, "--gguf-type", help="With --format gguf: tensor type f32, f16 or q8_0. Default f16."
    ),
    eval_json: Optional[Path] = typer.Option(
        None, "--eval-json", help="Add the table of this `balcony eval --json` document to the model card."
    ),
    bench_json: Optional[Path] = typer.Option(
        None, "--bench-json", help="Add the table of this `balcony bench --json` document to the model card."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output directory."),
    allow_base_mismatch: bool = typer.Option(
        False, "--allow-base-mismatch", help="Load the checkpoint even if the base weights differ from training."
    ),
    json_path: Optional[str] = typer.Option(None, "--json", help="Write what was exported as JSON ('-': stdout)."),
) -> None:
    """Export one exit as a plain model of the base's architecture that transformers loads without Balcony."""
    from balcony_cli.checkpoint import read_balcony_config
    from balcony_cli.export import export as export_exits

    exit_value: int | str = exit.strip()
    if exit_value != "all":
        try:
            exit_value = int(exit_value)
        except ValueError:
            raise BadInputError(f"--exit {exit!r}: expected a layer index such as 20, or 'all'") from None
    if json_path and json_path != "-" and Path(json_path).exists() and not overwrite:
        raise BadInputError(f"--json {json_path!r}: the file exists; pass --overwrite or choose another path")
    results = export_exits(checkpoint, exit_value, output, format=format, overwrite=overwrite,
                           allow_base_mismatch=allow_base_mismatch, gguf_type=gguf_type, eval_json=eval_json,
                           bench_json=bench_json)
    rows = [
        {"exit": r.exit, "directory": str(r.directory), "format": r.format, "gguf_file": r.gguf_file,
         "gguf_type": r.gguf_type, "weights_bytes": r.weights_bytes, "num_layers": r.num_layers,
         "parameters": r.parameters, "full_parameters": r.full_parameters, "trained": r.trained}
        for r in results
    ]
    if json_path:
        settings = {"checkpoint": str(checkpoint), "exit": exit_value, "output": str(output), "format": format,
                    "gguf_type": results[0].gguf_type if results else gguf_type,
                    "eval_json": str(eval_json) if eval_json else None,
                    "bench_json": str(bench_json) if bench_json else None}
        fingerprint = read_balcony_config(checkpoint)["base_fingerprint"]
        _write_json(json_path, _json_document(settings, fingerprint, exports=rows), overwrite)
    if json_path == "-":
        return
    table = Table(title=f"Exported from {checkpoint}")
    for column in ("exit", "directory", "format", "layers", "parameters", "of full model", "weights size"):
        table.add_column(column)
    for row in rows:
        kind = f"gguf {row['gguf_type']}" if row["format"] == "gguf" else row["format"]
        share = f"{row['parameters'] / row['full_parameters']:.0%}"
        size = f"{row['weights_bytes'] / 2**20:,.1f} MiB"
        table.add_row(str(row["exit"]), row["directory"], kind, str(row["num_layers"]), f"{row['parameters']:,}",
                      share, size)
    console.print(table)


def _int_list(flag: str, text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise BadInputError(f"{flag} {text!r}: expected a comma list of integers such as 128,512") from None


def _checkpoint_exits(checkpoint: Path, exits: str | None, exit: str | None) -> list[int] | None:
    """Resolve --exits or --exit against the checkpoint's exits; None means all of them."""
    from balcony_cli.checkpoint import read_balcony_config

    if exits is not None and exit is not None:
        raise BadInputError("--exit and --exits both given; --exit K is short for --exits K, so pass one")
    text = exits if exits is not None else exit
    if text is None or text.strip() == "all":
        return None
    config = read_balcony_config(checkpoint)
    values = _int_list("--exits", text)
    missing = [k for k in values if k not in config["exits"]]
    if missing or not values:
        raise BadInputError(f"--exits {text}: this checkpoint has exits {','.join(map(str, config['exits']))}")
    return values


def _print_wide(table: Table) -> None:
    """Print a table of many columns; in a pipe or log, where rich assumes 80 columns, allow 160."""
    if console.is_terminal:
        console.print(table)
        return
    # Rich caps print(width=...) at the console's own width, so a wider console is made for the pipe.
    Console(width=max(console.width, 160)).print(table)


def _check_new_file(flag: str, path: str | None, overwrite: bool) -> None:
    """Reject an existing output file before a long run, unless --overwrite is given."""
    if path and path != "-" and Path(path).exists() and not overwrite:
        raise BadInputError(f"{flag} {path!r}: the file exists; pass --overwrite or choose another path")


def _format_metric(task: dict[str, Any] | None) -> str:
    if task is None:
        return "-"
    metrics = task["metrics"]
    value = metrics[task["primary"]]
    stderr = metrics.get(f"{task['primary']}_stderr")
    return f"{value:.3f}" if stderr is None else f"{value:.3f} ± {stderr:.3f}"


def eval_rich_table(result, tasks: list[str], title: str) -> Table:
    table = Table(title=title)
    table.add_column("row")
    for name in tasks:
        primary = result.rows[0].tasks[name]["primary"] if result.rows[0].tasks else ""
        table.add_column(f"{name}\n{primary}", justify="right")
    if tasks:
        table.add_column("average", justify="right")
    if any(row.perplexity for row in result.rows):
        table.add_column("perplexity", justify="right")
    for column in ("layers", "parameters", "relative compute"):
        table.add_column(column, justify="right")
    for row in result.rows:
        cells = [row.name, *(_format_metric(row.tasks.get(name)) for name in tasks)]
        if tasks:
            cells.append(f"{row.average:.3f}")
        if row.perplexity:
            cells.append(_format_ppl(row.perplexity["value"]))
        cells += [str(row.layers), f"{row.parameters / 1e6:,.1f} M", f"{row.relative_compute:.3f}"]
        table.add_row(*cells)
    return table


@app.command("eval")
@_handle_errors
def eval_command(
    checkpoint: Path = typer.Option(DEFAULT_OUTPUT, "--checkpoint", "-c", help="Balcony checkpoint directory."),
    tasks: str = typer.Option(
        "", "--tasks", help="Comma-separated lm-evaluation-harness tasks, e.g. hellaswag,arc (arc_easy + "
        "arc_challenge). Offline: hellaswag, arc_easy, arc_challenge, arc, piqa, winogrande, boolq, "
        "lambada_openai, openbookqa."
    ),
    exits: Optional[str] = typer.Option(None, "--exits", help="Exits to evaluate (comma list); default all."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Examples per task; default the whole split."),
    data_dir: Optional[Path] = typer.Option(
        None, "--data-dir", help="Folder of local task files (default $BALCONY_DATA_DIR); without one, hub datasets."
    ),
    perplexity: Optional[Path] = typer.Option(
        None, "--perplexity", help="Text file to score each row's perplexity on, e.g. wikitext2_raw/wiki.test.raw."
    ),
    ppl_tokens: int = typer.Option(20000, "--ppl-tokens", help="Tokens of the --perplexity text scored."),
    ppl_window: int = typer.Option(512, "--ppl-window", help="Perplexity window, in tokens."),
    baselines: str = typer.Option(
        "", "--baselines", help="Rows at each exit's depth: naive (no Balcony layer), prune (ShortGPT-style)."
    ),
    calibration_text: Optional[Path] = typer.Option(
        None, "--calibration-text", help="Text for the pruning score; default the first Gutenberg book under "
        "$BALCONY_DATA_DIR."
    ),
    batch_size: int = typer.Option(8, "--batch-size", help="Sequences per forward pass."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16."),
    allow_base_mismatch: bool = typer.Option(
        False, "--allow-base-mismatch", help="Load the checkpoint even if the base weights differ from training."
    ),
    json_path: Optional[str] = typer.Option(None, "--json", help="Write every row as JSON ('-': stdout)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --json file."),
) -> None:
    """Evaluate the full model, every exit and the baselines with lm-evaluation-harness and perplexity."""
    from balcony_cli.baselines import default_calibration_text
    from balcony_cli.checkpoint import read_balcony_config
    from balcony_cli.evaluate import EvalRequest, evaluate
    from balcony_cli.offline_tasks import expand_task_names, resolve_data_dir

    _check_new_file("--json", json_path, overwrite)
    read_balcony_config(checkpoint)
    data_path = resolve_data_dir(data_dir)
    task_names = expand_task_names(tasks, offline=data_path is not None) if tasks.strip() else []
    exit_list = _checkpoint_exits(checkpoint, exits, None)
    baseline_list = [b.strip() for b in baselines.split(",") if b.strip()]
    request = EvalRequest(
        checkpoint=checkpoint, tasks=task_names, data_dir=data_path, limit=limit, exits=exit_list,
        baselines=baseline_list, perplexity_text=perplexity, ppl_tokens=ppl_tokens, ppl_window=ppl_window,
        calibration_text=calibration_text or (default_calibration_text() if "prune" in baseline_list else None),
        batch_size=batch_size, device=device, dtype=dtype, allow_base_mismatch=allow_base_mismatch,
    )
    request.validate()
    if not _state["debug"]:
        # The harness logs every task's setup at WARNING; the table reports what matters.
        logging.getLogger("lm_eval").setLevel(logging.ERROR)

    def on_row(name: str, index: int, total: int) -> None:
        if console.is_terminal:
            console.rule(f"[bold]{name}[/bold] ({index + 1}/{total})")
        else:
            logger.info("evaluating %s (%d/%d)", name, index + 1, total)

    result = evaluate(request, on_row=on_row, progress=console.is_terminal)
    settings = {key: (str(value) if isinstance(value, Path) else value)
                for key, value in dataclasses.asdict(request).items()}
    if json_path:
        _write_json(json_path, _json_document(settings, result.base_fingerprint, checkpoint=result.checkpoint,
                                              versions=result.versions, rows=result.rows_json()), overwrite)
    if json_path == "-":
        return
    limit_text = f"{limit} examples per task" if limit else "whole splits"
    title = f"{checkpoint}: {limit_text}" + (", local data" if data_path else "")
    _print_wide(eval_rich_table(result, task_names, title))
    if data_path and task_names:
        console.print("Local HellaSwag and ARC files differ slightly from the hub versions (see the README), so "
                      "scores are close to, not equal to, published harness numbers.", style="dim")


def bench_rich_table(result) -> Table:
    hardware = result.hardware
    table = Table(title=f"Speed on {hardware['device']} ({hardware['threads']} threads): medians of repeats")
    rows = result.rows
    lengths = list(rows[0]["prefill"])
    batches = list(rows[0]["decode"])
    table.add_column("row")
    table.add_column("layers", justify="right")
    for length in lengths:
        table.add_column(f"prefill {length}\n(ms)", justify="right")
    table.add_column("first token\n(ms)", justify="right")
    for batch in batches:
        table.add_column(f"decode b={batch}\n(tok/s)", justify="right")
    table.add_column(f"speedup\nb={batches[0]}", justify="right")
    table.add_column("FLOP\nideal", justify="right")
    table.add_column("achieved\n/ ideal", justify="right")
    table.add_column("KV cache\n(layers, B/token)", justify="right")
    table.add_column("peak memory\n(MiB)", justify="right")
    for row in rows:
        table.add_row(
            row["name"], str(row["layers"]),
            *(f"{row['prefill'][n]['median_s'] * 1e3:,.1f}" for n in lengths),
            f"{row['time_to_first_token_s']['median'] * 1e3:,.1f}",
            *(f"{row['decode'][b]['tokens_per_s']['median']:,.1f}" for b in batches),
            f"{row['speedup']['decode']:.2f}x", f"{row['ideal_speedup']:.2f}x",
            f"{row['speedup']['achieved_over_ideal']:.2f}",
            f"{row['kv_cache']['layers']}, {row['kv_cache']['bytes_per_token']:,}",
            f"{row['peak_memory_bytes'] / 2**20:,.0f}",
        )
    return table


@app.command("bench")
@_handle_errors
def bench_command(
    checkpoint: Path = typer.Option(DEFAULT_OUTPUT, "--checkpoint", "-c", help="Balcony checkpoint directory."),
    exits: Optional[str] = typer.Option(None, "--exits", help="Exits to measure (comma list) or 'all' (default)."),
    exit: Optional[str] = typer.Option(None, "--exit", help="One exit to measure; short for --exits K."),
    baselines: str = typer.Option("", "--baselines", help="Also measure naive and/or prune rows (comma list)."),
    prompt_lengths: str = typer.Option("128,512,2048", "--prompt-lengths", help="Prefill lengths, in tokens."),
    batch_sizes: str = typer.Option("1,8", "--batch-sizes", help="Decode batch sizes; speedups use the first."),
    decode_prompt: int = typer.Option(128, "--decode-prompt", help="Prompt tokens before decoding and for TTFT."),
    new_tokens: int = typer.Option(32, "--new-tokens", help="Decode steps timed per repeat."),
    repeats: int = typer.Option(5, "--repeats", help="Timed repeats per figure (the median is reported)."),
    warmup: int = typer.Option(1, "--warmup", help="Untimed runs before the repeats."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for torch; default torch's choice."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16."),
    calibration_text: Optional[Path] = typer.Option(
        None, "--calibration-text", help="Text for the pruning score; default the first Gutenberg book under "
        "$BALCONY_DATA_DIR."
    ),
    eval_json: Optional[Path] = typer.Option(None, "--eval-json", help="A `balcony eval --json` file for --plot."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write the speed/accuracy trade-off plot (PNG)."),
    allow_base_mismatch: bool = typer.Option(
        False, "--allow-base-mismatch", help="Load the checkpoint even if the base weights differ from training."
    ),
    json_path: Optional[str] = typer.Option(None, "--json", help="Write every figure as JSON ('-': stdout)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing --json and --plot files."),
    speculative: bool = typer.Option(
        False, "--speculative", help="Compare plain, self-speculative and transformers' assistant_early_exit "
        "greedy decoding on --prompts instead."
    ),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="With --speculative: one prompt per line."),
    draft_exits: Optional[str] = typer.Option(
        None, "--draft-exits", help="With --speculative: exits that draft (comma list); default all."
    ),
    draft_tokens: str = typer.Option("1,4", "--draft-tokens", help="With --speculative: draft lengths to try."),
    assistant_tokens: int = typer.Option(
        4, "--assistant-tokens", help="With --speculative: num_assistant_tokens for assistant_early_exit."
    ),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", help="With --speculative: tokens per prompt."),
) -> None:
    """Measure prefill, decode, time to first token and memory of the full model and every exit."""
    from balcony_cli.baselines import default_calibration_text
    from balcony_cli.bench import BenchRequest, bench, plot_tradeoff, read_eval_document

    _check_new_file("--json", json_path, overwrite)
    if speculative:
        _bench_speculative(checkpoint, prompts, draft_exits, draft_tokens, assistant_tokens, max_new_tokens,
                           threads, device, dtype, allow_base_mismatch, json_path, overwrite)
        return
    if prompts is not None:
        raise BadInputError("--prompts is for --speculative; pass --speculative too, or drop --prompts")
    _check_new_file("--plot", str(plot) if plot else None, overwrite)
    if plot is not None and eval_json is None:
        raise BadInputError("--plot needs --eval-json: the plot's accuracies come from a `balcony eval --json` file")
    if plot is not None and plot.suffix.lower() != ".png":
        raise BadInputError(f"--plot {str(plot)!r}: expected a .png file name")
    if eval_json is not None and not eval_json.is_file():
        raise BadInputError(f"--eval-json {str(eval_json)!r}: file not found. Run `balcony eval --json` first")
    baseline_list = [b.strip() for b in baselines.split(",") if b.strip()]
    request = BenchRequest(
        checkpoint=checkpoint, exits=_checkpoint_exits(checkpoint, exits, exit), baselines=baseline_list,
        prompt_lengths=_int_list("--prompt-lengths", prompt_lengths),
        batch_sizes=_int_list("--batch-sizes", batch_sizes), decode_prompt=decode_prompt, new_tokens=new_tokens,
        repeats=repeats, warmup=warmup, threads=threads, device=device, dtype=dtype,
        calibration_text=calibration_text or (default_calibration_text() if "prune" in baseline_list else None),
        allow_base_mismatch=allow_base_mismatch,
    )
    request.validate()
    eval_document = None
    if eval_json is not None:
        from balcony_cli.checkpoint import checkpoint_fingerprint

        # Checked before the measurements, so that a wrong file fails in seconds, not minutes.
        identity = {"path": str(checkpoint.resolve()), "fingerprint": checkpoint_fingerprint(checkpoint)}
        eval_document = read_eval_document(eval_json, identity)

    def on_row(name: str, index: int, total: int) -> None:
        if console.is_terminal:
            console.print(f"[bold]{name}[/bold] ({index + 1}/{total})")
        else:
            logger.info("measuring %s (%d/%d)", name, index + 1, total)

    result = bench(request, on_row=on_row)
    settings = {key: (str(value) if isinstance(value, Path) else value)
                for key, value in dataclasses.asdict(request).items()}
    if plot is not None:
        from balcony_cli.checkpoint import atomic_write_bytes

        temporary = plot.with_name(f".{plot.name}.tmp.png")
        plot_tradeoff(temporary, result.rows, eval_document, title=f"{result.checkpoint['base_model']}: "
                      f"speed against accuracy ({result.hardware['device']})")
        atomic_write_bytes(plot, temporary.read_bytes())
        temporary.unlink()
    if json_path:
        _write_json(json_path, _json_document(settings, result.base_fingerprint, hardware=result.hardware,
                                              dtype=request.dtype, checkpoint=result.checkpoint,
                                              components=result.components, rows=result.rows), overwrite)
    if json_path == "-":
        return
    _print_wide(bench_rich_table(result))
    parts = result.components
    console.print(
        "Measured parts of one decode token: embedding "
        f"{parts['embedding']['median'] * 1e3:.3f} ms, one decoder layer {parts['decoder_layer']['median'] * 1e3:.3f} ms, "
        f"norm + LM head {parts['norm_and_head']['median'] * 1e3:.3f} ms.", highlight=False,
    )
    if plot is not None:
        console.print(f"Wrote the trade-off plot to {plot}")


@app.command("generate-data")
@_handle_errors
def generate_data_command(
    model: str = typer.Argument(..., help="Base model: smollm2-135m, a .gguf file, a local directory or a hub id."),
    prompts_from: str = typer.Option(
        ..., "--prompts-from", help="Text whose paragraph starts become prompts: files, folders or globs, as --data."
    ),
    output: Path = typer.Option(..., "--output", "-o", help="Directory to write self-generated.jsonl into."),
    tokens: int = typer.Option(..., "--tokens", help="Generated tokens to write (prompts not counted)."),
    prompt_tokens: int = typer.Option(16, "--prompt-tokens", help="Tokens of each paragraph start used as a prompt."),
    new_tokens: int = typer.Option(128, "--new-tokens", help="Most tokens sampled after each prompt."),
    batch_size: int = typer.Option(16, "--batch-size", help="Prompts sampled together."),
    temperature: float = typer.Option(1.0, "--temperature", help="Sampling temperature; 1 follows the model."),
    seed: int = typer.Option(0, "--seed", help="Seed for prompt choice and sampling."),
    text_field: str = typer.Option("text", "--text-field", help="Column holding the text in .jsonl/.parquet input."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output directory."),
    json_path: Optional[str] = typer.Option(None, "--json", help="Write the generation report as JSON ('-': stdout)."),
) -> None:
    """Sample training text from the base model itself (on-policy data), for `balcony train --data DIR`."""
    from balcony_cli.selfgen import GenerateDataRequest, GenerationSettings, generate_data

    _check_new_file("--json", json_path, overwrite)
    settings = GenerationSettings(tokens=tokens, prompt_tokens=prompt_tokens, new_tokens=new_tokens,
                                  batch_size=batch_size, temperature=temperature, seed=seed)
    request = GenerateDataRequest(model=model, prompts_from=_absolute_if_local(prompts_from), output_dir=output,
                                  settings=settings, text_field=text_field, overwrite=overwrite)
    result = generate_data(request)
    if json_path:
        _write_json(json_path, _json_document({"model": model, "output": str(output), **result.to_dict()}, None),
                    overwrite)
    if json_path != "-":
        console.print(
            f"Wrote {result.generated_tokens:,} generated tokens in {result.documents:,} documents to {result.path} "
            f"in {result.seconds:.1f} s ({result.tokens_per_s:.0f} tokens/s). Train on them with --data {output}.",
            soft_wrap=True,
        )


@app.command("study")
@_handle_errors
def study_command(
    study_file: Path = typer.Argument(..., help="Study file (YAML): model, budget, evaluation protocol and rows."),
    output: Optional[Path] = typer.Option(
        None, "--output", "-o", help="Folder for run directories and per-row results; overrides the study file."
    ),
    rows: Optional[str] = typer.Option(None, "--rows", help="Comma list of row names to run; default all."),
    data_dir: Optional[Path] = typer.Option(
        None, "--data-dir", help="Folder laid out like the shared data folder; default $BALCONY_DATA_DIR."
    ),
    json_path: Optional[str] = typer.Option(None, "--json", help="Write the results table as JSON ('-': stdout)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --json file."),
) -> None:
    """Train each row of a study at the same time budget, evaluate each the same way, and write one table.

    Rows with stored results are skipped, so an interrupted study continues where it stopped.
    """
    from balcony_cli.offline_tasks import resolve_data_dir
    from balcony_cli.study import StudyRequest, run_study

    _check_new_file("--json", json_path, overwrite)
    data_path = resolve_data_dir(data_dir)
    if data_path is None:
        raise BadInputError("no data folder: pass --data-dir DIR or set BALCONY_DATA_DIR; the study evaluates "
                            "from local task files")
    only = [name.strip() for name in rows.split(",") if name.strip()] if rows else None
    if not _state["debug"]:
        logging.getLogger("lm_eval").setLevel(logging.ERROR)

    def on_row(name: str, index: int, total: int) -> None:
        if console.is_terminal:
            console.rule(f"[bold]{name}[/bold] ({index + 1}/{total})")
        else:
            logger.info("evaluating %s (%d/%d)", name, index + 1, total)

    result = run_study(StudyRequest(study_path=study_file, data_dir=data_path, output_dir=output, only=only),
                       on_row=on_row)
    if json_path:
        _write_json(json_path, json.loads(result.table_json.read_text()), overwrite)
    if json_path == "-":
        return
    skipped = f" Reused stored results for {', '.join(result.skipped)}." if result.skipped else ""
    plot = f" Validation KL plot: {result.plot}." if result.plot else ""
    console.print(f"Wrote {result.table_markdown} and {result.table_json} ({len(result.rows)} rows).{skipped}{plot}",
                  soft_wrap=True)


@app.command("plot-kl")
@_handle_errors
def plot_kl_command(
    runs: list[str] = typer.Argument(..., help="Run directories of `balcony train`, each as DIR or LABEL=DIR."),
    output: Path = typer.Option(..., "--output", "-o", help="PNG file to write."),
    exits: Optional[str] = typer.Option(None, "--exits", help="Exits to draw (comma list); default all found."),
    title: Optional[str] = typer.Option(None, "--title", help="Figure title."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing PNG file."),
) -> None:
    """Plot validation KL against training tokens for several runs, one panel per exit."""
    from balcony_cli.plots import plot_validation_kl

    _check_new_file("--output", str(output), overwrite)
    if output.suffix.lower() != ".png":
        raise BadInputError(f"--output {str(output)!r}: expected a .png file name")
    labelled: dict[str, Path] = {}
    for run in runs:
        label, _, directory = run.rpartition("=") if "=" in run else (Path(run).name, "", run)
        if label in labelled:
            raise BadInputError(f"{run!r}: the label {label!r} is used twice; label runs as LABEL=DIR")
        labelled[label] = Path(directory)
    exit_list = _int_list("--exits", exits) if exits else None
    drawn = plot_validation_kl(labelled, output, exits=exit_list, title=title)
    console.print(f"Wrote {output}: validation KL of {len(labelled)} runs at exits {', '.join(map(str, drawn))}.")
@app.command()
@_handle_errors
def generate(
    prompt: str = typer.Argument(..., help="The text to continue."),
    checkpoint: Path = typer.Option(DEFAULT_OUTPUT, "--checkpoint", "-c", help="Balcony checkpoint directory."),
    exit: Optional[int] = typer.Option(
        None, "--exit", help="Exit (layer index) to generate with. Default: the full model."
    ),
    budget: Optional[float] = typer.Option(
        None, "--budget",
        help="Fraction of the full model's compute per token, in (0, 1]: use the deepest exit that fits.",
    ),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", help="Maximum number of tokens to generate."),
    temperature: float = typer.Option(
        0.0, "--temperature", help="Sampling temperature; 0 means greedy decoding."
    ),
    top_p: float = typer.Option(
        1.0, "--top-p", help="Nucleus sampling probability mass, in (0, 1]. Needs --temperature above 0."
    ),
    seed: int = typer.Option(0, "--seed", help="Random seed for sampling."),
    chat_template: bool = typer.Option(
        False, "--chat-template/--no-chat-template",
        help="Wrap the prompt as a user message in the tokenizer's chat template.",
    ),
    speculative: bool = typer.Option(
        False, "--speculative",
        help="Draft tokens with --draft-exit and verify them with the full model: the full model's output.",
    ),
    draft_exit: Optional[int] = typer.Option(
        None, "--draft-exit", help="With --speculative: the exit that drafts."
    ),
    draft_tokens: Optional[int] = typer.Option(
        None, "--draft-tokens", help="With --speculative: tokens drafted per round. Default 4."
    ),
    allow_base_mismatch: bool = typer.Option(
        False, "--allow-base-mismatch",
        help="Load the checkpoint even if the base weights differ from training.",
    ),
    json_path: Optional[str] = typer.Option(
        None, "--json", help="Write the text and figures as JSON ('-': stdout)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --json file."),
) -> None:
    """Generate text at an exit, at a compute budget, or self-speculatively with the full model's output."""
    from balcony_cli.generate import GenerationSettings
    from balcony_cli.generate import generate as generate_from_checkpoint

    settings = GenerationSettings(
        exit=exit, budget=budget, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
        seed=seed, chat_template=chat_template, speculative=speculative, draft_exit=draft_exit,
        draft_tokens=draft_tokens,
    )
    if json_path and json_path != "-" and Path(json_path).exists() and not overwrite:
        raise BadInputError(f"--json {json_path!r}: the file exists; pass --overwrite or choose another path")
    streaming = json_path != "-"

    def write_text(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    result, config = generate_from_checkpoint(
        checkpoint, prompt, settings, allow_base_mismatch=allow_base_mismatch,
        on_text=write_text if streaming else None,
    )
    if streaming:
        sys.stdout.write("\n")
        sys.stdout.flush()
    if json_path:
        document_settings = {"checkpoint": str(checkpoint), **dataclasses.asdict(settings)}
        fingerprint = config["base_fingerprint"]
        document = _json_document(document_settings, fingerprint, prompt=prompt, **result.to_dict())
        _write_json(json_path, document, overwrite)
    # The statistics go to stderr, so that stdout carries only the generated text (or the JSON document).
    row = "full model" if result.exit is None else f"exit {result.exit}"
    summary = (
        f"{row} ({result.layers} of {result.num_layers} layers): {result.new_tokens} new tokens in "
        f"{result.seconds:.2f} s, {result.tokens_per_s:.1f} tokens/s, stopped at {result.finish_reason}"
    )
    if result.speculative is not None:
        figures = result.speculative
        rate = figures["acceptance_rate"]
        summary += (
            f"; self-speculative with exit {figures['draft_exit']} drafting {figures['draft_tokens']} "
            "tokens per round: "
            f"acceptance rate {'-' if rate is None else f'{rate:.0%}'} ({figures['accepted']} of "
            f"{figures['drafted']} drafted), {figures['tokens_per_full_pass']:.2f} tokens per full-model pass"
        )
    error_console.print(summary, highlight=False, soft_wrap=True)


def _bench_speculative(checkpoint, prompts, draft_exits, draft_tokens, assistant_tokens, max_new_tokens,
                       threads, device, dtype, allow_base_mismatch, json_path, overwrite) -> None:
    """Run `balcony bench --speculative`: plain, self-speculative and assisted decoding on the same prompts."""
    import torch

    from balcony_cli.checkpoint import base_source, load_balcony, read_balcony_config
    from balcony_cli.loading import load_tokenizer
    from balcony_cli.speculative_bench import benchmark_speculative, read_prompts

    if prompts is None:
        raise BadInputError("--speculative needs --prompts FILE (one prompt per line), such as "
                            "benchmarks/prompts.txt")
    prompt_list = read_prompts(prompts)
    exits_list = _checkpoint_exits(checkpoint, draft_exits, None) or read_balcony_config(checkpoint)["exits"]
    lengths = _int_list("--draft-tokens", draft_tokens)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BadInputError(f"--device {device}: no CUDA GPU is available; use --device cpu")
    if threads is not None:
        torch.set_num_threads(threads)
    model, config = load_balcony(checkpoint, dtype=getattr(torch, dtype), allow_base_mismatch=allow_base_mismatch)
    model.to(device)
    tokenizer = load_tokenizer(base_source(config))
    result = benchmark_speculative(model, tokenizer, prompt_list, exits_list, lengths, max_new_tokens=max_new_tokens,
                                   assistant_tokens=assistant_tokens)
    if json_path:
        settings = {"checkpoint": str(checkpoint), "prompts": str(prompts), "draft_exits": exits_list,
                    "draft_tokens": lengths, "assistant_tokens": assistant_tokens, "max_new_tokens": max_new_tokens,
                    "threads": torch.get_num_threads(), "device": device, "dtype": dtype}
        _write_json(json_path, _json_document(settings, config["base_fingerprint"], **result.to_dict()), overwrite)
    if json_path == "-":
        return
    table = Table(title=f"{len(prompt_list)} prompts x {max_new_tokens} new tokens, greedy, "
                  f"{result.threads} threads, {result.device}")
    for column in ("setting", "tokens/s", "speedup", "acceptance", "tokens per full pass", "identical"):
        table.add_column(column, justify="left" if column == "setting" else "right")
    for row in result.rows:
        table.add_row(
            row.name, f"{row.tokens_per_s:.2f}", f"{row.speedup:.2f}x" if row.speedup else "-",
            f"{row.acceptance_rate:.1%}" if row.acceptance_rate is not None else "-",
            f"{row.tokens_per_full_pass:.2f}" if row.tokens_per_full_pass is not None else "-",
            "yes" if row.identical else f"no (prompts {','.join(map(str, row.mismatched_prompts))})",
        )
    _print_wide(table)
    for k, value in result.agreement.items():
        console.print(f"greedy agreement with the full model: exit {k} {value:.1%}, naive exit {k} "
                      f"{result.naive_agreement[k]:.1%}", highlight=False)


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()
