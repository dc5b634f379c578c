from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from balcony_cli.checkpoint import CONFIG_NAME, WEIGHTS_NAME
from balcony_cli.cli import app

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def train_args(model, data, output, *extra):
    return ["train", model, "--data", data, "-o", output, "--max-steps", "2", "--seq-len", "16", *extra]


@pytest.mark.parametrize(
    ("exits", "message"),
    [
        ("0", "exit 0 is out of range"),
        ("4", "exit 4 is out of range"),
        ("9", "exit 9 is out of range"),
        ("a", "'a' is not an integer"),
        ("1,1", "exit 1 is listed twice"),
        ("", "comma-separated list"),
    ],
)
def test_train_rejects_bad_exits(tiny_model_dir, corpus_dir, tmp_path, exits, message):
    output = tmp_path / "out"
    result = run(*train_args(tiny_model_dir, corpus_dir, output, "--exits", exits))
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "--exits" in result.output
    assert "Traceback" not in result.output
    assert not output.exists()


@pytest.mark.parametrize("kind", ["missing", "empty-dir", "empty-file"])
def test_train_rejects_missing_or_empty_data(tiny_model_dir, tmp_path, kind):
    data = tmp_path / "data"
    if kind == "empty-dir":
        data.mkdir()
    elif kind == "empty-file":
        data = tmp_path / "empty.txt"
        data.write_text("")
    output = tmp_path / "out"
    result = run(*train_args(tiny_model_dir, data, output, "--exits", "2"))
    assert result.exit_code == 2, result.output
    assert f"--data {str(data)!r}" in result.output
    assert not output.exists()


def test_train_rejects_corpus_shorter_than_block(tiny_model_dir, tmp_path):
    data = tmp_path / "short.txt"
    data.write_text("too short")
    output = tmp_path / "out"
    result = run(*train_args(tiny_model_dir, data, output, "--exits", "2", "--no-perplexity"))
    assert result.exit_code == 2, result.output
    assert "fewer than" in result.output
    assert "seq_len=16" in result.output
    assert not output.exists()


def test_train_rejects_unknown_model_offline(corpus_dir, tmp_path):
    output = tmp_path / "out"
    result = run(*train_args("nobody/no-such-model", corpus_dir, output, "--exits", "2"))
    assert result.exit_code == 2, result.output
    assert "'nobody/no-such-model'" in result.output
    assert "cannot be reached" in result.output
    assert "smollm2-135m" in result.output
    assert not output.exists()


def test_train_rejects_encoder_only_model(corpus_dir, tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    bert_dir = tmp_path / "bert"
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32)
    BertForMaskedLM(config).save_pretrained(bert_dir)
    output = tmp_path / "out"
    result = run(*train_args(bert_dir, corpus_dir, output, "--exits", "1"))
    assert result.exit_code == 2, result.output
    assert "'bert'" in result.output
    assert "decoder-only" in result.output
    assert not output.exists()


def test_train_rejects_existing_output(tiny_model_dir, corpus_dir, tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "precious.txt").write_text("keep me")
    result = run(*train_args(tiny_model_dir, corpus_dir, output, "--exits", "2"))
    assert result.exit_code == 2, result.output
    assert "already exists" in result.output
    assert "--overwrite" in result.output
    assert sorted(p.name for p in output.iterdir()) == ["precious.txt"]
    assert (output / "precious.txt").read_text() == "keep me"


def test_insert_rejects_existing_output(tiny_model_dir, tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "precious.txt").write_text("keep me")
    result = run("insert", tiny_model_dir, "--exits", "2", "-o", output)
    assert result.exit_code == 2
    assert (output / "precious.txt").read_text() == "keep me"


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


def test_flag_named_in_recipe_errors(tiny_model_dir, corpus_dir, tmp_path):
    output = tmp_path / "out"
    result = run(*train_args(tiny_model_dir, corpus_dir, output, "--exits", "2", "--precision", "fp8"))
    assert result.exit_code == 2
    assert "--precision" in result.output
    assert "fp32" in result.output
    result = run(*train_args(tiny_model_dir, corpus_dir, output, "--exits", "2", "--lr", "-1"))
    assert result.exit_code == 2
    assert "--lr" in result.output
    assert not output.exists()


def test_eval_text_directory_rejected(tiny_model_dir, corpus_dir, tmp_path):
    output = tmp_path / "out"
    result = run(*train_args(tiny_model_dir, corpus_dir, output, "--exits", "2", "--eval-text", tmp_path))
    assert result.exit_code == 2
    assert "is a directory" in result.output
    assert not output.exists()


def test_insert_rejects_unknown_init(tiny_model_dir, tmp_path):
    result = run("insert", tiny_model_dir, "--exits", "2", "-o", tmp_path / "out", "--init", "zeros")
    assert result.exit_code == 2
    assert "--init 'zeros'" in result.output
    assert not (tmp_path / "out").exists()
