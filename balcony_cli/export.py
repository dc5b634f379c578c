"""`balcony export`: write one exit as a plain model of the base's own architecture.

Exit k is already an instance of the base class with k + 1 layers (see BalconyModel.exit_model), so
transformers' save_pretrained writes it as is: layer indices 0..k, a config with
num_hidden_layers = k + 1 and per-layer lists cut to match, tied embeddings kept tied.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from balcony_cli.checkpoint import (
    atomic_directory,
    base_source,
    check_output_dir,
    load_balcony,
    read_balcony_config,
)
from balcony_cli.errors import BadInputError
from balcony_cli.loading import ModelSource, load_tokenizer
from balcony_cli.model import BalconyModel
from balcony_cli.model_card import CardFacts, model_card, read_results_document

logger = logging.getLogger(__name__)

FORMATS = ("hf",)


@dataclass
class ExportedExit:
    exit: int
    directory: Path
    num_layers: int
    parameters: int
    full_parameters: int
    trained: bool


def _parameter_count(model) -> int:
    """Count unique parameters, so tied embeddings count once."""
    seen, total = set(), 0
    for param in model.parameters():
        if id(param) not in seen:
            seen.add(id(param))
            total += param.numel()
    return total


def _export_one(
    model: BalconyModel,
    config: dict,
    source: ModelSource,
    k: int,
    directory: Path,
    evaluation: dict | None,
    benchmark: dict | None,
) -> ExportedExit:
    view = model.exit_model(k)
    view.save_pretrained(directory)
    load_tokenizer(source).save_pretrained(directory)
    exported = ExportedExit(
        exit=k,
        directory=directory,
        num_layers=view.config.num_hidden_layers,
        parameters=_parameter_count(view),
        full_parameters=_parameter_count(model.base),
        trained=bool(config.get("trained")),
    )
    facts = CardFacts(
        exit=k,
        num_layers=exported.num_layers,
        parameters=exported.parameters,
        full_parameters=exported.full_parameters,
        trained=exported.trained,
    )
    (directory / "README.md").write_text(model_card(config, facts, evaluation, benchmark))
    return exported


def export(
    checkpoint: Path,
    exit: int | str,
    output: Path,
    format: str = "hf",
    overwrite: bool = False,
    allow_base_mismatch: bool = False,
    eval_json: Path | None = None,
    bench_json: Path | None = None,
) -> list[ExportedExit]:
    """Export exit `exit` (or every exit, for "all") of a checkpoint into `output`.

    With "all", each exit goes into its own subfolder `exit-K`. The output appears atomically.
    `eval_json` and `bench_json` add the tables of `balcony eval --json` and `balcony bench --json`
    documents of the same checkpoint to the model card.
    """
    if format not in FORMATS:
        raise BadInputError(f"--format {format!r}: expected one of {', '.join(FORMATS)}")
    check_output_dir(output, overwrite=overwrite)
    config = read_balcony_config(checkpoint)
    exits = list(config["exits"]) if exit == "all" else [int(exit)]
    for k in exits:
        if k not in config["exits"]:
            raise BadInputError(
                f"--exit {k}: checkpoint {str(checkpoint)!r} has exits {','.join(map(str, config['exits']))}; "
                "pick one of them or 'all'"
            )
    evaluation = read_results_document(eval_json, "eval", checkpoint, config) if eval_json else None
    benchmark = read_results_document(bench_json, "bench", checkpoint, config) if bench_json else None
    if not config.get("trained"):
        logger.warning("checkpoint %s is untrained; the model card marks the export as untrained", checkpoint)

    model, config = load_balcony(checkpoint, allow_base_mismatch=allow_base_mismatch)
    source = base_source(config)
    results = []
    with atomic_directory(output, overwrite=overwrite) as directory:
        for k in exits:
            target = directory / f"exit-{k}" if exit == "all" else directory
            target.mkdir(parents=True, exist_ok=True)
            results.append(_export_one(model, config, source, k, target, evaluation, benchmark))
    # Point the results at the final location, not the temporary directory they were written to.
    for result in results:
        result.directory = output / f"exit-{result.exit}" if exit == "all" else output
    return results
