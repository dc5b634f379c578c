"""Self-generated training text: prompts from paragraph starts, sampling, the file and the CLI verb."""

from __future__ import annotations

import json
from types import SimpleNamespace

import torch
import yaml
from conftest import char_tokenizer, tiny_model
from tokenizers import decoders
from typer.testing import CliRunner

from balcony_cli.cli import app
from balcony_cli.data import build_splits, resolve_data
from balcony_cli.selfgen import GENERATED_FILE, REPORT_FILE, GenerationSettings, generate_to_directory, sample

TEXTS = ["First paragraph of the first text.\n\nSecond one, also long enough.\n\nshort",
         "Another text starts here and goes on.\r\n\r\nIts last paragraph is here."]
STARTS = ["First pa", "Second o", "Another ", "Its last"]


def joining_tokenizer():
    """The character tokenizer, decoding without a space between characters."""
    tokenizer = char_tokenizer()
    tokenizer.backend_tokenizer.decoder = decoders.Fuse()
    return tokenizer


def test_generated_file_starts_with_paragraph_prompts(tmp_path):
    settings = GenerationSettings(tokens=60, prompt_tokens=8, new_tokens=10, batch_size=3, seed=1)
    result = generate_to_directory(tiny_model("llama"), joining_tokenizer(), TEXTS, tmp_path, settings, "texts")
    lines = [json.loads(line)["text"] for line in (tmp_path / GENERATED_FILE).read_text().splitlines()]
    assert result.generated_tokens >= 60
    assert result.documents == len(lines)
    assert all(any(text.startswith(start) for start in STARTS) for text in lines)
    # Paragraph "short" is too short for an 8-token prompt, so it never starts a sample.
    assert not any(text.startswith("short") for text in lines)
    report = yaml.safe_load((tmp_path / REPORT_FILE).read_text())
    assert report["generated_tokens"] == result.generated_tokens
    assert report["seconds"] > 0
    # Each line is the prompt followed by its sample: more characters than the 8-character prompt.
    assert sum(len(text) for text in lines) > 8 * len(lines)


def test_same_seed_gives_same_text(tmp_path):
    settings = GenerationSettings(tokens=30, prompt_tokens=8, new_tokens=10, batch_size=2, seed=3)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        generate_to_directory(tiny_model("llama"), char_tokenizer(), TEXTS, tmp_path / name, settings, "texts")
    assert (tmp_path / "a" / GENERATED_FILE).read_text() == (tmp_path / "b" / GENERATED_FILE).read_text()


class ScriptedModel(torch.nn.Module):
    """A stand-in causal LM whose next token follows a script, whatever the input."""

    def __init__(self, script: list[int], vocab: int = 10):
        super().__init__()
        self.script, self.vocab, self.calls = script, vocab, 0
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, cache=None, use_cache=True, logits_to_keep=0):
        logits = torch.full((input_ids.shape[0], 1, self.vocab), -1e4)
        logits[:, :, self.script[min(self.calls, len(self.script) - 1)]] = 1e4
        self.calls += 1
        return SimpleNamespace(logits=logits, cache=None)


def test_sample_stops_before_end_of_sequence():
    model = ScriptedModel([5, 6, 9, 7])
    prompts = torch.zeros(2, 3, dtype=torch.long)
    continuations = sample(model, prompts, new_tokens=8, temperature=1.0, eos_token_id=9,
                           generator=torch.Generator().manual_seed(0))
    assert continuations == [[5, 6], [5, 6]]
    # Every sequence ended at the third token, so the loop stopped there: one prefill and two steps.
    assert model.calls == 3


def test_generate_data_cli_writes_usable_data(tiny_model_dir, corpus_dir, tmp_path):
    output = tmp_path / "generated"
    result = CliRunner().invoke(app, [
        "generate-data", str(tiny_model_dir), "--prompts-from", str(corpus_dir), "-o", str(output),
        "--tokens", "80", "--prompt-tokens", "8", "--new-tokens", "20", "--batch-size", "4",
    ])
    assert result.exit_code == 0, result.output
    assert "generated tokens" in result.output
    assert (output / GENERATED_FILE).is_file()
    train_blocks, _ = build_splits(resolve_data(str(output)), char_tokenizer(), seq_len=8, val_blocks=1, seed=0)
    assert len(train_blocks) >= 5
    again = CliRunner().invoke(app, [
        "generate-data", str(tiny_model_dir), "--prompts-from", str(corpus_dir), "-o", str(output), "--tokens", "10",
    ])
    assert again.exit_code == 2
    assert "--overwrite" in again.output
