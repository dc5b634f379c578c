"""`balcony export --format gguf` on tiny random models, read back with transformers' GGUF reader."""

from __future__ import annotations

import functools
import json
import logging

import gguf
import numpy as np
import pytest
import torch
from conftest import char_tokenizer, tiny_config
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from balcony_cli.checkpoint import CONFIG_NAME, WEIGHTS_NAME, load_balcony
from balcony_cli.cli import app
from balcony_cli.export import export
from balcony_cli.gguf_export import TOKENIZER_CHECK_TEXT, write_gguf
from balcony_cli.insert import insert
from balcony_cli.loading import resolve_model

runner = CliRunner()

# Byte-level BPE needs its 256 byte tokens, so these models have a larger vocabulary than conftest's.
BPE_VOCAB = 320
GGUF_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gpt2")
SUPPORTED_LIST = "llama, mistral, qwen2, qwen3, gpt2"


@functools.cache
def bpe_tokenizer():
    """A byte-level BPE tokenizer of 300 tokens, trained in memory on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(
        [f"The {i}th fox jumps over {i % 7} lazy dogs.\n" for i in range(200)], trainer
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|endoftext|>", bos_token="<|endoftext|>"
    )


def gguf_config(model_type: str, **changes):
    """A tiny config that transformers' GGUF reader can rebuild.

    The reader assumes head_dim 128 for Qwen3 and 1024 positions for GPT-2, so those are set here.
    """
    config = tiny_config(model_type)
    config.vocab_size = BPE_VOCAB
    if model_type == "qwen3":
        config.head_dim = 128
    if model_type == "gpt2":
        config.n_positions = 1024
    for name, value in changes.items():
        setattr(config, name, value)
    return config


def make_checkpoint(tmp_path, model_type: str = "llama", exits=(1, 2), tokenizer=None, **changes):
    """Insert exits into a tiny random base saved with a BPE tokenizer; perturb them and mark them trained."""
    config = gguf_config(model_type, **changes)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    with torch.no_grad():
        for name, param in base.named_parameters():
            if "norm" in name or "ln_" in name:
                param.normal_(1.0, 0.2)
    base_dir = tmp_path / f"base-{model_type}"
    base.save_pretrained(base_dir)
    (tokenizer or bpe_tokenizer()).save_pretrained(base_dir)
    checkpoint = tmp_path / f"ckpt-{model_type}"
    insert(str(base_dir), list(exits), checkpoint)
    torch.manual_seed(1)
    weights = {
        name: tensor + 0.05 * torch.randn_like(tensor)
        for name, tensor in load_file(str(checkpoint / WEIGHTS_NAME)).items()
    }
    save_file(weights, str(checkpoint / WEIGHTS_NAME))
    document = json.loads((checkpoint / CONFIG_NAME).read_text())
    document["trained"] = True
    document["training"] = {"steps": 7, "train_tokens": 1234, "data": "corpus", "recipe": {"lr": 0.001}}
    (checkpoint / CONFIG_NAME).write_text(json.dumps(document))
    return checkpoint


def gguf_fields(path) -> dict:
    reader = gguf.GGUFReader(str(path))
    return {key: field.contents() for key, field in reader.fields.items()}


def gguf_tensor_types(path) -> dict[str, str]:
    return {tensor.name: tensor.tensor_type.name for tensor in gguf.GGUFReader(str(path)).tensors}


@torch.no_grad()
@pytest.mark.parametrize("model_type", GGUF_MODEL_TYPES)
def test_gguf_f32_matches_exit(tmp_path, model_type):
    checkpoint = make_checkpoint(tmp_path, model_type)
    output = tmp_path / "export"
    [result] = export(checkpoint, 2, output, format="gguf", gguf_type="f32")
    assert result.gguf_file == "exit-2-f32.gguf"
    assert sorted(p.name for p in output.iterdir()) == ["README.md", "exit-2-f32.gguf"]

    exported = AutoModelForCausalLM.from_pretrained(output, gguf_file=result.gguf_file, dtype=torch.float32)
    # llama.cpp writes Mistral as Llama; without a sliding window the two compute the same.
    assert exported.config.model_type == ("llama" if model_type == "mistral" else model_type)
    assert exported.config.num_hidden_layers == 3
    model, _ = load_balcony(checkpoint)
    input_ids = torch.randint(0, BPE_VOCAB, (2, 9))
    torch.testing.assert_close(exported(input_ids).logits, model(input_ids, exit=2).logits, rtol=0, atol=1e-5)

    tokenizer = AutoTokenizer.from_pretrained(output, gguf_file=result.gguf_file)
    original = AutoTokenizer.from_pretrained(tmp_path / f"base-{model_type}")
    assert tokenizer(TOKENIZER_CHECK_TEXT).input_ids == original(TOKENIZER_CHECK_TEXT).input_ids
    assert tokenizer.eos_token == "<|endoftext|>"


@torch.no_grad()
def test_gguf_types_store_expected_tensors(tmp_path):
    checkpoint = make_checkpoint(tmp_path, "llama")
    model, _ = load_balcony(checkpoint)
    input_ids = torch.randint(0, BPE_VOCAB, (2, 9))
    reference = model(input_ids, exit=2).logits
    sizes = {}
    # Tolerances measured on this model: f16 differs by about 1.5e-4, q8_0 by about 4e-3.
    for gguf_type, matrix_type, tolerance in (
        ("f32", "F32", 1e-5),
        ("f16", "F16", 2e-3),
        ("q8_0", "Q8_0", 3e-2),
    ):
        output = tmp_path / f"export-{gguf_type}"
        [result] = export(checkpoint, 2, output, format="gguf", gguf_type=gguf_type)
        path = output / result.gguf_file
        sizes[gguf_type] = path.stat().st_size
        assert result.weights_bytes == sizes[gguf_type]

        types = gguf_tensor_types(path)
        assert types["token_embd.weight"] == matrix_type
        assert types["blk.2.attn_q.weight"] == matrix_type
        assert types["blk.2.ffn_down.weight"] == matrix_type
        assert types["blk.0.attn_norm.weight"] == "F32"
        assert types["output_norm.weight"] == "F32"
        assert gguf_fields(path)["general.file_type"] == {"f32": 0, "f16": 1, "q8_0": 7}[gguf_type]

        exported = AutoModelForCausalLM.from_pretrained(
            output, gguf_file=result.gguf_file, dtype=torch.float32
        )
        difference = (exported(input_ids).logits - reference).abs().max().item()
        assert difference <= tolerance, (gguf_type, difference)
    assert sizes["f32"] > sizes["f16"] > sizes["q8_0"]


def test_gguf_metadata_and_tensor_layout(tmp_path):
    checkpoint = make_checkpoint(tmp_path, "llama")
    output = tmp_path / "export"
    [result] = export(checkpoint, 2, output, format="gguf", gguf_type="f32")
    fields = gguf_fields(output / result.gguf_file)
    expected = {
        "general.architecture": "llama",
        "llama.block_count": 3,
        "llama.context_length": 256,
        "llama.embedding_length": 32,
        "llama.feed_forward_length": 64,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "llama.rope.dimension_count": 8,
        "llama.vocab_size": BPE_VOCAB,
        "balcony.exit": 2,
        "balcony.trained": True,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt2",
    }
    for key, value in expected.items():
        assert fields[key] == value, key
    assert fields["llama.rope.freq_base"] == pytest.approx(10000.0)
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    assert len(fields["tokenizer.ggml.tokens"]) == BPE_VOCAB
    # Ids the tokenizer lacks, up to the model's vocabulary, are UNUSED padding tokens.
    assert fields["tokenizer.ggml.tokens"][-1] == f"[PAD{BPE_VOCAB - 1}]"
    assert fields["tokenizer.ggml.token_type"][-1] == gguf.TokenType.UNUSED

    reader = gguf.GGUFReader(str(output / result.gguf_file))
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    # The tiny Llama ties its head to the embeddings, so there is no separate output tensor.
    assert "output.weight" not in tensors
    assert len([name for name in tensors if name.startswith("blk.")]) == 3 * 9

    # Layer 3 of the export is Balcony layer 2; its q rows are stored in llama.cpp's rotary order.
    model, _ = load_balcony(checkpoint)
    q_weight = model.exit_layers["2"].self_attn.q_proj.weight.detach().numpy()
    heads, head_dim = 4, 8
    expected_q = q_weight.reshape(heads, 2, head_dim // 2, 32).swapaxes(1, 2).reshape(q_weight.shape)
    stored_q = np.asarray(tensors["blk.2.attn_q.weight"].data).reshape(q_weight.shape)
    np.testing.assert_array_equal(stored_q, expected_q)
    stored_norm = np.asarray(tensors["output_norm.weight"].data)
    np.testing.assert_array_equal(stored_norm, model.exit_norms["2"].weight.detach().numpy())


def test_gguf_untied_head_is_written(tmp_path):
    checkpoint = make_checkpoint(tmp_path, "qwen2")
    output = tmp_path / "export"
    [result] = export(checkpoint, 1, output, format="gguf")
    types = gguf_tensor_types(output / result.gguf_file)
    assert types["output.weight"] == "F16"
    assert types["blk.1.attn_q.bias"] == "F32"
    assert result.gguf_type == "f16"


def test_gguf_base_tokenizer_copied(tmp_path):
    """A GGUF base model's tokenizer metadata goes into the export unchanged."""
    base_dir = tmp_path / "hf-base"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(gguf_config("llama")).save_pretrained(base_dir)
    bpe_tokenizer().save_pretrained(base_dir)
    base_model = AutoModelForCausalLM.from_pretrained(base_dir)
    base_gguf = tmp_path / "gguf-base" / "tiny.gguf"
    base_gguf.parent.mkdir()
    write_gguf(base_model, resolve_model(str(base_dir)), base_gguf, gguf_type="f32", name="tiny")

    checkpoint = tmp_path / "ckpt"
    insert(str(base_gguf), [2], checkpoint)
    output = tmp_path / "export"
    [result] = export(checkpoint, 2, output, format="gguf", gguf_type="f32")

    base_fields = gguf_fields(base_gguf)
    exported_fields = gguf_fields(output / result.gguf_file)
    tokenizer_keys = sorted(key for key in base_fields if key.startswith("tokenizer."))
    assert "tokenizer.ggml.merges" in tokenizer_keys
    assert sorted(key for key in exported_fields if key.startswith("tokenizer.")) == tokenizer_keys
    for key in tokenizer_keys:
        assert exported_fields[key] == base_fields[key], key

    exported = AutoModelForCausalLM.from_pretrained(output, gguf_file=result.gguf_file, dtype=torch.float32)
    model, _ = load_balcony(checkpoint)
    input_ids = torch.randint(0, BPE_VOCAB, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(
            exported(input_ids).logits, model(input_ids, exit=2).logits, rtol=0, atol=1e-5
        )


def test_gguf_export_all_exits(tmp_path):
    checkpoint = make_checkpoint(tmp_path, "llama", exits=(1, 3))
    output = tmp_path / "export"
    results = export(checkpoint, "all", output, format="gguf", gguf_type="q8_0")
    assert [r.exit for r in results] == [1, 3]
    assert sorted(p.name for p in (output / "exit-3").iterdir()) == ["README.md", "exit-3-q8_0.gguf"]
    assert gguf_fields(output / "exit-1" / "exit-1-q8_0.gguf")["llama.block_count"] == 2
    assert results[1].directory == output / "exit-3"


def test_gguf_q8_0_falls_back_to_f16(tmp_path, caplog):
    """Rows of 48 values cannot be cut into 32-value Q8_0 blocks, so those matrices are stored as F16."""
    checkpoint = make_checkpoint(tmp_path, "llama", hidden_size=48)
    output = tmp_path / "export"
    with caplog.at_level(logging.WARNING, logger="balcony_cli"):
        [result] = export(checkpoint, 2, output, format="gguf", gguf_type="q8_0")
    types = gguf_tensor_types(output / result.gguf_file)
    assert types["blk.2.attn_q.weight"] == "F16"  # 48 input features
    assert types["blk.2.ffn_down.weight"] == "Q8_0"  # 64 input features
    assert "stored as F16" in caplog.text
    # The embedding and q, k, v, gate and up of each of the 3 layers read 48 features; o_proj reads
    # 4 heads x head_dim 8 = 32 and stays Q8_0.
    assert types["blk.2.attn_output.weight"] == "Q8_0"
    card = (output / "README.md").read_text()
    assert "16 matrices have rows that are not a multiple of 32 values" in card


def test_gguf_cli_overwrite_and_json(tmp_path):
    checkpoint = make_checkpoint(tmp_path, "llama")
    output = tmp_path / "export"
    output.mkdir()
    (output / "keep.txt").write_text("keep")
    argv = ["export", "-c", str(checkpoint), "--exit", "2", "-o", str(output), "--format", "gguf"]

    result = runner.invoke(app, argv)
    assert result.exit_code == 2, result.output
    assert "--overwrite" in result.output
    assert [p.name for p in output.iterdir()] == ["keep.txt"]

    result = runner.invoke(app, [*argv, "--overwrite", "--json", "-"])
    assert result.exit_code == 0, result.output
    [row] = json.loads(result.stdout)["exports"]
    assert row["format"] == "gguf"
    assert row["gguf_type"] == "f16"
    assert row["gguf_file"] == "exit-2-f16.gguf"
    assert row["weights_bytes"] == (output / "exit-2-f16.gguf").stat().st_size
    assert sorted(p.name for p in output.iterdir()) == ["README.md", "exit-2-f16.gguf"]


def sliding_mistral(tmp_path):
    return make_checkpoint(tmp_path, "mistral", sliding_window=16)


def neox_checkpoint(tmp_path):
    return make_checkpoint(tmp_path, "gpt_neox")


def qwen3_small_heads(tmp_path):
    return make_checkpoint(tmp_path, "qwen3", head_dim=8)


def overflowing_checkpoint(tmp_path):
    """A checkpoint whose Balcony layer 2 has one weight beyond float16's range (max 65504)."""
    checkpoint = make_checkpoint(tmp_path, "llama")
    weights = load_file(str(checkpoint / WEIGHTS_NAME))
    weights["exit_layers.2.mlp.up_proj.weight"][0, 0] = 1e6
    save_file(weights, str(checkpoint / WEIGHTS_NAME))
    return checkpoint


def char_tokenizer_checkpoint(tmp_path):
    return make_checkpoint(tmp_path, "llama", tokenizer=char_tokenizer())


# (case id, checkpoint builder, extra flags, fragments the error line must contain)
BAD_GGUF_CASES = [
    ("gpt-neox", neox_checkpoint, [], ["'gpt_neox'", "no GGUF reader", SUPPORTED_LIST, "--format hf"]),
    ("qwen3-head-dim", qwen3_small_heads, [], ["head_dim=128 instead of 8", "--format hf"]),
    ("mistral-sliding-window", sliding_mistral, [], ["sliding_window=None instead of 16"]),
    ("char-tokenizer", char_tokenizer_checkpoint, [], ["not a byte-level BPE tokenizer", "--format hf"]),
    ("f16-overflow", overflowing_checkpoint, [], ["blk.2.ffn_up.weight", "float16 range", "--gguf-type f32"]),
    ("bad-type", make_checkpoint, ["--gguf-type", "q4_0"], ["--gguf-type 'q4_0'", "f32, f16, q8_0"]),
]


@pytest.mark.parametrize(
    ("build", "flags", "fragments"), [c[1:] for c in BAD_GGUF_CASES], ids=[c[0] for c in BAD_GGUF_CASES]
)
def test_gguf_bad_input_exits_2(tmp_path, build, flags, fragments):
    checkpoint = build(tmp_path)
    output = tmp_path / "export"
    result = runner.invoke(
        app, ["export", "-c", str(checkpoint), "--exit", "2", "-o", str(output), "--format", "gguf", *flags]
    )
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    assert "Traceback" not in result.output
    assert not output.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_gguf_type_needs_gguf_format(tmp_path):
    checkpoint = make_checkpoint(tmp_path, "llama")
    output = tmp_path / "export"
    result = runner.invoke(
        app, ["export", "-c", str(checkpoint), "--exit", "2", "-o", str(output), "--gguf-type", "f16"]
    )
    assert result.exit_code == 2, result.output
    assert "--gguf-type f16: applies only to --format gguf" in result.output
    assert not output.exists()
