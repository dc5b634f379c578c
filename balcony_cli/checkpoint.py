"""The saved Balcony format and atomic file writes.

A Balcony directory sits next to its base model and never copies it:
- balcony_config.json: base model reference and fingerprint, exits, initialisation, architecture,
  library versions and training status;
- balcony.safetensors: only the Balcony layers and exit norms.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from balcony_cli import __version__
from balcony_cli.errors import BadInputError
from balcony_cli.loading import ModelSource, load_base_model, resolve_model
from balcony_cli.model import BalconyModel

logger = logging.getLogger(__name__)

CONFIG_NAME = "balcony_config.json"
WEIGHTS_NAME = "balcony.safetensors"
SCHEMA_VERSION = 1
# Elements hashed per tensor: enough to tell two checkpoints apart, cheap enough for an 8B base.
FINGERPRINT_SAMPLES = 4096


def library_versions() -> dict[str, str]:
    versions = {"balcony": __version__}
    for package in ("torch", "transformers", "accelerate", "datasets", "safetensors"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def fingerprint_weights(model: torch.nn.Module) -> str:
    """Return a SHA-256 fingerprint of a model's weights.

    It covers every parameter's name, shape and dtype, and an evenly strided sample of
    FINGERPRINT_SAMPLES values from each. Two bases that differ only in unsampled values would get
    the same fingerprint, which is acceptable for its purpose: catching a checkpoint loaded on the
    wrong base model.
    """
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        flat = param.detach().reshape(-1)
        stride = max(1, flat.numel() // FINGERPRINT_SAMPLES)
        sample = flat[::stride][:FINGERPRINT_SAMPLES].to(device="cpu", dtype=torch.float32)
        digest.update(f"{name}:{tuple(param.shape)}:{param.dtype};".encode())
        digest.update(sample.numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def checkpoint_fingerprint(directory: Path) -> str:
    """Return the SHA-256 of a checkpoint's balcony.safetensors, naming its trained exits exactly.

    Reports (eval, bench, the export model card) carry it, so that one report can be checked
    against another from the same checkpoint.
    """
    digest = hashlib.sha256()
    try:
        with open(Path(directory) / WEIGHTS_NAME, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except FileNotFoundError:
        raise BadInputError(f"{Path(directory) / WEIGHTS_NAME}: missing; the checkpoint is incomplete") from None
    return "sha256:" + digest.hexdigest()


# Atomic writes.


def _default_file_mode(directory: bool = False) -> int:
    """Return the mode a plain open() or mkdir() would give, under the process umask.

    tempfile creates files as 0600 and directories as 0700; renamed into place as is, outputs
    would be unreadable to other users.
    """
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file so that a reader sees either the old content or the new, never a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, _default_file_mode())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def atomic_write_json(path: Path, document: Any) -> None:
    atomic_write_bytes(path, (json.dumps(document, indent=2) + "\n").encode())


@contextlib.contextmanager
def atomic_directory(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that replaces `target` when the block finishes without error.

    An existing non-empty `target` is rejected unless `overwrite` is set. On error the temporary
    directory is removed and `target` is left as it was.
    """
    target = Path(target)
    check_output_dir(target, overwrite=overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    os.chmod(temporary, _default_file_mode(directory=True))
    try:
        yield temporary
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(temporary, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(temporary, target)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def check_output_dir(path: Path, overwrite: bool = False, resume: bool | None = None) -> None:
    """Reject an existing non-empty output directory unless the user allows reuse.

    `resume` is None for verbs that have no --resume flag, so that the message does not offer it.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise BadInputError(f"output {str(path)!r} is a file, not a directory; choose another path with -o")
    if path.is_dir() and any(path.iterdir()) and not (overwrite or resume):
        resume_hint = ", --resume to continue a training run in it," if resume is not None else ""
        raise BadInputError(
            f"output directory {str(path)!r} already exists and is not empty; pass --overwrite to replace "
            f"it{resume_hint} or choose another path with -o"
        )


# The Balcony format.


def balcony_config(
    model: BalconyModel,
    source: ModelSource,
    fingerprint: str,
    trained: bool,
    training: dict | None = None,
) -> dict:
    base = model.base
    return {
        "schema_version": SCHEMA_VERSION,
        "balcony_version": __version__,
        "base_model": {
            "spec": source.spec,
            "kind": source.kind,
            "path": source.path,
            "gguf_file": source.gguf_file,
            "model_type": base.config.model_type,
            "num_layers": model.num_layers,
        },
        "base_fingerprint": fingerprint,
        "exits": model.exits,
        "init": model.init,
        "architecture": {
            "layout": model.layout.name,
            "model_class": type(base).__name__,
            "layer_class": type(model.layout.layers(base)[-1]).__name__,
        },
        "library_versions": library_versions(),
        "trained": trained,
        "training": training,
    }


def save_balcony(
    directory: Path, model: BalconyModel, config: dict, weights: dict[str, torch.Tensor] | None = None
) -> None:
    """Write balcony.safetensors and balcony_config.json into `directory`, each atomically.

    `weights` replaces the model's own Balcony state, for callers that gathered it from shards.
    The weights go first, so that a config never points at weights that were not written.
    """
    directory = Path(directory)
    if weights is None:
        weights = model.balcony_state_dict()
    state = {name: tensor.detach().contiguous().cpu() for name, tensor in weights.items()}
    handle, temporary = tempfile.mkstemp(prefix=f".{WEIGHTS_NAME}.", suffix=".tmp", dir=directory)
    os.close(handle)
    try:
        save_file(state, temporary, metadata={"format": "pt", "exits": ",".join(map(str, model.exits))})
        os.chmod(temporary, _default_file_mode())
        os.replace(temporary, directory / WEIGHTS_NAME)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    atomic_write_json(directory / CONFIG_NAME, config)


def read_balcony_config(directory: Path) -> dict:
    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    if not directory.is_dir():
        raise BadInputError(
            f"checkpoint {str(directory)!r} not found; run `balcony train` or `balcony insert` first, "
            "or pass the checkpoint directory with --checkpoint"
        )
    if not config_path.is_file():
        raise BadInputError(
            f"checkpoint {str(directory)!r} has no {CONFIG_NAME}; pass a directory written by "
            "`balcony train` or `balcony insert`"
        )
    try:
        document = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise BadInputError(f"{config_path}: invalid JSON ({error}); the checkpoint is damaged") from error
    version = document.get("schema_version") if isinstance(document, dict) else None
    if not isinstance(version, int):
        raise BadInputError(f"{config_path}: no schema_version; this is not a Balcony checkpoint config")
    if version > SCHEMA_VERSION:
        raise BadInputError(
            f"{config_path}: written by a newer Balcony (schema version {version}, this is {__version__} with "
            f"schema version {SCHEMA_VERSION}); upgrade Balcony to load it"
        )
    return document


def load_balcony_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise BadInputError(f"{path}: missing; the checkpoint is incomplete") from None
    except (SafetensorError, OSError, ValueError) as error:
        raise BadInputError(
            f"{path}: cannot be read ({error}); the file is truncated or corrupted. Restore it or "
            "retrain with `balcony train`"
        ) from error


def base_source(config: dict) -> ModelSource:
    """Return where the base model of a balcony_config.json document is.

    The built-in alias is resolved again, because the installed package may have moved.
    """
    base = config["base_model"]
    source = ModelSource(spec=base["spec"], kind=base["kind"], path=base["path"], gguf_file=base["gguf_file"])
    if source.kind == "alias":
        source = resolve_model(source.spec)
    return source


def load_balcony(
    directory: Path,
    dtype: torch.dtype = torch.float32,
    allow_base_mismatch: bool = False,
) -> tuple[BalconyModel, dict]:
    """Load a Balcony checkpoint and its base model; return the model (in eval mode) and its config."""
    directory = Path(directory)
    config = read_balcony_config(directory)
    source = base_source(config)
    base = load_base_model(source, dtype=dtype)
    fingerprint = fingerprint_weights(base)
    if fingerprint != config["base_fingerprint"]:
        message = (
            f"base model {source.spec!r} does not match the one this checkpoint was trained on "
            f"(recorded {config['base_fingerprint']}, loaded {fingerprint})"
        )
        if not allow_base_mismatch:
            raise BadInputError(message + "; load the original base, or pass --allow-base-mismatch")
        logger.warning("%s; continuing because --allow-base-mismatch is set", message)
    model = BalconyModel(base, config["exits"], init=config["init"])
    model.load_balcony_state_dict(load_balcony_weights(directory / WEIGHTS_NAME))
    model.eval()
    return model, config

