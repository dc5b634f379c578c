"""Relative compute and budget selection, against FLOP counts worked out by hand."""

from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM, LlamaConfig

from balcony_cli.compute import ComputeProfile, exit_for_budget, exit_layers
from balcony_cli.errors import BadInputError
from conftest import tiny_model


def test_tiny_llama_flops_by_hand():
    profile = ComputeProfile.of(tiny_model("llama"))
    # hidden 32, 4 query heads of 8, 2 KV heads, MLP 64: q 32x32, k and v 32x16, o 32x32, MLP 3 x 32x64.
    layer_weights = 32 * 32 + 2 * 32 * 16 + 32 * 32 + 3 * 32 * 64
    assert profile.layer_flops == 2 * layer_weights == 18432
    assert profile.head_flops == 2 * 32 * 100
    assert profile.flops_per_token(3) == 3 * 18432 + 6400
    assert profile.relative_compute(3) == pytest.approx((3 * 18432 + 6400) / (4 * 18432 + 6400))
    # Attention scores and the weighted sum: 4 FLOPs per context token and query dimension per layer.
    assert profile.flops_per_token(2, context_tokens=10) == 2 * (18432 + 4 * 10 * 32) + 6400


def test_gpt2_conv1d_weights_are_counted():
    profile = ComputeProfile.of(tiny_model("gpt2"))
    # c_attn 32x96, c_proj 32x32, MLP 32x128 and 128x32.
    assert profile.layer_flops == 2 * (32 * 96 + 32 * 32 + 2 * 32 * 128)


def test_smollm2_shape_ideal_speedup():
    """SmolLM2-135M's shape: 21 of 30 layers promise a 1.31x speedup."""
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=2,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
    )
    profile = ComputeProfile.of(AutoModelForCausalLM.from_config(config))
    profile = ComputeProfile(30, profile.layer_flops, profile.head_flops, profile.attention_width)
    assert profile.layer_flops == 2 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536)
    assert profile.ideal_speedup(21) == pytest.approx(1.31, abs=0.005)


def test_budget_picks_deepest_fitting_exit():
    profile = ComputeProfile(num_layers=10, layer_flops=100, head_flops=0, attention_width=1)
    exits = [2, 5, 7]
    assert exit_layers(5, 10) == 6
    assert exit_layers(None, 10) == 10
    assert exit_for_budget(0.6, exits, profile) == 5  # exit 5 runs 6 of 10 layers
    assert exit_for_budget(0.59, exits, profile) == 2
    assert exit_for_budget(0.8, exits, profile) == 7
    assert exit_for_budget(1.0, exits, profile) is None


@pytest.mark.parametrize("budget", [0.0, -0.5, 1.5])
def test_budget_outside_range_is_refused(budget):
    profile = ComputeProfile(num_layers=10, layer_flops=100, head_flops=0, attention_width=1)
    with pytest.raises(BadInputError, match="--budget"):
        exit_for_budget(budget, [2, 5], profile)


def test_budget_below_every_exit_names_the_cheapest():
    profile = ComputeProfile(num_layers=10, layer_flops=100, head_flops=0, attention_width=1)
    with pytest.raises(BadInputError, match="cheapest is exit 2 at 0.300"):
        exit_for_budget(0.2, [2, 5], profile)
