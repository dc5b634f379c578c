from __future__ import annotations

import json
import subprocess
import sys

from typer.testing import CliRunner

from balcony_cli.checkpoint import CONFIG_NAME, WEIGHTS_NAME
from balcony_cli.cli import app

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def train_args(model, data, output, *extra):
    return ["train", model, "--data", data, "-o", output, "--max-steps", "2", "--seq-len", "16", *extra]


def test_insert_then_json(tiny_model_dir, tmp_path):
    output = tmp_path / "out"
    result = run("insert", tiny_model_dir, "--exits", "3,1", "-o", output, "--json", "-")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["schema_version"] == 1
    assert document["settings"]["exits"] == [1, 3]
    assert document["base_fingerprint"].startswith("sha256:")
    assert sorted(p.name for p in output.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])


def test_insert_all_exits(tiny_model_dir, tmp_path):
    output = tmp_path / "out"
    result = run("insert", tiny_model_dir, "--exits", "all", "-o", output)
    assert result.exit_code == 0, result.output
    assert json.loads((output / CONFIG_NAME).read_text())["exits"] == [1, 2, 3]


def test_train_cli_prints_table_and_json(tiny_model_dir, corpus_dir, tmp_path):
    eval_text = tmp_path / "eval.txt"
    eval_text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    output = tmp_path / "out"
    summary = tmp_path / "summary.json"
    result = run(
        *train_args(tiny_model_dir, corpus_dir, output, "--exits", "1,3", "--eval-text", eval_text,
                    "--ppl-tokens", "300", "--ppl-window", "50", "--json", summary)
    )
    assert result.exit_code == 0, result.output
    assert "naive early exit" in result.output
    assert "exit 3" in result.output
    assert "teacher-only forward" in result.output
    document = json.loads(summary.read_text())
    assert document["steps"] == 2
    assert set(document["perplexity_after"]["exits"]) == {"1", "3"}
    assert document["perplexity_before"]["full"] > 1
    again = run(*train_args(tiny_model_dir, corpus_dir, tmp_path / "other", "--exits", "1", "--json", summary))
    assert again.exit_code == 2
    assert "--json" in again.output


def test_train_cli_names_time_budget(tiny_model_dir, corpus_dir, tmp_path):
    output = tmp_path / "out"
    result = run(
        "train", tiny_model_dir, "--data", corpus_dir, "-o", output, "--exits", "1", "--seq-len", "16",
        "--max-steps", "100000", "--max-minutes", "0.005", "--no-perplexity", "--save-every", "0",
        "--eval-every", "0",
    )
    assert result.exit_code == 0, result.output
    assert "stopped by the 0.005-minute budget after 0.0 minutes of steps" in result.output


def test_module_entry_point():
    completed = subprocess.run(
        [sys.executable, "-m", "balcony_cli", "--help"], capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0
    assert "train" in completed.stdout
    assert "insert" in completed.stdout


def test_version_flag():
    from balcony_cli import __version__

    result = run("--version")
    assert result.exit_code == 0
    assert result.output.strip() == __version__


def test_eval_text_directory_rejected(tiny_model_dir, corpus_dir, tmp_path):
    output = tmp_path / "out"
    result = run(*train_args(tiny_model_dir, corpus_dir, output, "--exits", "2", "--eval-text", tmp_path))
    assert result.exit_code == 2
    assert "is a directory" in result.output
    assert not output.exists()


