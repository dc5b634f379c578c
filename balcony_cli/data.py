"""Training text: find the files, tokenise and pack them into fixed-length blocks with `datasets`."""

from __future__ import annotations

import codecs
import glob
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from balcony_cli.errors import BadInputError

logger = logging.getLogger(__name__)

# File suffix -> datasets builder name.
BUILDERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass(frozen=True)
class DataSource:
    spec: str
    builder: str
    """A datasets builder ("text", "json", "parquet"), or "hub" for a hub dataset id."""
    files: tuple[str, ...] = ()


_VARIABLE = re.compile(r"\$(\w+|\{\w+\})")


def expand_variables(spec: str, flag: str = "--data", variables: Mapping[str, str] | None = None) -> str:
    """Replace $NAME and ${NAME} with environment variables (or `variables`), and a leading ~ with home."""

    def replace(match: re.Match) -> str:
        name = match.group(1).strip("{}")
        value = (variables or {}).get(name, os.environ.get(name))
        if value is None:
            raise BadInputError(
                f"{flag} {spec!r}: the environment variable {name} is not set; set it, or write the path out"
            )
        return value

    return os.path.expanduser(_VARIABLE.sub(replace, spec))


def resolve_data(spec: str | None) -> DataSource:
    """Find the training files named by --data: files, folders (searched recursively) or globs."""
    if not spec:
        raise BadInputError(
            "--data is missing: pass training text as .txt/.jsonl/.parquet files, a folder, a glob, "
            "or a hub dataset id"
        )
    path = Path(expand_variables(spec))
    spec_expanded = str(path)
    if path.is_dir():
        candidates = sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix in BUILDERS)
    elif path.is_file():
        candidates = [str(path)]
    elif glob.has_magic(spec_expanded):
        candidates = sorted(p for p in glob.glob(spec_expanded, recursive=True) if Path(p).is_file())
    elif spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return DataSource(spec=spec, builder="hub")
    else:
        raise BadInputError(f"--data {spec!r}: no such file or folder. Check the path.")

    if not candidates:
        raise BadInputError(
            f"--data {spec!r}: no .txt, .jsonl or .parquet files found there; point it at your text files"
        )
    suffixes = {Path(p).suffix for p in candidates}
    unknown = sorted(s for s in suffixes if s not in BUILDERS)
    if unknown:
        raise BadInputError(
            f"--data {spec!r}: unsupported file type {unknown[0]!r}; use .txt, .jsonl or .parquet files"
        )
    builders = {BUILDERS[s] for s in suffixes}
    if len(builders) > 1:
        raise BadInputError(
            f"--data {spec!r}: mixes file types ({', '.join(sorted(suffixes))}); pass one type at a time"
        )
    nonempty = [p for p in candidates if Path(p).stat().st_size > 0]
    if not nonempty:
        raise BadInputError(f"--data {spec!r}: every file is empty; add text to train on")
    return DataSource(spec=spec, builder=builders.pop(), files=tuple(nonempty))


def _check_utf8(path: str, spec: str) -> None:
    """Reject a text or JSON file that is not UTF-8, naming the file and the byte offset."""
    with open(path, "rb") as file:
        offset = 0
        decoder = codecs.getincrementaldecoder("utf-8")()
        while block := file.read(1 << 20):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as error:
                raise BadInputError(
                    f"--data {spec!r}: {path} is not valid UTF-8 (byte {offset + error.start}); convert it, "
                    "for example with iconv -f latin1 -t utf-8"
                ) from None
            offset += len(block)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise BadInputError(f"--data {spec!r}: {path} ends inside a UTF-8 character; the file is truncated")


def load_text_dataset(source: DataSource, text_field: str = "text"):
    """Load the raw text as a datasets.Dataset with one column, "text"."""
    import datasets

    if source.builder == "hub":
        try:
            dataset = datasets.load_dataset(source.spec, split="train")
        except Exception as error:  # the hub client raises many types for one cause: no network
            raise BadInputError(
                f"--data {source.spec!r}: could not load it from the Hugging Face Hub ({error}); "
                "pass local .txt, .jsonl or .parquet files instead"
            ) from error
    else:
        if source.builder != "parquet":
            for path in source.files:
                _check_utf8(path, source.spec)
        if source.builder == "text":
            # One row per file keeps the text exactly as written, line breaks included.
            dataset = datasets.load_dataset(
                "text", data_files=list(source.files), split="train", sample_by="document"
            )
        else:
            dataset = datasets.load_dataset(source.builder, data_files=list(source.files), split="train")
    if text_field not in dataset.column_names:
        raise BadInputError(
            f"--data {source.spec!r}: no column {text_field!r} (columns: {', '.join(dataset.column_names)}); "
            "set text_field in the recipe"
        )
    if text_field != "text":
        dataset = dataset.rename_column(text_field, "text")
    return dataset.select_columns(["text"])


