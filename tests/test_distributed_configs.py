"""The accelerate configs shipped for multi-GPU training parse, and only Balcony parameters train."""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType
from conftest import tiny_model

from balcony_cli.model import BalconyModel
from balcony_cli.recipe import load_recipe
from balcony_cli.train import build_optimizer

ROOT = Path(__file__).resolve().parents[1]


def test_fsdp_config_parses():
    config = load_config_from_file(str(ROOT / "configs" / "accelerate" / "fsdp-8gpu.yaml"))
    assert config.distributed_type == DistributedType.FSDP
    assert config.num_processes == 8
    assert config.mixed_precision == "bf16"
    fsdp = config.fsdp_config
    assert fsdp["fsdp_sharding_strategy"] == "FULL_SHARD"
    # A unit holding both frozen base and trainable Balcony parameters needs the original params.
    assert fsdp["fsdp_use_orig_params"] is True
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp["fsdp_transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"


def test_fsdp_wrap_class_matches_llama_layers():
    model = BalconyModel(tiny_model("llama"), [1, 2])
    config = load_config_from_file(str(ROOT / "configs" / "accelerate" / "fsdp-8gpu.yaml"))
    wrap_class = config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"]
    assert type(model.base.model.layers[0]).__name__ == wrap_class
    assert type(model.exit_layers["1"]).__name__ == wrap_class


def test_optimizer_holds_only_balcony_parameters():
    model = BalconyModel(tiny_model("llama"), [1, 3])
    recipe = load_recipe(ROOT / "recipes" / "llama3-8b.yaml")
    optimizer = build_optimizer(model, recipe)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    balcony = {id(p) for p in model.balcony_parameters()}
    base = {id(p) for p in model.base.parameters()}
    assert in_optimizer == balcony
    assert not in_optimizer & base
    assert all(not p.requires_grad for p in model.base.parameters())
    assert all(p.requires_grad for p in model.balcony_parameters())
    assert optimizer.param_groups[0]["lr"] == recipe.lr

    # One step creates AdamW state for Balcony parameters alone.
    model.train()
    losses = model(torch.randint(0, 50, (1, 6)), exit="all", loss_temperature=1.0).losses
    losses.sum().backward()
    optimizer.step()
    assert {id(p) for p in optimizer.state} == balcony
