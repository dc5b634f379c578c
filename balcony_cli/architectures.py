"""One small adapter per model layout: where the layers, norms, head and position encoding live.

Every supported transformers model keeps its decoder layers in one ModuleList inside a body module,
followed by a final norm and an LM head. The adapters below only name those attributes and know how
to call one layer by hand, so the rest of Balcony stays free of per-architecture branches.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from balcony_cli.errors import BadInputError


@dataclass(frozen=True)
class Layout:
    """Attribute names of one family of decoder-only models, with rotary position embeddings."""

    name: str
    model_types: tuple[str, ...]
    body_attr: str = "model"
    layers_attr: str = "layers"
    final_norm_attr: str = "norm"
    embed_attr: str = "embed_tokens"
    layer_input_norm_attr: str = "input_layernorm"
    attention_attr: str = "self_attn"
    mlp_output_attr: str = "mlp.down_proj"
    """Dotted path, inside a decoder layer, of the MLP's output projection, whose output is added to the
    residual stream."""

    # Access to the modules of a loaded causal LM.

    def body(self, model: nn.Module) -> nn.Module:
        return getattr(model, self.body_attr)

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return getattr(self.body(model), self.layers_attr)

    def final_norm(self, model: nn.Module) -> nn.Module:
        return getattr(self.body(model), self.final_norm_attr)

    def head(self, model: nn.Module) -> nn.Module:
        return model.get_output_embeddings()

    def layer_input_norm(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.layer_input_norm_attr)

    def mlp_output(self, layer: nn.Module) -> nn.Module:
        return layer.get_submodule(self.mlp_output_attr)

    def set_layer_index(self, layer: nn.Module, index: int) -> None:
        """Point a layer's attention at KV-cache slot `index` (0-based)."""
        getattr(layer, self.attention_attr).layer_idx = index

    def rotary_embedding(self, model: nn.Module) -> nn.Module | None:
        return getattr(self.body(model), "rotary_emb", None)

    # A hand-written forward pass, used by tests as an independent reference for the exits.

    def embed(self, model: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return getattr(self.body(model), self.embed_attr)(input_ids)

    def call_layer(
        self,
        model: nn.Module,
        layer: nn.Module,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
    ) -> torch.Tensor:
        """Run one decoder layer causally over the whole sequence, without a cache or padding mask."""
        rotary = self.rotary_embedding(model)
        position_embeddings = rotary(hidden, position_ids=position_ids)
        # With no attention mask, the eager and SDPA attention functions fall back to a causal mask.
        return layer(
            hidden,
            attention_mask=None,
            position_ids=position_ids,
            position_embeddings=position_embeddings,
        )

    # Config rewriting for a model with fewer layers.

    def truncated_config(self, config, num_layers: int):
        """Copy `config` for a model of the same architecture with its first `num_layers` layer slots.

        Per-layer lists (layer types, for models that mix sliding and full attention) are cut to match.
        """
        config = copy.deepcopy(config)
        config.num_hidden_layers = num_layers
        layer_types = getattr(config, "layer_types", None)
        if layer_types is not None:
            config.layer_types = list(layer_types[:num_layers])
        if getattr(config, "max_window_layers", None) is not None:
            config.max_window_layers = min(config.max_window_layers, num_layers)
        return config


@dataclass(frozen=True)
class GPT2Layout(Layout):
    """GPT-2: learned absolute position embeddings added to the token embeddings."""

    body_attr: str = "transformer"
    layers_attr: str = "h"
    final_norm_attr: str = "ln_f"
    embed_attr: str = "wte"
    layer_input_norm_attr: str = "ln_1"
    attention_attr: str = "attn"
    mlp_output_attr: str = "mlp.c_proj"

    def rotary_embedding(self, model: nn.Module) -> nn.Module | None:
        return None

    def embed(self, model: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        body = self.body(model)
        return body.wte(input_ids) + body.wpe(position_ids)

    def call_layer(self, model, layer, hidden, position_ids):
        return layer(hidden, attention_mask=None, position_ids=position_ids)


@dataclass(frozen=True)
class GPTNeoXLayout(Layout):
    """GPT-NeoX and Pythia: a rotary model with its own attribute names."""

    body_attr: str = "gpt_neox"
    final_norm_attr: str = "final_layer_norm"
    embed_attr: str = "embed_in"
    attention_attr: str = "attention"
    mlp_output_attr: str = "mlp.dense_4h_to_h"


LAYOUTS: tuple[Layout, ...] = (
    Layout(name="llama", model_types=("llama", "mistral", "qwen2", "qwen3")),
    GPT2Layout(name="gpt2", model_types=("gpt2",)),
    GPTNeoXLayout(name="gpt_neox", model_types=("gpt_neox",)),
)

SUPPORTED_MODEL_TYPES = tuple(t for layout in LAYOUTS for t in layout.model_types)


def layout_for(config) -> Layout:
    """Return the adapter for a model config, or raise naming the unsupported model type."""
    model_type = getattr(config, "model_type", "unknown")
    for layout in LAYOUTS:
        if model_type in layout.model_types:
            return layout
    raise BadInputError(
        f"model type {model_type!r} is not supported; Balcony supports {', '.join(SUPPORTED_MODEL_TYPES)}"
    )