def pack_blocks(dataset, tokenizer, seq_len: int):
    """Tokenise every document, end each with the EOS token, and cut the stream into seq_len blocks.

    The tail shorter than one block is dropped. `datasets` caches both maps by content fingerprint,
    so a second run on the same text and tokenizer skips the work.
    """
    eos = tokenizer.eos_token_id

    def tokenize(batch):
        ids = tokenizer(batch["text"], add_special_tokens=False, verbose=False)["input_ids"]
        return {"input_ids": [row + [eos] if eos is not None else row for row in ids]}

    def group(batch):
        stream = [token for row in batch["input_ids"] for token in row]
        usable = len(stream) // seq_len * seq_len
        return {"input_ids": [stream[i : i + seq_len] for i in range(0, usable, seq_len)]}

    tokenized = dataset.map(tokenize, batched=True, remove_columns=["text"], desc="Tokenising")
    # One batch of 1,000 documents per group call: the tail of each batch (< seq_len tokens) is lost.
    return tokenized.map(group, batched=True, batch_size=1000, desc="Packing")


def build_splits(source: DataSource, tokenizer, seq_len: int, val_blocks: int, seed: int, text_field: str = "text"):
    """Return (train, validation) datasets of packed blocks, with the validation blocks held out at random."""
    train, validation = _split_blocks(source, tokenizer, seq_len, val_blocks, seed, text_field)
    return train.with_format("torch"), validation.with_format("torch") if validation is not None else None


def _split_blocks(source: DataSource, tokenizer, seq_len: int, val_blocks: int, seed: int, text_field: str):
    """Pack `source` into blocks and hold out validation blocks at random (both splits then come shuffled)."""
    blocks = pack_blocks(load_text_dataset(source, text_field), tokenizer, seq_len)
    minimum = 1 + (1 if val_blocks > 0 else 0)
    if len(blocks) < minimum:
        texts = list(load_text_dataset(source, text_field)["text"])
        total = sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"])
        raise BadInputError(
            f"--data {source.spec!r}: the corpus has {total} tokens, fewer than the {minimum} block(s) of "
            f"seq_len={seq_len} tokens that training needs (one is held out for validation); add text or "
            "lower --seq-len"
        )
    val_count = min(val_blocks, max(1, len(blocks) // 10)) if val_blocks > 0 else 0
    if val_count == 0:
        return blocks, None
    split = blocks.train_test_split(test_size=val_count, seed=seed, shuffle=True)
    return split["train"], split["test"]


@dataclass(frozen=True)
class DataMixture:
    """Several training sources, each with its share of the training blocks."""

    sources: tuple[DataSource, ...]
    weights: tuple[float, ...]

    @property
    def spec(self) -> str:
        return ", ".join(f"{source.spec} ({weight:g})" for source, weight in zip(self.sources, self.weights))


def resolve_mixture(mix: Mapping[str, float]) -> DataMixture:
    """Find the files of every source of a data_mix recipe entry."""
    sources = tuple(resolve_data(spec) for spec in mix)
    return DataMixture(sources=sources, weights=tuple(float(weight) for weight in mix.values()))


def build_mixture_splits(
    mixture: DataMixture, tokenizer, seq_len: int, val_blocks: int, seed: int, text_field: str = "text"
):
    """Return (train, validation) blocks drawn from several sources in proportion to their weights.

    Training blocks are drawn from source i with probability weight_i / sum(weights) until the first
    source runs out, so that no block repeats within an epoch. Each source gives validation blocks in
    proportion to its weight (at least one each).
    """
    import datasets

    total = sum(mixture.weights)
    probabilities = [weight / total for weight in mixture.weights]
    train_parts, val_parts = [], []
    for source, probability in zip(mixture.sources, probabilities):
        count = max(1, round(val_blocks * probability)) if val_blocks > 0 else 0
        train, validation = _split_blocks(source, tokenizer, seq_len, count, seed, text_field)
        if validation is None:
            # Interleaving takes each source's blocks in order, so shuffle them to draw from all of it.
            train = train.shuffle(seed=seed)
        logger.info("data mixture: %s gives %d training blocks, weight %.3f", source.spec, len(train), probability)
        train_parts.append(train)
        if validation is not None:
            val_parts.append(validation)
    train = datasets.interleave_datasets(
        train_parts, probabilities=probabilities, seed=seed, stopping_strategy="first_exhausted"
    )
    validation = datasets.concatenate_datasets(val_parts).with_format("torch") if val_parts else None
    return train.with_format("torch"), validation
