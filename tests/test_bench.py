"""`balcony bench`: the JSON document, KV cache sizes per exit, and the trade-off plot."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from conftest import char_tokenizer, tiny_model
from typer.testing import CliRunner

from balcony_cli.bench import cache_size, decode_steps
from balcony_cli.checkpoint import load_balcony
from balcony_cli.cli import app
from balcony_cli.insert import insert

runner = CliRunner()

FAST = [
    "--prompt-lengths",
    "8,16",
    "--batch-sizes",
    "1,2",
    "--decode-prompt",
    "8",
    "--new-tokens",
    "4",
    "--repeats",
    "2",
    "--warmup",
    "1",
]


@pytest.fixture
def checkpoint(tmp_path):
    base_dir = tmp_path / "base"
    tiny_model("llama").save_pretrained(base_dir)
    char_tokenizer().save_pretrained(base_dir)
    directory = tmp_path / "ckpt"
    insert(str(base_dir), [1, 2], directory)
    return directory


def test_bench_json_holds_every_exit(checkpoint, tmp_path):
    out = tmp_path / "bench.json"
    result = runner.invoke(
        app,
        [
            "bench",
            "-c",
            str(checkpoint),
            "--exits",
            "all",
            "--baselines",
            "naive",
            *FAST,
            "--threads",
            "1",
            "--json",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    document = json.loads(out.read_text())
    assert document["schema_version"] == 1
    assert document["hardware"]["threads"] == 1
    assert document["dtype"] == "float32"
    assert [row["name"] for row in document["rows"]] == ["full", "exit 1", "naive 1", "exit 2", "naive 2"]
    for row in document["rows"]:
        assert row["prefill"]["16"]["median_s"] > 0
        assert row["prefill"]["16"]["repeats"] == 2
        assert row["decode"]["2"]["tokens_per_s"]["median"] > 0
        assert row["time_to_first_token_s"]["median"] > 0
        assert row["peak_memory_bytes"] > 0
        assert row["ideal_speedup"] >= 1.0
        assert row["speedup"]["decode"] > 0
    by_name = {row["name"]: row for row in document["rows"]}
    assert by_name["full"]["speedup"]["decode"] == 1.0
    assert by_name["exit 1"]["kv_cache"]["layers"] == 2
    assert by_name["naive 1"]["kv_cache"]["layers"] == 1
    assert by_name["full"]["kv_cache"]["layers"] == 4
    assert set(document["components"]) == {"embedding", "decoder_layer", "norm_and_head"}


@pytest.mark.parametrize("exit", [1, 2, 3])
def test_exit_cache_has_k_plus_one_layers(tmp_path, exit):
    base_dir = tmp_path / "base"
    tiny_model("llama").save_pretrained(base_dir)
    char_tokenizer().save_pretrained(base_dir)
    insert(str(base_dir), [exit], tmp_path / "ckpt")
    model, _ = load_balcony(tmp_path / "ckpt")
    cache, _ = decode_steps(model.exit_model(exit), torch.tensor([[5, 6, 7]]), steps=2)
    assert cache.get_seq_length() == 5
    full_cache, _ = decode_steps(model.base, torch.tensor([[5, 6, 7]]), steps=2)
    assert cache_size(cache)["layers"] == exit + 1
    assert cache_size(cache)["bytes_per_token"] * 4 == cache_size(full_cache)["bytes_per_token"] * (exit + 1)


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def eval_document(checkpoint, fingerprint: str) -> dict:
    rows = [
        {"name": name, "kind": kind, "average": average, "tasks": {"hellaswag": {}}}
        for name, kind, average in (
            ("full", "full", 0.5),
            ("exit 1", "exit", 0.3),
            ("naive 1", "naive", 0.26),
            ("exit 2", "exit", 0.4),
            ("naive 2", "naive", 0.27),
        )
    ]
    return {
        "schema_version": 1,
        "checkpoint": {"path": str(checkpoint), "fingerprint": fingerprint},
        "rows": rows,
    }


def test_plot_is_png_of_expected_size(checkpoint, tmp_path):
    from balcony_cli.checkpoint import checkpoint_fingerprint

    eval_json = tmp_path / "eval.json"
    eval_json.write_text(json.dumps(eval_document(checkpoint, checkpoint_fingerprint(checkpoint))))
    plot = tmp_path / "tradeoff.png"
    result = runner.invoke(
        app,
        [
            "bench",
            "-c",
            str(checkpoint),
            "--baselines",
            "naive",
            *FAST,
            "--eval-json",
            str(eval_json),
            "--plot",
            str(plot),
        ],
    )
    assert result.exit_code == 0, result.output
    assert png_size(plot) == (700, 500)


def test_eval_json_from_other_checkpoint_rejected(checkpoint, tmp_path):
    eval_json = tmp_path / "eval.json"
    eval_json.write_text(json.dumps(eval_document(tmp_path / "other", "sha256:" + "1" * 64)))
    plot = tmp_path / "tradeoff.png"
    result = runner.invoke(
        app, ["bench", "-c", str(checkpoint), *FAST, "--eval-json", str(eval_json), "--plot", str(plot)]
    )
    assert result.exit_code == 2, result.output
    assert "--eval-json" in result.output
    assert "other" in result.output
    assert not plot.exists()


def test_speculative_bench_json_rows(checkpoint, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The 3th fox jumps\n\nA lazy dog\n")
    out = tmp_path / "spec.json"
    result = runner.invoke(app, ["bench", "-c", str(checkpoint), "--speculative", "--prompts", str(prompts),
                                 "--draft-exits", "2", "--draft-tokens", "2", "--max-new-tokens", "6",
                                 "--json", str(out)])
    assert result.exit_code == 0, result.output
    document = json.loads(out.read_text())
    assert document["settings"]["draft_exits"] == [2]
    kinds = [row["kind"] for row in document["rows"]]
    assert kinds == ["full", "speculative", "assistant_early_exit"]
    speculative = document["rows"][1]
    assert speculative["identical"] is True
    assert speculative["draft_exit"] == 2
    assert 0.0 <= speculative["acceptance_rate"] <= 1.0
    assert speculative["tokens_per_s"] > 0


def test_speculative_bench_needs_prompts(checkpoint):
    result = runner.invoke(app, ["bench", "-c", str(checkpoint), "--speculative"])
    assert result.exit_code == 2
    assert "--prompts" in result.output
