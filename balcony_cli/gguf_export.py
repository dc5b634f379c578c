"""Write a model of the base's class as one GGUF file, in llama.cpp's conventions.

Tensor names come from `gguf.get_tensor_name_map` and metadata keys from `gguf.GGUFWriter`. The
value transforms follow llama.cpp's convert_hf_to_gguf.py. Llama-style q/k rows are permuted for its
rotary layout, and GPT-2's Conv1D weights are transposed. 1-D tensors, norms, biases and position
embeddings stay in F32 whatever the requested type.

The file must load back with transformers' GGUF reader (`from_pretrained(dir, gguf_file=...)`) into
the same model. That reader rebuilds the config from a few metadata keys and assumes defaults for
the rest, so before any tensor is written, a metadata-only probe file is read back and its config
is compared with the model's; a field the reader cannot carry rejects the export.
"""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from balcony_cli.errors import BadInputError, BalconyError
from balcony_cli.loading import ModelSource, load_tokenizer

logger = logging.getLogger(__name__)

GGUFType = Literal["f32", "f16", "q8_0"]
GGUF_TYPES: tuple[str, ...] = ("f32", "f16", "q8_0")
# llama.cpp's converter writes f16 unless another type is requested. It is half the size of f32 and
# exact for f16 weights; values beyond f16's range are rejected per tensor.
DEFAULT_GGUF_TYPE: GGUFType = "f16"


@dataclass(frozen=True)
class GGUFArchitecture:
    """Settings for writing one family of transformers models as GGUF."""

    name: str
    """`general.architecture`, the key prefix of the hyperparameters."""
    model_types: tuple[str, ...]
    permute_qk: bool = False
    """Llama-style rotary: llama.cpp stores q/k rows with each head's two halves interleaved."""
    transposed: tuple[str, ...] = ()
    """GGUF tensor kinds stored transposed: GPT-2 keeps these weights as Conv1D (in, out)."""


ARCHITECTURES: tuple[GGUFArchitecture, ...] = (
    # llama.cpp has no "mistral" architecture and writes Mistral as Llama. transformers' reader then
    # loads it as LlamaForCausalLM, which computes the same as Mistral without a sliding window.
    GGUFArchitecture("llama", ("llama", "mistral"), permute_qk=True),
    GGUFArchitecture("qwen2", ("qwen2",)),
    GGUFArchitecture("qwen3", ("qwen3",)),
    GGUFArchitecture("gpt2", ("gpt2",), transposed=("attn_qkv", "attn_output", "ffn_up", "ffn_down")),
)
SUPPORTED_MODEL_TYPES = tuple(t for arch in ARCHITECTURES for t in arch.model_types)

# Config fields that change what a model computes. The reader's config must agree on each one the
# model's config has; token ids, names and training-only fields are left out.
CHECKED_CONFIG_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "rms_norm_eps",
    "rope_parameters",
    "attention_bias",
    "mlp_bias",
    "sliding_window",
    "use_sliding_window",
    "layer_types",
    "max_position_embeddings",
    "n_positions",
    "n_inner",
    "activation_function",
    "layer_norm_epsilon",
    "scale_attn_weights",
    "scale_attn_by_inverse_layer_idx",
    "reorder_and_upcast_attn",
)

# Text that a tokenizer rebuilt from GGUF metadata must split exactly like the original: runs of
# spaces and newlines, tabs, CRLF, digits, contractions, accents, emoji and CJK.
TOKENIZER_CHECK_TEXT = (
    "Hello  world!\n\n  The 12345th fox's 'RE done? I'll go; we've 3.14 and 1,000,000.\r\n"
    "\ttabs\t\tand   spaces    end. Café naïve Ünïcödé 🦊🦊 我想 кошка\n\n\n"
)


def gguf_architecture(model_type: str) -> GGUFArchitecture:
    """Return how `model_type` is written as GGUF, or raise naming the supported types."""
    for arch in ARCHITECTURES:
        if model_type in arch.model_types:
            return arch
    reason = " (transformers has no GGUF reader for GPT-NeoX)" if model_type == "gpt_neox" else ""
    raise BadInputError(
        f"--format gguf: model type {model_type!r} cannot be exported to GGUF{reason}; supported types are "
        f"{', '.join(SUPPORTED_MODEL_TYPES)}. Use --format hf for this model"
    )


