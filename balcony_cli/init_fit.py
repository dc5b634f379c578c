"""The "fit" initialisation: a closed-form correction that starts each exit near the full model's output.

Balcony layer k starts as a copy of the base's last layer. On calibration blocks, the fit records for
every token the input `a` of the layer's MLP output projection, the layer's output `y` and the base's
last residual state `t` (the input of its final norm). The output projection's contribution to `y` is
linear in its weight, and nothing else in the layer depends on that weight, so changing the weight by
D changes the output to y + a D exactly. The fit picks the D that minimises

    sum over tokens ||t - y - a D||^2 + ridge_strength * ||D||^2,

a ridge regression solved in closed form: D = (A^T A + ridge_strength I)^-1 A^T (T - Y). D is added to
the projection's weight, so the exit stays an ordinary decoder layer of the base's class and exports
as one. The exit norm is a copy of the base's final norm (set by BalconyModel), because the fitted
output imitates the state that norm reads.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from balcony_cli.model import BalconyModel

logger = logging.getLogger(__name__)

# Positions left out of the fit at the start of each block. The first position of a causal LM attends
# only to itself, and its last residual state can be far larger than the others'. In SmolLM2-135M on
# Gutenberg blocks, its mean norm was 5,291 against 998 elsewhere, so it would dominate a squared
# error summed over tokens.
SKIPPED_POSITIONS = 1


@dataclass
class FitReport:
    """How much the fit reduced one exit's error on the calibration tokens."""

    exit: int
    tokens: int
    relative_error_before: float
    """sum ||t - y||^2 / sum ||t||^2 over the calibration tokens, with the copied weights."""
    relative_error_after: float
    """The same ratio with the fitted weights."""

    def to_dict(self) -> dict[str, float | int]:
        return {
            "tokens": self.tokens,
            "relative_error_before": self.relative_error_before,
            "relative_error_after": self.relative_error_after,
        }


def _projection_weight(module: nn.Module) -> torch.Tensor:
    """Return the projection's weight as (in_features, out_features): y = a @ W (+ bias)."""
    if isinstance(module, nn.Linear):
        return module.weight.T
    # transformers' Conv1D (GPT-2) stores its weight as (in_features, out_features) already.
    if type(module).__name__ == "Conv1D":
        return module.weight
    raise TypeError(
        f"the fit initialisation needs a Linear or Conv1D MLP output projection, got {type(module).__name__}"
    )


@torch.no_grad()
def fit_exits(
    model: BalconyModel, blocks: torch.Tensor, ridge: float = 1e-2, batch_size: int = 4
) -> dict[int, FitReport]:
    """Fit each exit's MLP output projection in closed form on `blocks`, shape (num_blocks, seq_len).

    `ridge` is relative: the ridge strength is `ridge` times the mean eigenvalue of A^T A (its trace
    divided by its size), so that one value suits models of any width. Returns a report per exit.
    """
    device = next(model.base.parameters()).device
    layout = model.layout
    projections = {k: layout.mlp_output(model.exit_layers[str(k)]) for k in model.exits}
    captured: dict[str, torch.Tensor] = {}

    def capture(name: str):
        def hook(module, args):
            captured[name] = args[0]

        return hook

    handles = [layout.final_norm(model.base).register_forward_pre_hook(capture("target"))]
    for k in model.exits:
        handles.append(projections[k].register_forward_pre_hook(capture(f"features {k}")))
        handles.append(model.exit_norms[str(k)].register_forward_pre_hook(capture(f"output {k}")))

    gram: dict[int, torch.Tensor] = {}  # (features, features) per exit: A^T A
    cross: dict[int, torch.Tensor] = {}  # (features, hidden) per exit: A^T (T - Y)
    error_sums = dict.fromkeys(model.exits, 0.0)
    target_sum, tokens = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(blocks), batch_size):
            input_ids = blocks[start : start + batch_size].to(device)  # (batch, seq)
            model.forward_all(input_ids)
            target = captured["target"][:, SKIPPED_POSITIONS:].double()  # (batch, seq - skipped, hidden)
            target = target.reshape(-1, target.shape[-1])
            tokens += target.shape[0]
            target_sum += target.pow(2).sum().item()
            for k in model.exits:
                features = captured[f"features {k}"][:, SKIPPED_POSITIONS:].double()
                features = features.reshape(-1, features.shape[-1])  # (tokens, features)
                output = captured[f"output {k}"][:, SKIPPED_POSITIONS:].double()
                error = target - output.reshape(-1, output.shape[-1])  # (tokens, hidden)
                error_sums[k] += error.pow(2).sum().item()
                if k not in gram:
                    gram[k] = features.T @ features
                    cross[k] = features.T @ error
                else:
                    gram[k] += features.T @ features
                    cross[k] += features.T @ error
            captured.clear()
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if tokens == 0:
        raise ValueError("the calibration blocks hold no tokens after the skipped first position")

    reports = {}
    for k in model.exits:
        size = gram[k].shape[0]
        strength = ridge * gram[k].trace() / size
        regularised = gram[k] + strength * torch.eye(size, dtype=torch.float64, device=device)
        delta = torch.linalg.solve(regularised, cross[k])  # (features, hidden)
        # ||E - A D||^2 = ||E||^2 - 2 <D, A^T E> + <D, A^T A D>, from the sums already gathered.
        error_after = error_sums[k] - 2 * (delta * cross[k]).sum().item()
        error_after += (delta * (gram[k] @ delta)).sum().item()
        weight = _projection_weight(projections[k])
        weight.add_(delta.to(weight.dtype))
        reports[k] = FitReport(
            exit=k,
            tokens=tokens,
            relative_error_before=error_sums[k] / target_sum,
            relative_error_after=max(error_after, 0.0) / target_sum,
        )
        logger.info(
            "fit exit %d on %d tokens: relative error %.4f -> %.4f",
            k, tokens, reports[k].relative_error_before, reports[k].relative_error_after,
        )
    return reports


def calibration_blocks(blocks: Sequence, count: int, seed: int) -> torch.Tensor:
    """Draw `count` packed training blocks at random (all of them if there are fewer), shape (count, seq_len)."""
    generator = torch.Generator().manual_seed(seed)
    indices = torch.randperm(len(blocks), generator=generator)[:count].tolist()
    return torch.stack([blocks[index]["input_ids"] for index in indices])
