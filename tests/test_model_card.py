"""The exported model card: training status and the tables of eval and bench documents."""

from __future__ import annotations

import hashlib
import json
import logging

import pytest
from safetensors.torch import load_file, save_file
from test_export import trained_checkpoint
from typer.testing import CliRunner

from balcony_cli.checkpoint import CONFIG_NAME, WEIGHTS_NAME, checkpoint_fingerprint
from balcony_cli.cli import app
from balcony_cli.errors import BadInputError
from balcony_cli.export import export
from balcony_cli.insert import insert

runner = CliRunner()


def eval_document(checkpoint) -> dict:
    """A `balcony eval --json` document in the shape docs/json.md describes, for exits 1,2."""
    config = json.loads((checkpoint / CONFIG_NAME).read_text())

    def tasks(hellaswag: float, arc: float) -> dict:
        return {
            "hellaswag": {
                "metrics": {
                    "acc": hellaswag - 0.02,
                    "acc_stderr": 0.045,
                    "acc_norm": hellaswag,
                    "acc_norm_stderr": 0.046,
                },
                "primary": "acc_norm",
                "samples": 100,
            },
            "arc_easy": {
                "metrics": {"acc": arc, "acc_stderr": 0.07, "acc_norm": arc - 0.01, "acc_norm_stderr": 0.07},
                "primary": "acc",
                "samples": 50,
            },
        }

    return {
        "schema_version": 1,
        "balcony_version": "0.1.0",
        "settings": {"tasks": ["hellaswag", "arc_easy"], "limit": 100, "data_dir": "/data"},
        "base_fingerprint": config["base_fingerprint"],
        "checkpoint": {
            "path": str(checkpoint),
            "base_model": config["base_model"]["spec"],
            "num_layers": 4,
            "exits": [1, 2],
            "trained": True,
            "fingerprint": checkpoint_fingerprint(checkpoint),
        },
        "versions": {"torch": "2.13.0", "transformers": "5.25.0", "lm_eval": "0.4.9"},
        "rows": [
            {
                "name": "full",
                "kind": "full",
                "k": None,
                "layers": 4,
                "parameters": 60000,
                "relative_compute": 1.0,
                "tasks": tasks(0.36, 0.5),
                "perplexity": {"value": 28.86, "tokens": 19960},
                "average": 0.43,
            },
            {
                "name": "exit 2",
                "kind": "exit",
                "k": 2,
                "layers": 3,
                "parameters": 50000,
                "relative_compute": 0.78125,
                "tasks": tasks(0.31, 0.44),
                "perplexity": {"value": 514.2, "tokens": 19960},
                "average": 0.375,
            },
            {
                "name": "naive 2",
                "kind": "naive",
                "k": 2,
                "layers": 2,
                "parameters": 40000,
                "relative_compute": 0.5625,
                "tasks": tasks(0.25, 0.26),
                "perplexity": {"value": 6.34e9, "tokens": 19960},
                "average": 0.255,
            },
            {
                "name": "pruned 2",
                "kind": "pruned",
                "k": 2,
                "layers": 3,
                "kept_layers": [1, 2, 4],
                "parameters": 50000,
                "relative_compute": 0.78125,
                "tasks": tasks(0.27, 0.3),
                "perplexity": None,
                "average": 0.285,
            },
        ],
    }