@dataclass
class GGUFFile:
    """A written GGUF file and the stored type of each tensor."""

    path: Path
    gguf_type: str
    tensor_types: dict[str, str] = field(default_factory=dict)
    """GGUF tensor name -> stored type (F32, F16 or Q8_0)."""

    @property
    def fallback_tensors(self) -> list[str]:
        """Tensors that q8_0 could not quantize (rows not a multiple of 32) and were stored as F16."""
        if self.gguf_type != "q8_0":
            return []
        return [name for name, kind in self.tensor_types.items() if kind == "F16"]


def write_gguf(
    model: nn.Module,
    source: ModelSource,
    path: Path,
    gguf_type: str = DEFAULT_GGUF_TYPE,
    name: str | None = None,
    extra_metadata: dict[str, str | int | bool] | None = None,
) -> GGUFFile:
    """Write `model` (a transformers causal LM) to `path` as GGUF with the tokenizer of `source`.

    The tokenizer metadata is copied from the base GGUF file when `source` is one, and otherwise
    built from its Hugging Face tokenizer (byte-level BPE only). `extra_metadata` goes under the
    `balcony.` key prefix. Raises BadInputError, before writing `path`, when transformers' GGUF reader
    would not rebuild the same config or tokenizer.
    """
    import gguf

    if gguf_type not in GGUF_TYPES:
        raise BadInputError(f"--gguf-type {gguf_type!r}: expected one of {', '.join(GGUF_TYPES)}")
    config = model.config
    arch = gguf_architecture(config.model_type)
    tokenizer_metadata = _tokenizer_metadata(source, config.vocab_size)

    def new_writer(target: Path):
        writer = gguf.GGUFWriter(str(target), arch.name)
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name or config.model_type)
        _add_hyperparameters(writer, arch, config)
        writer.add_file_type(_FILE_TYPES[gguf_type])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for key, value in (extra_metadata or {}).items():
            _add_scalar(writer, f"balcony.{key}", value)
        for key, (value, value_type, sub_type) in tokenizer_metadata.items():
            writer.add_key_value(key, value, value_type, sub_type)
        return writer

    with tempfile.TemporaryDirectory(prefix=".gguf-probe.", dir=path.parent) as probe_dir:
        probe = Path(probe_dir) / "probe.gguf"
        _write_and_close(new_writer(probe))
        _check_reader_config(probe, config)
        if source.gguf_file is None:
            _check_reader_tokenizer(probe, source)

    # The tensor table goes first and each tensor is converted just before it is written, so that
    # no converted copy of the whole model is held in memory.
    tensors = list(_gguf_tensors(model, arch))
    written = GGUFFile(path=path, gguf_type=gguf_type)
    writer = new_writer(path)
    for gguf_name, shape, _ in tensors:
        kind = _stored_type(gguf_name, shape, gguf_type)
        writer.add_tensor_info(
            gguf_name, shape, np.dtype(np.float32), _stored_bytes(shape, kind), raw_dtype=kind
        )
        written.tensor_types[gguf_name] = kind.name
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for gguf_name, _, load in tensors:
            kind = gguf.GGMLQuantizationType[written.tensor_types[gguf_name]]
            writer.write_tensor_data(_encode(gguf_name, load(), kind))
        writer.close()
    except BaseException:
        writer.close()
        path.unlink(missing_ok=True)
        raise
    if written.fallback_tensors:
        logger.warning(
            "q8_0 needs rows that are a multiple of 32 values; %d tensors were stored as F16 instead: %s",
            len(written.fallback_tensors),
            ", ".join(written.fallback_tensors[:5]),
        )
    return written


def _write_and_close(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


_FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7}  # gguf.LlamaFileType: ALL_F32, MOSTLY_F16, MOSTLY_Q8_0


def _add_scalar(writer, key: str, value: str | int | bool) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    else:
        writer.add_string(key, str(value))


# Hyperparameters.


