"""Fixtures: tiny random models of every supported layout, built in memory."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, LlamaConfig, MistralConfig
from transformers import Qwen2Config, Qwen3Config

VOCAB = 100
NUM_LAYERS = 4

# Tiny models run fastest on one thread, and single-threaded tests do not fight over the cores with
# the training subprocesses some tests start: with OpenMP spin-waiting, two 2-thread processes on two
# cores can run many times slower than one.
torch.set_num_threads(1)


def tiny_config(model_type: str):
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=NUM_LAYERS,
                  num_attention_heads=4, max_position_embeddings=256)
    if model_type == "llama":
        return LlamaConfig(num_key_value_heads=2, tie_word_embeddings=True, **common)
    if model_type == "mistral":
        return MistralConfig(num_key_value_heads=2, sliding_window=None, **common)
    if model_type == "qwen2":
        return Qwen2Config(num_key_value_heads=2, **common)
    if model_type == "qwen3":
        return Qwen3Config(num_key_value_heads=2, head_dim=8, **common)
    if model_type == "gpt2":
        return GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=NUM_LAYERS, n_head=4, n_positions=256)
    if model_type == "gpt_neox":
        return GPTNeoXConfig(**common)
    raise ValueError(model_type)


MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gpt2", "gpt_neox")


def tiny_model(model_type: str = "llama", seed: int = 0):
    torch.manual_seed(seed)
    config = tiny_config(model_type)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    # from_config leaves the norms at ones; random norm weights make a test notice a swapped norm.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or "ln_" in name:
                param.normal_(1.0, 0.2)
    return model.eval()


@pytest.fixture(params=MODEL_TYPES)
def model_type(request) -> str:
    return request.param


def char_tokenizer():
    """A character-level tokenizer over printable ASCII, built in memory (no hub download)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(code): code - 32 for code in range(32, 127)}
    for token in ("\n", "<eos>", "<unk>", "<pad>"):
        vocab[token] = len(vocab)
    assert len(vocab) <= VOCAB
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>", pad_token="<pad>"
    )


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A tiny random Llama saved as a local Hugging Face directory, with a tokenizer."""
    directory = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(directory)
    char_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture
def corpus_dir(tmp_path):
    """A few kilobytes of text in two files."""
    directory = tmp_path / "corpus"
    directory.mkdir()
    sentences = [f"The {i}th fox jumps over {i % 7} lazy dogs near river {i % 5}.\n" for i in range(120)]
    (directory / "a.txt").write_text("".join(sentences[:60]))
    (directory / "b.txt").write_text("".join(sentences[60:]))
    return directory


@pytest.fixture(autouse=True)
def offline_hub(monkeypatch):
    """Keep every test off the network: hub ids fail at once, as on an offline machine."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


def read_losses(directory) -> list[tuple[int, float]]:
    """Return (step, loss) pairs from a run's metrics.jsonl, validation lines left out."""
    import json

    lines = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in lines if "loss" in r]


def assert_same_run(expected_dir, actual_dir) -> None:
    """Check that two training runs logged the same loss curve and saved the same Balcony weights."""
    from safetensors.torch import load_file

    expected, actual = read_losses(expected_dir), read_losses(actual_dir)
    assert [step for step, _ in actual] == [step for step, _ in expected]
    for (_, want), (_, got) in zip(expected, actual):
        assert got == pytest.approx(want, rel=1e-5)
    expected_weights = load_file(str(expected_dir / "balcony.safetensors"))
    actual_weights = load_file(str(actual_dir / "balcony.safetensors"))
    for name, tensor in expected_weights.items():
        torch.testing.assert_close(actual_weights[name], tensor, rtol=1e-5, atol=1e-6)
