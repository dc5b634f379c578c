"""Exit lists: parsing and validation, kept free of torch so that the CLI imports it cheaply."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from balcony_cli.errors import BadInputError

Init = Literal["copy-last", "copy-next", "fit", "random"]
INIT_CHOICES: tuple[str, ...] = ("copy-last", "copy-next", "fit", "random")
# Initialisations that need calibration text, so only `balcony train` can apply them.
DATA_INITS: tuple[str, ...] = ("fit",)


def parse_exits(text: str | Sequence[int], num_layers: int | None = None) -> list[int]:
    """Parse and validate an exit list such as "10,15,20" or "all".

    Exits are 1-based layer indices k with 1 <= k < num_layers. "all" needs num_layers and means every
    valid k. Without num_layers, only the syntax is checked.
    """
    if isinstance(text, str):
        stripped = text.strip()
        if stripped == "all":
            if num_layers is None:
                raise BadInputError("--exits all: the number of layers is not known yet; list the exits")
            return list(range(1, num_layers))
        parts = [part.strip() for part in stripped.split(",")] if stripped else []
        if not parts or any(part == "" for part in parts):
            raise BadInputError(
                f"--exits {text!r}: expected a comma-separated list of layer indices, such as 10,15,20"
            )
        exits = []
        for part in parts:
            try:
                exits.append(int(part))
            except ValueError:
                raise BadInputError(
                    f"--exits {text!r}: {part!r} is not an integer; pass layer indices such as 10,15,20"
                ) from None
    else:
        exits = [int(k) for k in text]
        if not exits:
            raise BadInputError("--exits: the list is empty; pass layer indices such as 10,15,20")

    duplicates = sorted({k for k in exits if exits.count(k) > 1})
    if duplicates:
        raise BadInputError(
            f"--exits {','.join(map(str, exits))}: exit {duplicates[0]} is listed twice; list each exit once"
        )
    if num_layers is not None:
        for k in exits:
            if not 1 <= k < num_layers:
                raise BadInputError(
                    f"--exits {','.join(map(str, exits))}: exit {k} is out of range; the model has "
                    f"{num_layers} layers, so exits must lie in 1..{num_layers - 1}"
                )
    return sorted(exits)