def _rope_theta(config) -> float:
    parameters = getattr(config, "rope_parameters", None) or {}
    theta = parameters.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise BalconyError(f"the {config.model_type} config has no rope_theta; cannot write rope.freq_base")
    return float(theta)


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _add_hyperparameters(writer, arch: GGUFArchitecture, config) -> None:
    writer.add_block_count(config.num_hidden_layers)
    if arch.name == "gpt2":
        writer.add_context_length(config.n_positions)
        writer.add_embedding_length(config.n_embd)
        writer.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
        writer.add_head_count(config.n_head)
        writer.add_layer_norm_eps(config.layer_norm_epsilon)
        return
    head_dim = _head_dim(config)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    # llama.cpp needs these when heads x head_dim differs from the hidden size (Qwen3).
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)


# Tensors.


def _permute_rotary_rows(weights: np.ndarray, heads: int) -> np.ndarray:
    """Reorder a q or k projection's rows from the Hugging Face rotary layout to llama.cpp's.

    Per head, HF rotates the first half of the head dimension against the second; llama.cpp rotates
    adjacent pairs. Rows (heads, 2, half) become (heads, half, 2).
    """
    return (
        weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _gguf_tensors(
    model: nn.Module, arch: GGUFArchitecture
) -> Iterator[tuple[str, tuple[int, ...], Callable[[], np.ndarray]]]:
    """Yield (GGUF name, shape in GGUF layout, loader of the float32 array) for every parameter.

    named_parameters() lists a tied LM head once, under the embedding, so no `output.weight` is
    written for it. transformers' reader takes a missing `output.weight` as tied embeddings.
    """
    import gguf

    config = model.config
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.name.upper()], config.num_hidden_layers)
    for hf_name, param in model.named_parameters():
        module_name, _, suffix = hf_name.rpartition(".")
        base_name = name_map.get_name(module_name)
        if base_name is None:
            raise BalconyError(
                f"parameter {hf_name!r} has no GGUF tensor name for architecture {arch.name!r}"
            )
        kind = base_name.rpartition(".")[2]
        heads = None
        if arch.permute_qk and kind == "attn_q":
            heads = config.num_attention_heads
        elif arch.permute_qk and kind == "attn_k":
            heads = config.num_key_value_heads
        transpose = kind in arch.transposed and suffix == "weight"
        shape = tuple(param.shape)[::-1] if transpose else tuple(param.shape)

        def load(param=param, heads=heads, transpose=transpose) -> np.ndarray:
            data = param.detach().to(device="cpu", dtype=torch.float32).numpy()
            if heads is not None:
                data = _permute_rotary_rows(data, heads)
            return np.ascontiguousarray(data.T if transpose else data)

        yield f"{base_name}.{suffix}", shape, load


def _stored_type(name: str, shape: tuple[int, ...], gguf_type: str):
    """Return the gguf.GGMLQuantizationType a tensor is stored in, following llama.cpp's converter."""
    import gguf

    kinds = gguf.GGMLQuantizationType
    keep_f32 = (
        gguf_type == "f32"
        or len(shape) <= 1
        or not name.endswith(".weight")
        or name.endswith("_norm.weight")
        or name.startswith("position_embd.")
    )
    if keep_f32:
        return kinds.F32
    block_size, _ = gguf.GGML_QUANT_SIZES[kinds.Q8_0]
    if gguf_type == "q8_0" and shape[-1] % block_size == 0:
        return kinds.Q8_0
    # f16, and q8_0 rows that are not a whole number of blocks: F16, as llama.cpp's converter does.
    return kinds.F16


def _stored_bytes(shape: tuple[int, ...], kind) -> int:
    import gguf

    block_size, block_bytes = gguf.GGML_QUANT_SIZES[kind]
    return math.prod(shape) // block_size * block_bytes


def _encode(name: str, data: np.ndarray, kind) -> np.ndarray:
    """Convert one float32 tensor to its stored form of type `kind`."""
    import gguf

    kinds = gguf.GGMLQuantizationType
    if kind == kinds.F32:
        return data.astype(np.float32, copy=False)
    if kind == kinds.Q8_0:
        return gguf.quants.quantize(data, kinds.Q8_0)
    half = data.astype(np.float16)
    if not np.isfinite(half).all():
        raise BadInputError(
            f"--gguf-type: tensor {name} has values beyond the float16 range (max |x| "
            f"{np.abs(data).max():.3g}); use --gguf-type f32"
        )
    return half


