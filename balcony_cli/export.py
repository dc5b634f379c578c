"""`balcony export`: write one exit as a plain model of the base's own architecture.

Exit k is already an instance of the base class with k + 1 layers (see BalconyModel.exit_model), so
transformers' save_pretrained writes it as is (`--format hf`): layer indices 0..k, a config with
num_hidden_layers = k + 1 and per-layer lists cut to match, tied embeddings kept tied. `--format
gguf` writes the same model as one GGUF file (see gguf_export).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from balcony_cli.checkpoint import (
    _default_file_mode,
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

FORMATS = ("hf", "gguf")


@dataclass
class ExportedExit:
    exit: int
    directory: Path
    num_layers: int
    parameters: int
    full_parameters: int
    trained: bool
    format: str = "hf"
    gguf_file: str | None = None
    """File name of the GGUF model inside `directory` (format gguf)."""
    gguf_type: str | None = None
    weights_bytes: int = 0
    """Size of the weight files: model*.safetensors for hf, the .gguf file for gguf."""


def _parameter_count(model) -> int:
    """Count unique parameters, so tied embeddings count once."""
    seen, total = set(), 0
    for param in model.parameters():
        if id(param) not in seen:
            seen.add(id(param))
            total += param.numel()
    return total


def gguf_file_name(k: int | None, gguf_type: str) -> str:
    """Name the GGUF file of exit k (None: the full model)."""
    return f"{'full' if k is None else f'exit-{k}'}-{gguf_type}.gguf"


def _export_one(
    model: BalconyModel,
    config: dict,
    source: ModelSource,
    k: int,
    directory: Path,
    format: str,
    gguf_type: str | None,
    evaluation: dict | None,
    benchmark: dict | None,
) -> ExportedExit:
    view = model.exit_model(k)
    exported = ExportedExit(
        exit=k,
        directory=directory,
        num_layers=view.config.num_hidden_layers,
        parameters=_parameter_count(view),
        full_parameters=_parameter_count(model.base),
        trained=bool(config.get("trained")),
        format=format,
    )
    facts = CardFacts(
        exit=k,
        num_layers=exported.num_layers,
        parameters=exported.parameters,
        full_parameters=exported.full_parameters,
        trained=exported.trained,
        format=format,
    )
    if format == "gguf":
        from balcony_cli.gguf_export import write_gguf

        name = gguf_file_name(k, gguf_type)
        written = write_gguf(
            view,
            source,
            directory / name,
            gguf_type=gguf_type,
            name=f"{config['base_model']['spec']} Balcony exit {k}",
            extra_metadata={
                "exit": k,
                "trained": exported.trained,
                "base_fingerprint": config["base_fingerprint"],
            },
        )
        exported.gguf_file = facts.gguf_file = name
        exported.gguf_type = facts.gguf_type = gguf_type
        exported.weights_bytes = written.path.stat().st_size
        facts.fallback_tensors = len(written.fallback_tensors)
    else:
        view.save_pretrained(directory)
        load_tokenizer(source).save_pretrained(directory)
        # transformers 5.25 writes model.safetensors with mode 0600; give it the umask mode of the rest.
        for path in directory.glob("model*.safetensors"):
            os.chmod(path, _default_file_mode())
        exported.weights_bytes = sum(path.stat().st_size for path in directory.glob("model*.safetensors"))
    (directory / "README.md").write_text(model_card(config, facts, evaluation, benchmark))
    return exported


def export(
    checkpoint: Path,
    exit: int | str,
    output: Path,
    format: str = "hf",
    overwrite: bool = False,
    allow_base_mismatch: bool = False,
    gguf_type: str | None = None,
    eval_json: Path | None = None,
    bench_json: Path | None = None,
) -> list[ExportedExit]:
    """Export exit `exit` (or every exit, for "all") of a checkpoint into `output`.

    With "all", each exit goes into its own subfolder `exit-K`. The output appears atomically.
    `eval_json` and `bench_json` add the tables of `balcony eval --json` and `balcony bench --json`
    documents of the same checkpoint to the model card.
    """
    from balcony_cli.gguf_export import DEFAULT_GGUF_TYPE, GGUF_TYPES, gguf_architecture

    if format not in FORMATS:
        raise BadInputError(f"--format {format!r}: expected one of {', '.join(FORMATS)}")
    if gguf_type is not None and format != "gguf":
        raise BadInputError(
            f"--gguf-type {gguf_type}: applies only to --format gguf; add --format gguf or drop --gguf-type"
        )
    if format == "gguf":
        gguf_type = gguf_type or DEFAULT_GGUF_TYPE
        if gguf_type not in GGUF_TYPES:
            raise BadInputError(f"--gguf-type {gguf_type!r}: expected one of {', '.join(GGUF_TYPES)}")
    check_output_dir(output, overwrite=overwrite)
    config = read_balcony_config(checkpoint)
    exits = list(config["exits"]) if exit == "all" else [int(exit)]
    for k in exits:
        if k not in config["exits"]:
            raise BadInputError(
                f"--exit {k}: checkpoint {str(checkpoint)!r} has exits {','.join(map(str, config['exits']))}; "
                "pick one of them or 'all'"
            )
    if format == "gguf":
        gguf_architecture(config["base_model"]["model_type"])
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
            results.append(
                _export_one(model, config, source, k, target, format, gguf_type, evaluation, benchmark)
            )
    # Point the results at the final location, not the temporary directory they were written to.
    for result in results:
        result.directory = output / f"exit-{result.exit}" if exit == "all" else output
    return results
