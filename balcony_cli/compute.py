"""Relative compute: the forward FLOPs per token of a row (full, exit, naive, pruned) against the full model.

Every verb that reports or selects by compute (eval's table, bench's ideal speedup, generate's
`--budget`) goes through this module, so that the figures agree.

FLOPs are counted as 2 per weight of every matrix product (linear layers and the LM head). Token
and position lookups, norms, activations and residual additions are left out: together they are
well under 1% of a layer's matrix products at the model sizes Balcony targets. Attention scores
grow with the context, so they are counted only when a context length is given.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from balcony_cli.architectures import layout_for
from balcony_cli.errors import BadInputError


def matmul_weights(module: nn.Module) -> int:
    """Count the weights that take part in matrix products inside `module`.

    Covers `nn.Linear` and transformers' GPT-2 `Conv1D` (a linear layer with a transposed weight).
    """
    total = 0
    for sub in module.modules():
        if isinstance(sub, nn.Linear) or type(sub).__name__ == "Conv1D":
            total += sub.weight.numel()
    return total


@dataclass(frozen=True)
class ComputeProfile:
    """Forward FLOPs per token of the parts of one base model."""

    num_layers: int
    layer_flops: int
    """One decoder layer's matrix products (every layer of a supported model has the same size)."""
    head_flops: int
    """The LM head: 2 x hidden size x vocabulary size."""
    attention_width: int
    """Query heads x head dimension: the width of the score and value products per context token."""

    @classmethod
    def of(cls, base: nn.Module) -> ComputeProfile:
        layout = layout_for(base.config)
        layers = layout.layers(base)
        config = base.config
        heads = getattr(config, "num_attention_heads", None) or config.n_head
        hidden = getattr(config, "hidden_size", None) or config.n_embd
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        return cls(
            num_layers=len(layers),
            layer_flops=2 * matmul_weights(layers[0]),
            head_flops=2 * layout.head(base).weight.numel(),
            attention_width=heads * head_dim,
        )

    def flops_per_token(self, layers: int, context_tokens: int = 0) -> int:
        """FLOPs to produce one token's logits from `layers` decoder layers and the LM head.

        With `context_tokens` > 0, each layer also counts its attention scores and weighted sum over
        that many earlier tokens (2 products of 2 FLOPs per query-key pair and head dimension).
        """
        attention = 4 * context_tokens * self.attention_width
        return layers * (self.layer_flops + attention) + self.head_flops

    def relative_compute(self, layers: int, context_tokens: int = 0) -> float:
        """Divide the FLOPs per token of a row that runs `layers` layers by the full model's."""
        full = self.flops_per_token(self.num_layers, context_tokens)
        return self.flops_per_token(layers, context_tokens) / full

    def ideal_speedup(self, layers: int, context_tokens: int = 0) -> float:
        """Compute the speedup over the full model that the FLOP count alone promises."""
        return 1.0 / self.relative_compute(layers, context_tokens)


def exit_layers(exit: int | None, num_layers: int) -> int:
    """Decoder layers that exit k runs: layers 1..k and its Balcony layer (None: the full model)."""
    return num_layers if exit is None or exit == num_layers else exit + 1


def exit_for_budget(budget: float, exits: list[int], profile: ComputeProfile) -> int | None:
    """Pick the deepest exit whose relative compute is at most `budget` (None: the full model).

    The full model's relative compute is 1, so a budget of 1 picks it.
    """
    if not 0 < budget <= 1:
        raise BadInputError(f"--budget {budget}: expected a fraction of the full model's compute in (0, 1]")
    if budget >= 1:
        return None
    fitting = [k for k in exits if profile.relative_compute(exit_layers(k, profile.num_layers)) <= budget]
    if not fitting:
        smallest = min(exits)
        cost = profile.relative_compute(exit_layers(smallest, profile.num_layers))
        raise BadInputError(
            f"--budget {budget}: no exit fits; the cheapest is exit {smallest} at {cost:.3f} "
            "of the full model's compute; give at least that"
        )
    return max(fitting)