# Tokenizer metadata.


def _tokenizer_metadata(source: ModelSource, vocab_size: int) -> dict[str, tuple]:
    """Return {key: (value, GGUFValueType, array element type)} for the `tokenizer.*` keys."""
    if source.gguf_file is not None:
        return _copy_gguf_tokenizer(Path(source.path) / source.gguf_file)
    return _byte_level_bpe_metadata(source, vocab_size)


def _copy_gguf_tokenizer(path: Path) -> dict[str, tuple]:
    """Copy every `tokenizer.*` key of a GGUF file, with its stored value types."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    metadata = {}
    for key, entry in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        value_type = entry.types[0]
        sub_type = entry.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        metadata[key] = (entry.contents(), value_type, sub_type)
    if "tokenizer.ggml.tokens" not in metadata:
        raise BadInputError(f"base GGUF file {str(path)!r} has no tokenizer metadata; use --format hf")
    return metadata


# transformers' GGUF reader rebuilds a byte-level BPE tokenizer ("gpt2" in tokenizer.ggml.model)
# with GPT-2's split pattern unless `tokenizer.ggml.pre` names one of its known patterns. These are
# llama.cpp's names for the Llama 3 and Qwen2 patterns.
_PRE_TOKENIZER_NAMES = ("llama-bpe", "qwen2")
_SUPPORTED_TOKENIZERS = (
    "byte-level BPE tokenizers that split like GPT-2, Llama 3 or Qwen2, or any tokenizer of a GGUF base model"
)


def _byte_level_bpe_metadata(source: ModelSource, vocab_size: int) -> dict[str, tuple]:
    """Build llama.cpp's tokenizer metadata from a Hugging Face byte-level BPE tokenizer.

    Token types follow llama.cpp: special added tokens are CONTROL, other added tokens USER_DEFINED,
    and ids the tokenizer lacks up to the model's vocabulary size are `[PAD<id>]` tokens of type UNUSED.
    """
    import json

    import gguf

    tokenizer = load_tokenizer(source)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = json.loads(backend.to_str()) if backend is not None else {}
    model_state = state.get("model") or {}
    if model_state.get("type") != "BPE" or not _is_byte_level(state):
        raise BadInputError(
            f"--format gguf: the tokenizer of {source.spec!r} is not a byte-level BPE tokenizer; GGUF export "
            f"supports {_SUPPORTED_TOKENIZERS}. Use --format hf"
        )
    pre = _pre_tokenizer_name(state.get("pre_tokenizer"))
    if pre is None:
        raise BadInputError(
            f"--format gguf: the pre-tokenizer of {source.spec!r} splits text in a way that transformers' "
            f"GGUF reader cannot rebuild; GGUF export supports {_SUPPORTED_TOKENIZERS}. Use --format hf"
        )

    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise BadInputError(
            f"--format gguf: the tokenizer of {source.spec!r} has token ids up to {max(vocab.values())}, "
            f"beyond the model's vocabulary of {vocab_size}; use --format hf"
        )
    by_id = {index: token for token, index in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, token_types = [], []
    for index in range(vocab_size):
        if index not in by_id:
            tokens.append(f"[PAD{index}]")
            token_types.append(gguf.TokenType.UNUSED)
        elif index in added:
            tokens.append(by_id[index])
            token_types.append(
                gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED
            )
        else:
            tokens.append(by_id[index])
            token_types.append(gguf.TokenType.NORMAL)
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model_state.get("merges", [])]

    kinds = gguf.GGUFValueType
    metadata: dict[str, tuple] = {
        "tokenizer.ggml.model": ("gpt2", kinds.STRING, None),
        "tokenizer.ggml.pre": (pre, kinds.STRING, None),
        "tokenizer.ggml.tokens": (tokens, kinds.ARRAY, kinds.STRING),
        "tokenizer.ggml.token_type": ([int(t) for t in token_types], kinds.ARRAY, kinds.INT32),
        "tokenizer.ggml.merges": (merges, kinds.ARRAY, kinds.STRING),
    }
    for key, token_id in (
        ("bos_token_id", tokenizer.bos_token_id),
        ("eos_token_id", tokenizer.eos_token_id),
        ("unknown_token_id", tokenizer.unk_token_id),
        ("padding_token_id", tokenizer.pad_token_id),
    ):
        if token_id is not None:
            metadata[f"tokenizer.ggml.{key}"] = (int(token_id), kinds.UINT32, None)
    bos_added = bool(
        tokenizer.bos_token_id is not None and tokenizer("a").input_ids[:1] == [tokenizer.bos_token_id]
    )
    metadata["tokenizer.ggml.add_bos_token"] = (bos_added, kinds.BOOL, None)
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        metadata["tokenizer.chat_template"] = (tokenizer.chat_template, kinds.STRING, None)
    return metadata


def _is_byte_level(state: dict) -> bool:
    decoder = state.get("decoder") or {}
    return decoder.get("type") == "ByteLevel"


def _pre_tokenizer_name(pre_tokenizer: dict | None) -> str | None:
    """Return the `tokenizer.ggml.pre` value whose split transformers' reader rebuilds, or None."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    if pre_tokenizer is None:
        return None
    if pre_tokenizer.get("type") == "ByteLevel":
        plain = pre_tokenizer.get("use_regex", True) and not pre_tokenizer.get("add_prefix_space", False)
        return "gpt2" if plain else None
    steps = pre_tokenizer.get("pretokenizers") if pre_tokenizer.get("type") == "Sequence" else None
    if not steps or len(steps) != 2:
        return None
    split, byte_level = steps
    pattern = (split.get("pattern") or {}).get("Regex")
    if (
        split.get("type") != "Split"
        or byte_level.get("type") != "ByteLevel"
        or byte_level.get("use_regex", True)
    ):
        return None
    for name in _PRE_TOKENIZER_NAMES:
        if GGUF_PRE_TOKENIZER_SPLITS.get(name) == pattern:
            return name
    return None


