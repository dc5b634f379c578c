"""The README.md written next to an exported exit, with optional eval and bench tables.

The tables come from the documents of `balcony eval --json` and `balcony bench --json` (fields in
docs/json.md). A document is accepted only when it was measured on this checkpoint: same base
fingerprint, same exits and, when it records one, the same SHA-256 of balcony.safetensors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from balcony_cli.checkpoint import SCHEMA_VERSION, checkpoint_fingerprint
from balcony_cli.errors import BadInputError

DocumentKind = Literal["eval", "bench"]


@dataclass
class CardFacts:
    """Facts the card states about one exported exit."""

    exit: int
    num_layers: int
    parameters: int
    full_parameters: int
    trained: bool
    format: str = "hf"
    gguf_file: str | None = None
    gguf_type: str | None = None
    fallback_tensors: int = 0
    """q8_0 only: tensors stored as F16 because their rows are not a multiple of 32 values."""


# Reading eval and bench documents.


def read_results_document(path: Path, kind: DocumentKind, checkpoint: Path, config: dict) -> dict:
    """Read a `balcony eval --json` or `balcony bench --json` document and check it fits the checkpoint."""
    flag = f"--{kind}-json {str(path)!r}"
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadInputError(
            f"{flag}: file not found; pass the file written by `balcony {kind} --json`"
        ) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BadInputError(
            f"{flag}: invalid JSON ({error}); pass the file written by `balcony {kind} --json`"
        ) from error

    if not isinstance(document, dict) or not isinstance(document.get("schema_version"), int):
        raise BadInputError(f"{flag}: no schema_version; pass the file written by `balcony {kind} --json`")
    if document["schema_version"] > SCHEMA_VERSION:
        raise BadInputError(
            f"{flag}: written by a newer Balcony (schema version {document['schema_version']}, this one "
            f"reads {SCHEMA_VERSION}); upgrade Balcony"
        )
    rows = document.get("rows")
    looks_like = "bench" if "hardware" in document else "eval"
    if not isinstance(rows, list) or not isinstance(document.get("checkpoint"), dict) or looks_like != kind:
        raise BadInputError(
            f"{flag}: not a `balcony {kind} --json` document (it looks like {looks_like} output or lacks "
            "rows/checkpoint); pass the matching file"
        )

    _check_same_checkpoint(flag, document, checkpoint, config)
    return document


def _check_same_checkpoint(flag: str, document: dict, checkpoint: Path, config: dict) -> None:
    measured = document["checkpoint"]
    if document.get("base_fingerprint") != config["base_fingerprint"]:
        raise BadInputError(
            f"{flag}: measured on base fingerprint {document.get('base_fingerprint')}, but checkpoint "
            f"{str(checkpoint)!r} has base fingerprint {config['base_fingerprint']}; pass results of this "
            "checkpoint"
        )
    if list(measured.get("exits") or []) != list(config["exits"]):
        raise BadInputError(
            f"{flag}: measured on exits {_join(measured.get('exits'))}, but checkpoint {str(checkpoint)!r} "
            f"has exits {_join(config['exits'])}; pass results of this checkpoint"
        )
    recorded = measured.get("fingerprint")
    if recorded is not None:
        actual = checkpoint_fingerprint(checkpoint)
        if "sha256:" + str(recorded).removeprefix("sha256:") != actual:
            raise BadInputError(
                f"{flag}: measured on Balcony weights with SHA-256 {recorded}, but {str(checkpoint)!r} now "
                f"has balcony.safetensors with SHA-256 {actual} (trained further since?); rerun the "
                "measurement"
            )


def _join(values) -> str:
    return ",".join(map(str, values)) if isinstance(values, list) else repr(values)


# Number formats.


def _number(value: Any) -> float | None:
    """Return a figure that a document stores either as a number or as {"median": x, ...}."""
    # NOTE: docs/json.md does not fix whether decode tokens/s and speedup are bare numbers or
    # objects with a median and spread, so both shapes are read.
    if isinstance(value, dict):
        for key in ("median", "value", "tokens_per_s", "speedup"):
            if isinstance(value.get(key), (int, float)):
                return float(value[key])
        return None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _fixed(value: Any, digits: int = 3, suffix: str = "") -> str:
    number = _number(value)
    return "-" if number is None else f"{number:,.{digits}f}{suffix}"


def _perplexity(value: Any) -> str:
    number = _number(value.get("value") if isinstance(value, dict) else value)
    if number is None:
        return "-"
    return f"{number:,.1f}" if number < 1e5 else f"{number:.2e}"


def _bytes(value: Any, unit: str) -> str:
    number = _number(value)
    if number is None:
        return "-"
    scale = {"KiB": 1 << 10, "MiB": 1 << 20}[unit]
    return f"{number / scale:,.1f} {unit}"


def _row_label(row: dict, exit: int) -> str:
    name = str(row.get("name", "?"))
    return f"**{name} (this model)**" if row.get("kind") == "exit" and row.get("k") == exit else name


def _covers_exit(rows: list[dict], exit: int) -> bool:
    return any(row.get("kind") == "exit" and row.get("k") == exit for row in rows)


# Tables.


def evaluation_section(document: dict, exit: int) -> list[str]:
    """Return the card lines for an eval document: one row per evaluated model, in table order."""
    rows = document["rows"]
    tasks: dict[str, tuple[str, Any]] = {}
    for row in rows:
        for task, result in (row.get("tasks") or {}).items():
            tasks.setdefault(task, (result.get("primary", "acc"), result.get("samples")))
    with_perplexity = any(row.get("perplexity") for row in rows)

    header = ["row", "layers", "relative compute"]
    header += [
        f"{task} {metric}" + (f" (n={samples})" if samples else "")
        for task, (metric, samples) in tasks.items()
    ]
    header += ["average"] + (["perplexity"] if with_perplexity else [])
    lines = [
        "## Evaluation",
        "",
        (
            f"From `balcony eval --json` (Balcony {document.get('balcony_version', '?')}) on this "
            "checkpoint. Each task shows its primary metric and its standard error."
        ),
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for row in rows:
        cells = [_row_label(row, exit), str(row.get("layers", "-")), _fixed(row.get("relative_compute"))]
        for task, (metric, _) in tasks.items():
            metrics = ((row.get("tasks") or {}).get(task) or {}).get("metrics") or {}
            value, stderr = metrics.get(metric), metrics.get(f"{metric}_stderr")
            cells.append(_fixed(value) + (f" ± {_fixed(stderr)}" if _number(stderr) is not None else ""))
        cells.append(_fixed(row.get("average")))
        if with_perplexity:
            cells.append(_perplexity(row.get("perplexity")))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if not _covers_exit(rows, exit):
        lines += [f"This evaluation has no row for exit {exit}.", ""]
    if (document.get("settings") or {}).get("data_dir"):
        lines += [
            (
                "Tasks were read from local files, in which HellaSwag lost its `ctx_a`/`ctx_b` split and a "
                "few ARC items repeat a choice; scores are close to, but not exactly comparable with, "
                "published lm-evaluation-harness numbers."
            ),
            "",
        ]
    return lines


def benchmark_section(document: dict, exit: int) -> list[str]:
    """Return the card lines for a bench document: speed, memory and KV cache per row."""
    hardware = document.get("hardware") or {}
    rows = document["rows"]
    batch = _decode_batch(rows)
    device = hardware.get("device_name") or hardware.get("device", "?")
    lines = [
        "## Speed",
        "",
        (
            f"From `balcony bench --json` (Balcony {document.get('balcony_version', '?')}) on {device} "
            f"({hardware.get('threads', '?')} threads), {document.get('dtype', '?')}. Decode tokens/s is the "
            f"median over repeats at batch size {batch}; speedup is against the full model's decode rate."
        ),
        "",
        (
            "| row | layers | relative compute | ideal speedup | decode tokens/s | speedup "
            "| achieved / ideal | time to first token | peak memory | KV cache per token |"
        ),
        "|" + "---|" * 10,
    ]
    for row in rows:
        decode = (row.get("decode") or {}).get(batch) or {}
        speedup = row.get("speedup")
        achieved = (
            speedup.get("achieved_over_ideal")
            if isinstance(speedup, dict)
            else row.get("achieved_over_ideal")
        )
        cells = [
            _row_label(row, exit),
            str(row.get("layers", "-")),
            _fixed(row.get("relative_compute")),
            _fixed(row.get("ideal_speedup"), 2, "×"),
            _fixed(decode.get("tokens_per_s"), 1),
            _fixed(speedup, 2, "×"),
            _fixed(achieved, 2),
            _fixed(row.get("time_to_first_token_s"), 3, " s"),
            _bytes(row.get("peak_memory_bytes"), "MiB"),
            _bytes((row.get("kv_cache") or {}).get("bytes_per_token"), "KiB"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if not _covers_exit(rows, exit):
        lines += [f"This benchmark has no row for exit {exit}.", ""]
    return lines


def _decode_batch(rows: list[dict]) -> str:
    """Return the decode batch size shown in the card: 1 when measured, else the smallest."""
    sizes = {str(size) for row in rows for size in (row.get("decode") or {})}
    if not sizes or "1" in sizes:
        return "1"
    return min(sizes, key=lambda size: int(size) if size.isdigit() else 0)


# The card.


def model_card(
    config: dict, facts: CardFacts, evaluation: dict | None = None, benchmark: dict | None = None
) -> str:
    """Write the README.md of an exported exit: base, exit, size against the full model, training, results."""
    base = config["base_model"]
    status = "" if facts.trained else " (untrained)"
    lines = [
        f"# {base['spec']}: Balcony exit {facts.exit}{status}",
        "",
        (
            f"This is exit {facts.exit} of `{base['spec']}` ({base['model_type']}, {base['num_layers']} "
            "layers), exported by Balcony as a plain model of the base's own architecture. It runs layers "
            f"1..{facts.exit} of the base, then its Balcony layer, then its own final norm and the base's LM "
            "head."
        ),
        "",
        *_loading_lines(facts),
        "| | this exit | full model |",
        "|---|---|---|",
        f"| decoder layers | {facts.num_layers} | {base['num_layers']} |",
        f"| parameters | {facts.parameters:,} | {facts.full_parameters:,} |",
        "",
        *_training_lines(config, facts.trained),
    ]

    if evaluation is not None:
        lines += evaluation_section(evaluation, facts.exit)
    if benchmark is not None:
        lines += benchmark_section(benchmark, facts.exit)
    lines += [f"Base weight fingerprint: `{config['base_fingerprint']}`", ""]
    return "\n".join(lines)


def _training_lines(config: dict, trained: bool) -> list[str]:
    if not trained:
        return [
            "## Training",
            "",
            (
                f"**Untrained.** The Balcony layer is still at its initialisation ({config['init']}); "
                "expect poor output."
            ),
            "",
        ]
    training = config.get("training") or {}
    recipe = training.get("recipe") or {}
    return [
        "## Training",
        "",
        "The Balcony layer was trained by self-distillation: forward KL(full model ‖ exit) per token,",
        "with the base model frozen.",
        "",
        f"- steps: {training.get('steps')}",
        f"- training tokens: {training.get('train_tokens')}",
        f"- data: {training.get('data')}",
        f"- exits trained together: {', '.join(map(str, config['exits']))}",
        (
            f"- learning rate: {recipe.get('lr')}, sequence length: {recipe.get('seq_len')}, "
            f"initialisation: {config['init']}"
        ),
        "",
    ]


def _loading_lines(facts: CardFacts) -> list[str]:
    if facts.format != "gguf":
        return ["It loads with `AutoModelForCausalLM.from_pretrained` and needs no custom code.", ""]
    weights = {
        "f32": "all tensors in F32",
        "f16": "matrices in F16; norms, biases and position embeddings in F32",
        "q8_0": "matrices in Q8_0; norms, biases and position embeddings in F32",
    }[facts.gguf_type or "f16"]
    lines = [
        (
            f"`{facts.gguf_file}` is a GGUF file with llama.cpp's tensor names and metadata keys "
            f"({weights}). It loads with transformers' GGUF reader:"
        ),
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder", gguf_file="{facts.gguf_file}")',
        f'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder", gguf_file="{facts.gguf_file}")',
        "```",
        "",
    ]
    if facts.fallback_tensors:
        lines += [
            (
                f"{facts.fallback_tensors} matrices have rows that are not a multiple of 32 values, which "
                "Q8_0 needs, and are stored in F16."
            ),
            "",
        ]
    return lines