def bench_document(checkpoint) -> dict:
    """A `balcony bench --json` document for a checkpoint with exits 1,2.

    docs/json.md leaves open whether decode tokens/s and speedup are numbers or objects with a
    median, so the two rows use one shape each.
    """
    evaluated = eval_document(checkpoint)
    return {
        "schema_version": 1,
        "balcony_version": "0.1.0",
        "settings": {"exits": [2], "batch_sizes": [1, 4]},
        "base_fingerprint": evaluated["base_fingerprint"],
        "hardware": {"device": "cpu", "device_name": "x86_64", "cpu_count": 2, "threads": 2},
        "dtype": "float32",
        "checkpoint": evaluated["checkpoint"],
        "rows": [
            {
                "name": "full",
                "kind": "full",
                "k": None,
                "layers": 4,
                "relative_compute": 1.0,
                "ideal_speedup": 1.0,
                "prefill": {"128": {"median_s": 0.05, "min_s": 0.049, "max_s": 0.052, "repeats": 5}},
                "decode": {
                    "1": {"tokens_per_s": 100.0, "min": 97.0, "max": 103.0, "repeats": 5},
                    "4": {"tokens_per_s": 300.0, "min": 290.0, "max": 310.0, "repeats": 5},
                },
                "time_to_first_token_s": 0.0125,
                "peak_memory_bytes": 104857600,
                "kv_cache": {"layers": 4, "bytes_per_token": 2048},
                "speedup": 1.0,
                "achieved_over_ideal": 1.0,
            },
            {
                "name": "exit 2",
                "kind": "exit",
                "k": 2,
                "layers": 3,
                "relative_compute": 0.78125,
                "ideal_speedup": 1.28,
                "prefill": {"128": {"median_s": 0.04, "min_s": 0.039, "max_s": 0.042, "repeats": 5}},
                "decode": {
                    "1": {"tokens_per_s": {"median": 121.5, "min": 118.0, "max": 125.0}, "repeats": 5}
                },
                "time_to_first_token_s": 0.0101,
                "peak_memory_bytes": 94371840,
                "kv_cache": {"layers": 3, "bytes_per_token": 1536},
                "speedup": {"value": 1.215, "achieved_over_ideal": 0.949},
            },
        ],
    }


def write_json(path, document) -> str:
    path.write_text(json.dumps(document))
    return str(path)


def test_checkpoint_fingerprint_hashes_weights(tmp_path):
    checkpoint = trained_checkpoint(tmp_path, "llama")
    expected = "sha256:" + hashlib.sha256((checkpoint / WEIGHTS_NAME).read_bytes()).hexdigest()
    assert checkpoint_fingerprint(checkpoint) == expected
    (checkpoint / WEIGHTS_NAME).unlink()
    with pytest.raises(BadInputError, match="missing"):
        checkpoint_fingerprint(checkpoint)


def test_card_eval_table(tmp_path):
    checkpoint = trained_checkpoint(tmp_path, "llama")
    eval_json = write_json(tmp_path / "eval.json", eval_document(checkpoint))
    output = tmp_path / "export"
    export(checkpoint, 2, output, eval_json=eval_json)
    card = (output / "README.md").read_text()
    assert "## Evaluation" in card
    assert (
        "| row | layers | relative compute | hellaswag acc_norm (n=100) | arc_easy acc (n=50) | average "
        "| perplexity |"
    ) in card
    assert "| full | 4 | 1.000 | 0.360 ± 0.046 | 0.500 ± 0.070 | 0.430 | 28.9 |" in card
    assert "| **exit 2 (this model)** | 3 | 0.781 | 0.310 ± 0.046 | 0.440 ± 0.070 | 0.375 | 514.2 |" in card
    assert "| naive 2 | 2 | 0.562 | 0.250 ± 0.046 | 0.260 ± 0.070 | 0.255 | 6.34e+09 |" in card
    assert "| pruned 2 | 3 | 0.781 | 0.270 ± 0.046 | 0.300 ± 0.070 | 0.285 | - |" in card
    assert "not exactly comparable" in card
    assert "## Speed" not in card


def test_card_bench_table(tmp_path):
    checkpoint = trained_checkpoint(tmp_path, "llama")
    bench_json = write_json(tmp_path / "bench.json", bench_document(checkpoint))
    output = tmp_path / "export"
    export(checkpoint, 2, output, bench_json=bench_json)
    card = (output / "README.md").read_text()
    assert "x86_64 (2 threads), float32" in card
    assert "at batch size 1" in card
    assert "| full | 4 | 1.000 | 1.00× | 100.0 | 1.00× | 1.00 | 0.013 s | 100.0 MiB | 2.0 KiB |" in card
    assert (
        "| **exit 2 (this model)** | 3 | 0.781 | 1.28× | 121.5 | 1.22× | 0.95 | 0.010 s | 90.0 MiB "
        "| 1.5 KiB |" in card
    )
    assert "## Evaluation" not in card


