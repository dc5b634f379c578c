"""The bad-input matrix: every verb, every kind of bad input.

Each case must exit with code 2, print one `error:` line that names the input, show no traceback,
and leave the output path as it was (absent, or with its old content).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from balcony_cli.checkpoint import CONFIG_NAME, WEIGHTS_NAME
from balcony_cli.cli import app
from balcony_cli.insert import insert

runner = CliRunner()


@dataclass
class Paths:
    model: Path
    corpus: Path
    checkpoint: Path
    output: Path
    tmp: Path


@pytest.fixture
def paths(tiny_model_dir, corpus_dir, tmp_path) -> Paths:
    checkpoint = tmp_path / "checkpoint"
    insert(str(tiny_model_dir), [1, 2], checkpoint)
    return Paths(tiny_model_dir, corpus_dir, checkpoint, tmp_path / "out", tmp_path)


def train_argv(p: Paths, *extra: str, data: Path | str | None = None) -> list[str]:
    return ["train", str(p.model), "--data", str(data or p.corpus), "-o", str(p.output), "--max-steps", "2",
            "--seq-len", "16", *extra]


def write(path: Path, content: str | bytes) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


def make_dir(path: Path) -> Path:
    path.mkdir()
    return path


def bert_dir(p: Paths) -> Path:
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32)
    BertForMaskedLM(config).save_pretrained(p.tmp / "bert")
    return p.tmp / "bert"


def edit_config(p: Paths, **changes) -> Path:
    config = json.loads((p.checkpoint / CONFIG_NAME).read_text())
    config.update(changes)
    (p.checkpoint / CONFIG_NAME).write_text(json.dumps(config))
    return p.checkpoint


def truncate_weights(p: Paths) -> Path:
    weights = p.checkpoint / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:64])
    return p.checkpoint


def export_argv(p: Paths, checkpoint: Path | None = None, *extra: str) -> list[str]:
    return ["export", "-c", str(checkpoint or p.checkpoint), "--exit", "2", "-o", str(p.output), *extra]


def generate_argv(p: Paths, *extra: str, prompt: str = "Hello") -> list[str]:
    return ["generate", prompt, "-c", str(p.checkpoint), "--max-new-tokens", "3", *extra]


# (case id, argv builder, fragments the message must contain)
CASES = [
    # insert
    ("insert-exit-0", lambda p: ["insert", str(p.model), "--exits", "0", "-o", str(p.output)], ["--exits", "exit 0"]),
    ("insert-exit-L", lambda p: ["insert", str(p.model), "--exits", "4", "-o", str(p.output)], ["exit 4", "1..3"]),
    ("insert-exit-word", lambda p: ["insert", str(p.model), "--exits", "a", "-o", str(p.output)], ["'a'"]),
    ("insert-exit-duplicate", lambda p: ["insert", str(p.model), "--exits", "2,2", "-o", str(p.output)],
     ["listed twice"]),
    ("insert-exit-empty", lambda p: ["insert", str(p.model), "--exits", "", "-o", str(p.output)],
     ["comma-separated"]),
    ("insert-offline-model", lambda p: ["insert", "nobody/nothing", "--exits", "2", "-o", str(p.output)],
     ["'nobody/nothing'", "cannot be reached", "smollm2-135m"]),
    ("insert-encoder-only", lambda p: ["insert", str(bert_dir(p)), "--exits", "1", "-o", str(p.output)],
     ["'bert'", "decoder-only"]),
    ("insert-bad-init", lambda p: ["insert", str(p.model), "--exits", "2", "-o", str(p.output), "--init", "zero"],
     ["--init 'zero'", "copy-last"]),
    ("insert-missing-model-path", lambda p: ["insert", str(p.tmp / "no-model.gguf"), "--exits", "2", "-o",
                                             str(p.output)], ["not found"]),
    # train
    ("train-exit-0", lambda p: train_argv(p, "--exits", "0"), ["--exits", "exit 0"]),
    ("train-exit-L", lambda p: train_argv(p, "--exits", "4"), ["exit 4"]),
    ("train-exit-L+5", lambda p: train_argv(p, "--exits", "9"), ["exit 9"]),
    ("train-exit-word", lambda p: train_argv(p, "--exits", "a"), ["'a'"]),
    ("train-exit-duplicate", lambda p: train_argv(p, "--exits", "1,1"), ["listed twice"]),
    ("train-exit-empty", lambda p: train_argv(p, "--exits", ""), ["comma-separated"]),
    ("train-no-exits", lambda p: train_argv(p), ["--exits is missing"]),
    ("train-offline-model", lambda p: ["train", "nobody/nothing", "--exits", "2", "--data", str(p.corpus), "-o",
                                       str(p.output)], ["cannot be reached"]),
    ("train-encoder-only", lambda p: ["train", str(bert_dir(p)), "--exits", "1", "--data", str(p.corpus), "-o",
                                      str(p.output)], ["'bert'"]),
    ("train-missing-data", lambda p: train_argv(p, "--exits", "2", data=p.tmp / "missing"), ["--data", "no such"]),
    ("train-empty-data-dir", lambda p: train_argv(p, "--exits", "2", data=make_dir(p.tmp / "empty")),
     ["--data", "no .txt"]),
    ("train-empty-data-file", lambda p: train_argv(p, "--exits", "2", data=write(p.tmp / "e.txt", "")),
     ["--data", "empty"]),
    ("train-non-utf8-data", lambda p: train_argv(p, "--exits", "2", data=write(p.tmp / "l.txt", b"caf\xe9 " * 50)),
     ["--data", "not valid UTF-8", "iconv"]),
    ("train-short-corpus", lambda p: train_argv(p, "--exits", "2", data=write(p.tmp / "s.txt", "tiny")),
     ["fewer than", "--seq-len"]),
    ("train-unknown-recipe-key", lambda p: train_argv(p, "--exits", "2", "--recipe",
                                                      str(write(p.tmp / "r.yaml", "max_step: 3\n"))),
     ["unknown key 'max_step'", "'max_steps'"]),
    ("train-wrong-type-recipe", lambda p: train_argv(p, "--exits", "2", "--recipe",
                                                     str(write(p.tmp / "r.yaml", "lr: fast\n"))),
     ["lr (--lr)", "expected float"]),
    ("train-missing-recipe", lambda p: train_argv(p, "--exits", "2", "--recipe", str(p.tmp / "none.yaml")),
     ["--recipe", "not found"]),
    ("train-bad-precision", lambda p: train_argv(p, "--exits", "2", "--precision", "fp8"), ["--precision"]),
    ("train-non-utf8-eval-text", lambda p: train_argv(p, "--exits", "2", "--eval-text",
                                                      str(write(p.tmp / "ev.txt", b"caf\xe9 " * 50))),
     ["--eval-text", "not valid UTF-8"]),
    ("train-resume-without-run", lambda p: train_argv(p, "--exits", "2", "--resume"), ["--resume", "no training run"]),
    ("train-resume-and-overwrite", lambda p: train_argv(p, "--exits", "2", "--resume", "--overwrite"),
     ["contradict"]),
    # export
    ("export-missing-checkpoint", lambda p: export_argv(p, p.tmp / "nothing"), ["not found", "--checkpoint"]),
    ("export-exit-not-in-checkpoint", lambda p: ["export", "-c", str(p.checkpoint), "--exit", "3", "-o",
                                                 str(p.output)], ["--exit 3", "1,2"]),
    ("export-exit-word", lambda p: ["export", "-c", str(p.checkpoint), "--exit", "x", "-o", str(p.output)],
     ["--exit 'x'"]),
    ("export-bad-format", lambda p: export_argv(p, None, "--format", "onnx"), ["--format 'onnx'"]),
    ("export-newer-schema", lambda p: export_argv(p, edit_config(p, schema_version=99)),
     ["schema version 99", "upgrade"]),
    ("export-truncated-weights", lambda p: export_argv(p, truncate_weights(p)), ["truncated or corrupted"]),
    ("export-base-mismatch", lambda p: export_argv(p, edit_config(p, base_fingerprint="sha256:" + "0" * 64)),
     ["sha256:0000", "--allow-base-mismatch"]),
    # eval
    ("eval-unknown-task", lambda p: eval_argv(p, "--tasks", "helaswag"), ["'helaswag'", "did you mean hellaswag"]),
    ("eval-missing-task-file", lambda p: eval_argv(p, "--tasks", "piqa"),
     ["task piqa", "piqa/valid.jsonl", "--data-dir"]),
    ("eval-exit-not-in-checkpoint", lambda p: eval_argv(p, "--tasks", "hellaswag", "--exits", "3"),
     ["--exits 3", "1,2"]),
    ("eval-not-a-checkpoint", lambda p: ["eval", "-c", str(make_dir(p.tmp / "plain")), "--tasks", "hellaswag"],
     ["no balcony_config.json"]),
    ("eval-limit-0", lambda p: eval_argv(p, "--tasks", "hellaswag", "--limit", "0"), ["--limit 0", "positive"]),
    ("eval-limit-negative", lambda p: eval_argv(p, "--tasks", "hellaswag", "--limit", "-5"), ["--limit -5"]),
    ("eval-bad-baseline", lambda p: eval_argv(p, "--tasks", "hellaswag", "--baselines", "prune,distil"),
     ["--baselines distil", "naive, prune"]),
    ("eval-missing-perplexity-text", lambda p: eval_argv(p, "--perplexity", str(p.tmp / "none.txt")),
     ["--perplexity", "not found"]),
    ("eval-nothing-to-do", lambda p: eval_argv(p), ["--tasks", "--perplexity"]),
    # bench
    ("bench-exit-not-in-checkpoint", lambda p: bench_argv(p, "--exit", "3"), ["--exits 3", "1,2"]),
    ("bench-prompt-above-maximum", lambda p: bench_argv(p, "--prompt-lengths", "64,300"),
     ["prompt length 300", "maximum of 256"]),
    ("bench-cuda-without-gpu", lambda p: bench_argv(p, "--device", "cuda"), ["--device cuda", "--device cpu"]),
    ("bench-eval-json-other-checkpoint", lambda p: bench_argv(
        p, "--eval-json", str(write(p.tmp / "e.json", json.dumps(
            {"rows": [], "checkpoint": {"path": "/elsewhere/ckpt", "fingerprint": "sha256:1"}}))),
        "--plot", str(p.tmp / "plot.png")), ["--eval-json", "/elsewhere/ckpt"]),
    ("bench-plot-without-eval-json", lambda p: bench_argv(p, "--plot", str(p.tmp / "plot.png")), ["--eval-json"]),
    # generate
    ("generate-budget-0", lambda p: generate_argv(p, "--budget", "0"), ["--budget 0.0", "(0, 1]"]),
    ("generate-budget-above-1", lambda p: generate_argv(p, "--budget", "1.5"), ["--budget 1.5", "(0, 1]"]),
    ("generate-budget-below-every-exit", lambda p: generate_argv(p, "--budget", "0.3"),
     ["--budget 0.3", "cheapest is exit 1"]),
    ("generate-exit-not-in-checkpoint", lambda p: generate_argv(p, "--exit", "3"), ["--exit 3", "1,2"]),
    ("generate-draft-exit-not-in-checkpoint", lambda p: generate_argv(p, "--speculative", "--draft-exit", "3"),
     ["--draft-exit 3", "1,2"]),
    ("generate-draft-tokens-0", lambda p: generate_argv(p, "--speculative", "--draft-exit", "2", "--draft-tokens", "0"),
     ["--draft-tokens 0"]),
    ("generate-speculative-without-draft-exit", lambda p: generate_argv(p, "--speculative"), ["--draft-exit"]),
    ("generate-empty-prompt", lambda p: generate_argv(p, prompt=""), ["PROMPT is empty"]),
    ("generate-blank-prompt", lambda p: generate_argv(p, prompt="  \n "), ["PROMPT is empty"]),
    ("generate-missing-checkpoint", lambda p: ["generate", "Hi", "-c", str(p.tmp / "nothing")],
     ["not found", "--checkpoint"]),
    ("generate-top-p-without-temperature", lambda p: generate_argv(p, "--top-p", "0.9"), ["--temperature"]),
    ("generate-no-chat-template", lambda p: generate_argv(p, "--chat-template"), ["no chat template"]),
]


def bench_argv(p: Paths, *extra: str) -> list[str]:
    return ["bench", "-c", str(p.checkpoint), "--prompt-lengths", "8", "--batch-sizes", "1", "--new-tokens", "2",
            "--repeats", "1", "--json", str(p.output), *extra]


def eval_argv(p: Paths, *extra: str) -> list[str]:
    """Evaluate the tiny checkpoint against an empty data folder, writing JSON to the output path."""
    data_dir = p.tmp / "data"
    data_dir.mkdir(exist_ok=True)
    (data_dir / "hellaswag").mkdir(exist_ok=True)
    (data_dir / "hellaswag" / "hellaswag_val.jsonl").write_text("")
    return ["eval", "-c", str(p.checkpoint), "--data-dir", str(data_dir), "--json", str(p.output), *extra]


@pytest.mark.parametrize(("argv", "fragments"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_exits_2(paths, argv, fragments):
    result = runner.invoke(app, argv(paths))
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    assert "Traceback" not in result.output
    assert not paths.output.exists()


@pytest.mark.parametrize("verb", ["insert", "train", "export", "eval", "bench"])
def test_existing_output_kept(paths, verb):
    paths.output.mkdir()
    (paths.output / "keep.txt").write_text("keep")
    argv = {
        "insert": ["insert", str(paths.model), "--exits", "2", "-o", str(paths.output)],
        "train": train_argv(paths, "--exits", "2"),
        "export": export_argv(paths),
        "eval": ["eval", "-c", str(paths.checkpoint), "--perplexity", str(write(paths.tmp / "t.txt", "a b c")),
                 "--json", str(paths.output / "keep.txt")],
        "bench": bench_argv(paths)[:-2] + ["--json", str(paths.output / "keep.txt")],
    }[verb]
    result = runner.invoke(app, argv)
    assert result.exit_code == 2, result.output
    assert "--overwrite" in result.output
    assert [p.name for p in paths.output.iterdir()] == ["keep.txt"]
    assert (paths.output / "keep.txt").read_text() == "keep"


def test_debug_shows_traceback_and_keeps_code(paths, capsys):
    result = runner.invoke(app, ["--debug", *train_argv(paths, "--exits", "0")])
    assert result.exit_code == 2
    assert "Traceback" in result.output
