"""The `balcony` model of lm-evaluation-harness: one row of a Balcony checkpoint behind the harness's HFLM.

Every row (full model, exit k, naive exit k, pruned k) is an ordinary transformers model of the base's
class, so the harness's own HFLM scores it: tokenisation, batching, loglikelihood and metrics are the
harness's. This class only builds the row's model and hands it to HFLM.

Importing `balcony_cli` registers the name (see `balcony_cli/__init__.py`), so that
`lm_eval.simple_evaluate(model="balcony", model_args="pretrained=CHECKPOINT,exit=15", ...)` works.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
from lm_eval.models.huggingface import HFLM
from torch import nn

from balcony_cli.errors import BadInputError
from balcony_cli.model import BalconyModel

logger = logging.getLogger(__name__)

RowKind = Literal["full", "exit", "naive", "pruned"]
ROW_KINDS: tuple[RowKind, ...] = ("full", "exit", "naive", "pruned")


@dataclass
class Row:
    """One evaluated model: its kind, its exit layer and the transformers model that runs it."""

    kind: RowKind
    k: int | None
    model: nn.Module
    layers: int
    kept_layers: list[int] | None = None

    @property
    def name(self) -> str:
        return "full" if self.kind == "full" else f"{self.kind} {self.k}"


def parse_exit(value: int | str | None, model: BalconyModel) -> int | None:
    """Parse the `exit` model argument: a layer index, or "full", None or the layer count for the full model."""
    if value is None or str(value).strip().lower() in ("", "full", "none"):
        return None
    try:
        exit = int(value)
    except (TypeError, ValueError):
        raise BadInputError(f"exit={value!r}: expected a layer index such as 15, or 'full'") from None
    return None if exit == model.num_layers else exit


def build_row(model: BalconyModel, kind: RowKind, k: int | None, pruned_keep: list[int] | None = None) -> Row:
    """Build the row of `kind` at exit layer `k`. Pruned rows need `pruned_keep`, the 0-based layers kept."""
    if kind not in ROW_KINDS:
        raise BadInputError(f"kind={kind!r}: expected one of {', '.join(ROW_KINDS)}")
    if kind == "full" or k is None:
        return Row("full", None, model.base, model.num_layers)
    if kind == "exit":
        return Row("exit", k, model.exit_model(k), k + 1)
    if kind == "naive":
        return Row("naive", k, model.naive_model(k), k)
    from balcony_cli.baselines import pruned_model

    if pruned_keep is None:
        raise BadInputError(f"pruned {k}: no layers chosen; compute block influence first")
    pruned = pruned_model(model.base, pruned_keep)
    return Row("pruned", k, pruned.model, len(pruned_keep), kept_layers=pruned.kept_layers)


def row_plan(exits: list[int], baselines: list[str], full: bool = True) -> list[tuple[RowKind, int | None]]:
    """List the rows to run in table order: the full model, then per exit k: exit k, pruned k, naive k."""
    plan: list[tuple[RowKind, int | None]] = [("full", None)] if full else []
    for k in exits:
        plan.append(("exit", k))
        if "prune" in baselines:
            plan.append(("pruned", k))
        if "naive" in baselines:
            plan.append(("naive", k))
    return plan


class BalconyLM(HFLM):
    """lm-evaluation-harness model for one row of a Balcony checkpoint.

    Model arguments are `pretrained` (the checkpoint directory, default balcony-out) and `exit` (a layer
    index, or `full`). `kind` picks exit, naive or pruned (default exit). `dtype`, `allow_base_mismatch`
    and `progress` (the harness's progress bars) follow, then the usual HFLM ones (batch_size,
    max_length, ...). A pruned row first scores block influence on the default calibration text. `balcony eval` passes a ready `Row` and tokenizer instead of a path.
    """

    def __init__(
        self,
        pretrained: str | Row = "balcony-out",
        exit: int | str | None = None,
        kind: RowKind = "exit",
        tokenizer=None,
        device: str | None = "cpu",
        dtype: str | torch.dtype = "float32",
        batch_size: int | str = 1,
        allow_base_mismatch: bool = False,
        progress: bool = True,
        **kwargs,
    ) -> None:
        if isinstance(pretrained, Row):
            row = pretrained
        else:
            row, tokenizer = _row_from_checkpoint(
                str(pretrained), exit, kind, dtype, bool(allow_base_mismatch)
            )
        # HFLM ignores `device` when it is given a model object, so the model is placed here.
        if device is not None:
            row.model.to(device)
        self.row = row
        self.progress = bool(progress)
        super().__init__(pretrained=row.model, tokenizer=tokenizer, batch_size=batch_size, **kwargs)

    # The harness passes no disable_tqdm from simple_evaluate, so its bars would show even when stdout
    # is not a terminal. These overrides apply `progress` instead.

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self.progress)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm or not self.progress)

    def generate_until(self, requests, disable_tqdm: bool = False):
        return super().generate_until(requests, disable_tqdm=disable_tqdm or not self.progress)


def _row_from_checkpoint(checkpoint: str, exit, kind: RowKind, dtype, allow_base_mismatch: bool):
    from balcony_cli.checkpoint import base_source, load_balcony
    from balcony_cli.loading import load_tokenizer

    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    model, config = load_balcony(checkpoint, dtype=torch_dtype, allow_base_mismatch=allow_base_mismatch)
    if not config.get("trained"):
        logger.warning("checkpoint %s is untrained: its exits are evaluated as inserted", checkpoint)
    k = parse_exit(exit, model)
    keep = None
    if kind == "pruned" and k is not None:
        keep = _pruned_keep(model, load_tokenizer(base_source(config)), k)
    row = build_row(model, kind if k is not None else "full", k, pruned_keep=keep)
    return row, load_tokenizer(base_source(config))


def _pruned_keep(model: BalconyModel, tokenizer, k: int) -> list[int]:
    from balcony_cli.baselines import default_calibration_text, pruned_layers

    text = default_calibration_text()
    if text is None:
        raise BadInputError(
            "kind=pruned needs a calibration text; set BALCONY_DATA_DIR to the shared data folder"
        )
    return pruned_layers(model.base, tokenizer, text, [k])[k]
