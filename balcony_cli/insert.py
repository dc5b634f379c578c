"""`balcony insert`: add untrained Balcony layers to a base model and save them."""

from __future__ import annotations

from pathlib import Path

from balcony_cli.architectures import layout_for
from balcony_cli.checkpoint import (
    atomic_directory,
    balcony_config,
    check_output_dir,
    fingerprint_weights,
    save_balcony,
)
from balcony_cli.loading import check_decoder_only, load_base_model, load_config, resolve_model
from balcony_cli.errors import BadInputError
from balcony_cli.exits import DATA_INITS, INIT_CHOICES
from balcony_cli.model import BalconyModel, parse_exits


def insert(model_spec: str, exits: list[int], output_dir: Path, init: str = "copy-last", overwrite: bool = False) -> dict:
    """Add untrained Balcony layers to a base model and save them (balcony_config.json, balcony.safetensors)."""
    if init not in INIT_CHOICES:
        raise BadInputError(f"--init {init!r}: expected one of {', '.join(INIT_CHOICES)}")
    if init in DATA_INITS:
        raise BadInputError(
            f"--init {init}: needs calibration text, which insert does not read; use `balcony train --init {init}`"
        )
    check_output_dir(output_dir, overwrite=overwrite)
    source = resolve_model(model_spec)
    config = load_config(source)
    check_decoder_only(config)
    layout_for(config)
    exits = parse_exits(exits, config.num_hidden_layers)
    base = load_base_model(source)
    model = BalconyModel(base, exits, init=init)
    document = balcony_config(model, source, fingerprint_weights(base), trained=False)
    with atomic_directory(output_dir, overwrite=overwrite) as directory:
        save_balcony(directory, model, document)
    return document

