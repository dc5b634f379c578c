"""Training-free baselines at the depth of each exit: a layer-pruned model chosen by block influence.

The naive early exit is a view of the base (`BalconyModel.naive_model`). The pruned baseline keeps
k + 1 of the base's layers, as many as exit k runs. It drops the layers whose output is most like
their input, scored as in ShortGPT (Men et al., 2024, "ShortGPT: Layers in Large Language Models
are More Redundant Than You Expect"): block influence BI_i = 1 - mean cosine(x_in, x_out) over the
tokens of a calibration text. Layers with the lowest influence go first.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from balcony_cli.architectures import layout_for
from balcony_cli.errors import BadInputError
from balcony_cli.model import build_view
from balcony_cli.perplexity import DATA_DIR_ENV

CALIBRATION_TOKENS = 4096
CALIBRATION_WINDOW = 512
GUTENBERG_BOOKS = Path("gutenberg") / "books"


def default_calibration_text() -> Path | None:
    """Return the first Gutenberg book under $BALCONY_DATA_DIR: the kind of text the exits train on."""
    data_dir = os.environ.get(DATA_DIR_ENV)
    if not data_dir:
        return None
    books = sorted((Path(data_dir) / GUTENBERG_BOOKS).glob("*.txt"))
    return books[0] if books else None


@torch.no_grad()
def block_influence(base: nn.Module, windows: Sequence[torch.Tensor]) -> list[float]:
    """Score each decoder layer by 1 - mean cosine similarity of its input and output hidden states.

    `windows` are 1-D token id tensors, run one at a time so that no padding enters the mean.
    """
    layout = layout_for(base.config)
    layers = layout.layers(base)
    device = next(base.parameters()).device
    similarity_sums = [0.0] * len(layers)
    tokens = 0

    def make_hook(index: int):
        def hook(module, args, kwargs, output):
            hidden_in = args[0] if args else kwargs["hidden_states"]
            hidden_out = output[0] if isinstance(output, tuple) else output
            cosine = F.cosine_similarity(hidden_in.float(), hidden_out.float(), dim=-1)  # (batch, seq)
            similarity_sums[index] += cosine.sum().item()

        return hook

    handles = [layer.register_forward_hook(make_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        for window in windows:
            layout.body(base)(input_ids=window.unsqueeze(0).to(device), use_cache=False)
            tokens += len(window)
    finally:
        for handle in handles:
            handle.remove()
    if tokens == 0:
        raise BadInputError("the calibration text has no tokens; pass a longer --calibration-text")
    return [1.0 - total / tokens for total in similarity_sums]


def layers_to_keep(influence: Sequence[float], count: int) -> list[int]:
    """Return the 0-based indices of the `count` most influential layers, in model order."""
    if not 1 <= count <= len(influence):
        raise BadInputError(f"cannot keep {count} of {len(influence)} layers")
    ranked = sorted(range(len(influence)), key=lambda i: influence[i], reverse=True)
    return sorted(ranked[:count])


@dataclass
class PrunedModel:
    """A base model cut down to some of its layers, and which ones (1-based, for reports)."""

    model: nn.Module
    kept_layers: list[int]


def pruned_model(base: nn.Module, keep: Sequence[int]) -> PrunedModel:
    """Build a model of the base's class that runs only the layers `keep` (0-based), then its final norm.

    The kept layers are copies: each gets the KV-cache index of its new position, which a shared layer
    could not have without breaking the base.
    """
    layout = layout_for(base.config)
    base_layers = layout.layers(base)
    layers = []
    for position, index in enumerate(keep):
        layer = copy.deepcopy(base_layers[index])
        layout.set_layer_index(layer, position)
        layers.append(layer)
    model = build_view(base, layers, layout.final_norm(base))
    layer_types = getattr(base.config, "layer_types", None)
    if layer_types is not None:
        # The view's body shares this config object, so both see the kept layers' types.
        model.config.layer_types = [layer_types[i] for i in keep]
    return PrunedModel(model=model, kept_layers=[i + 1 for i in keep])


def pruned_layers(
    base: nn.Module, tokenizer, calibration_text: Path, exits: Sequence[int]
) -> dict[int, list[int]]:
    """Score block influence once on a calibration text, and pick the 0-based layers pruned k keeps.

    Returns one list per exit k in `exits`.
    """
    from balcony_cli.perplexity import perplexity_windows, read_eval_text

    windows = perplexity_windows(
        tokenizer, read_eval_text(calibration_text), CALIBRATION_TOKENS, CALIBRATION_WINDOW
    )
    influence = block_influence(base, windows)
    return {k: layers_to_keep(influence, k + 1) for k in exits}