# Checks against transformers' GGUF reader.


def _values_match(expected, actual) -> bool:
    if isinstance(expected, dict) and isinstance(actual, dict):
        keys = set(expected) | set(actual)
        return all(_values_match(expected.get(key), actual.get(key)) for key in keys)
    if isinstance(expected, float) and isinstance(actual, (int, float)):
        # GGUF stores floats as float32: 1e-5 comes back as 9.99999974e-06.
        return math.isclose(expected, actual, rel_tol=1e-6)
    if isinstance(expected, (list, tuple)) and isinstance(actual, (list, tuple)):
        return list(expected) == list(actual)
    return expected == actual


def _effective(config, name: str):
    value = getattr(config, name, None)
    if name == "head_dim" and value is None and getattr(config, "num_attention_heads", None):
        return config.hidden_size // config.num_attention_heads
    return value


def _check_reader_config(probe: Path, config) -> None:
    """Raise BadInputError when transformers would rebuild a config that computes differently."""
    from transformers import AutoConfig

    rebuilt = AutoConfig.from_pretrained(str(probe.parent), gguf_file=probe.name)
    differences = [
        f"{name}={_effective(rebuilt, name)!r} instead of {_effective(config, name)!r}"
        for name in CHECKED_CONFIG_FIELDS
        if hasattr(config, name) and not _values_match(_effective(config, name), _effective(rebuilt, name))
    ]
    if differences:
        raise BadInputError(
            f"--format gguf: transformers' GGUF reader would load this {config.model_type} model with "
            f"{'; '.join(differences)}, so the file would not reproduce the model. Use --format hf"
        )


def _check_reader_tokenizer(probe: Path, source: ModelSource) -> None:
    """Raise BadInputError when the tokenizer rebuilt from the metadata splits text differently."""
    from transformers import AutoTokenizer

    original = load_tokenizer(source)
    rebuilt = AutoTokenizer.from_pretrained(str(probe.parent), gguf_file=probe.name)
    expected = original(TOKENIZER_CHECK_TEXT, add_special_tokens=False).input_ids
    actual = rebuilt(TOKENIZER_CHECK_TEXT, add_special_tokens=False).input_ids
    if actual != expected:
        raise BadInputError(
            f"--format gguf: the tokenizer that transformers rebuilds from the GGUF metadata splits text "
            f"differently from the tokenizer of {source.spec!r}; GGUF export supports "
            f"{_SUPPORTED_TOKENIZERS}. Use --format hf"
        )