def test_card_notes_missing_exit_row(tmp_path):
    checkpoint = trained_checkpoint(tmp_path, "llama")
    document = eval_document(checkpoint)
    document["rows"] = [row for row in document["rows"] if row["k"] != 2]
    eval_json = write_json(tmp_path / "eval.json", document)
    output = tmp_path / "export"
    export(checkpoint, 1, output, eval_json=eval_json)
    card = (output / "README.md").read_text()
    assert "This evaluation has no row for exit 1." in card


def test_card_marks_untrained(tiny_model_dir, tmp_path, caplog):
    checkpoint = tmp_path / "ckpt"
    insert(str(tiny_model_dir), [2], checkpoint)
    output = tmp_path / "export"
    with caplog.at_level(logging.WARNING, logger="balcony_cli"):
        export(checkpoint, 2, output)
    card = (output / "README.md").read_text()
    assert card.startswith(f"# {tiny_model_dir}: Balcony exit 2 (untrained)\n")
    assert "**Untrained.**" in card
    assert "is untrained" in caplog.text


def train_further(checkpoint) -> None:
    """Change the Balcony weights in place, as `balcony train --resume` would."""
    weights = load_file(str(checkpoint / WEIGHTS_NAME))
    save_file({name: tensor * 1.01 for name, tensor in weights.items()}, str(checkpoint / WEIGHTS_NAME))


def edited(document: dict, **changes) -> dict:
    document = json.loads(json.dumps(document))
    for path, value in changes.items():
        target = document
        *parents, leaf = path.split("__")
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    return document


# (case id, flag, builder of the file content from (checkpoint, tmp_path), fragments of the error line)
BAD_DOCUMENT_CASES = [
    ("missing-file", "--eval-json", None, ["--eval-json", "file not found"]),
    ("invalid-json", "--eval-json", lambda c: "{not json", ["invalid JSON"]),
    ("no-schema", "--eval-json", lambda c: json.dumps({"rows": []}), ["no schema_version"]),
    (
        "newer-schema",
        "--bench-json",
        lambda c: json.dumps(edited(bench_document(c), schema_version=99)),
        ["schema version 99", "upgrade Balcony"],
    ),
    (
        "bench-as-eval",
        "--eval-json",
        lambda c: json.dumps(bench_document(c)),
        ["not a `balcony eval --json` document", "looks like bench"],
    ),
    (
        "eval-as-bench",
        "--bench-json",
        lambda c: json.dumps(eval_document(c)),
        ["not a `balcony bench --json` document"],
    ),
    (
        "other-base",
        "--eval-json",
        lambda c: json.dumps(edited(eval_document(c), base_fingerprint="sha256:" + "f" * 64)),
        ["sha256:ffff", "has base fingerprint sha256:"],
    ),
    (
        "other-exits",
        "--bench-json",
        lambda c: json.dumps(edited(bench_document(c), checkpoint__exits=[1, 3])),
        ["measured on exits 1,3", "has exits 1,2"],
    ),
]


@pytest.mark.parametrize(
    ("flag", "content", "fragments"),
    [c[1:] for c in BAD_DOCUMENT_CASES],
    ids=[c[0] for c in BAD_DOCUMENT_CASES],
)
def test_card_bad_document_exits_2(tmp_path, flag, content, fragments):
    checkpoint = trained_checkpoint(tmp_path, "llama")
    document = tmp_path / "results.json"
    if content is not None:
        document.write_text(content(checkpoint))
    output = tmp_path / "export"
    result = runner.invoke(
        app, ["export", "-c", str(checkpoint), "--exit", "2", "-o", str(output), flag, str(document)]
    )
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    assert "Traceback" not in result.output
    assert not output.exists()


def test_card_rejects_results_of_older_weights(tmp_path):
    checkpoint = trained_checkpoint(tmp_path, "llama")
    measured_on = checkpoint_fingerprint(checkpoint)
    eval_json = write_json(tmp_path / "eval.json", eval_document(checkpoint))
    train_further(checkpoint)
    result = runner.invoke(
        app,
        [
            "export",
            "-c",
            str(checkpoint),
            "--exit",
            "2",
            "-o",
            str(tmp_path / "out"),
            "--eval-json",
            eval_json,
        ],
    )
    assert result.exit_code == 2, result.output
    assert f"SHA-256 {measured_on}" in result.output
    assert f"SHA-256 {checkpoint_fingerprint(checkpoint)}" in result.output
    assert "rerun the measurement" in result.output
