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
from balcony_cli.recipe import Recipe

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
    init: str = typer.Option("copy-last", "--init", help="Balcony layer initialisation: copy-last or random."),
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
    init: Optional[str] = typer.Option(None, "--init", help=_recipe_help("init", "Balcony layer initialisation")),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help=_recipe_help("max_steps", "Optimiser steps")),
    lr: Optional[float] = typer.Option(None, "--lr", help=_recipe_help("lr", "Peak AdamW learning rate")),
    batch_size: Optional[int] = typer.Option(
        None, "--batch-size", help=_recipe_help("batch_size", "Blocks per micro-batch on each process")
    ),
    grad_accum_steps: Optional[int] = typer.Option(
        None, "--grad-accum-steps", help=_recipe_help("grad_accum_steps", "Micro-batches per optimiser step")
    ),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help=_recipe_help("seq_len", "Tokens per training block")),
    precision: Optional[str] = typer.Option(
        None, "--precision", help=_recipe_help("precision", "fp32, or bf16 autocast")
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
        "lr": lr,
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
    report.print(
        f"Trained {result.steps} steps on {result.train_tokens:,} tokens: {result.train_tokens_per_s:.0f} "
        f"training tokens/s; teacher-only forward {result.teacher_tokens_per_s:.0f} tokens/s. "
        f"Saved to {result.output_dir}.",
        soft_wrap=True,
    )


@app.command()
@_handle_errors
def export(
    checkpoint: Path = typer.Option(DEFAULT_OUTPUT, "--checkpoint", "-c", help="Balcony checkpoint directory."),
    exit: str = typer.Option(..., "--exit", help="Exit to export (a layer index), or 'all' for one subfolder each."),
    output: Path = typer.Option(..., "--output", "-o", help="Directory to write the exported model to."),
    format: str = typer.Option("hf", "--format", help="Output format: hf (a Hugging Face model directory)."),
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
                           allow_base_mismatch=allow_base_mismatch)
    rows = [
        {"exit": r.exit, "directory": str(r.directory), "num_layers": r.num_layers, "parameters": r.parameters,
         "full_parameters": r.full_parameters, "trained": r.trained}
        for r in results
    ]
    if json_path:
        settings = {"checkpoint": str(checkpoint), "exit": exit_value, "output": str(output), "format": format}
        fingerprint = read_balcony_config(checkpoint)["base_fingerprint"]
        _write_json(json_path, _json_document(settings, fingerprint, exports=rows), overwrite)
    if json_path == "-":
        return
    table = Table(title=f"Exported from {checkpoint}")
    for column in ("exit", "directory", "layers", "parameters", "of full model"):
        table.add_column(column)
    for row in rows:
        table.add_row(str(row["exit"]), row["directory"], str(row["num_layers"]), f"{row['parameters']:,}",
                      f"{row['parameters'] / row['full_parameters']:.0%}")
    console.print(table)


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


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()
