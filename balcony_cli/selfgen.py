"""Self-generated training text: samples from the base model itself, prompted by the starts of paragraphs.

Training the exits on the base model's own samples shows them the distribution they imitate (on-policy
data). Each prompt is the first `prompt_tokens` tokens of a paragraph of the given text. The samples
are plain ancestral sampling at the given temperature, with no top-k, top-p or repetition penalty, so
that at temperature 1 they follow the model's own distribution.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from balcony_cli.checkpoint import atomic_directory, atomic_write_bytes, check_output_dir
from balcony_cli.data import load_text_dataset, resolve_data
from balcony_cli.errors import BadInputError

logger = logging.getLogger(__name__)

GENERATED_FILE = "self-generated.jsonl"
# YAML, because --data reads every .json/.jsonl/.txt file of a folder as training text.
REPORT_FILE = "self-generated.yaml"
# Paragraphs shorter than this many characters per prompt token are skipped before tokenising: they
# rarely hold enough tokens for a prompt.
MIN_CHARS_PER_PROMPT_TOKEN = 3


@dataclass
class GenerationSettings:
    """How to sample: the token budget, prompt and sample lengths, temperature and seed."""

    tokens: int
    """Generated tokens to write, prompts not counted; the last batch may overshoot."""
    prompt_tokens: int = 16
    """Tokens taken from the start of each paragraph as a prompt."""
    new_tokens: int = 128
    """Most tokens sampled after each prompt (fewer when the model ends the text)."""
    batch_size: int = 16
    """Prompts sampled together."""
    temperature: float = 1.0
    seed: int = 0

    def validate(self) -> None:
        for name in ("tokens", "prompt_tokens", "new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise BadInputError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be a positive integer")
        if not self.temperature > 0:
            raise BadInputError(f"--temperature {self.temperature}: must be positive")


@dataclass
class GenerationResult:
    """The written file, its size and the sampling time (the preparation time of a self-generated run)."""

    path: Path
    documents: int
    generated_tokens: int
    seconds: float
    settings: GenerationSettings
    prompts_from: str

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / max(self.seconds, 1e-9)

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.path.name,
            "documents": self.documents,
            "generated_tokens": self.generated_tokens,
            "seconds": self.seconds,
            "tokens_per_s": self.tokens_per_s,
            "settings": asdict(self.settings),
            "prompts_from": self.prompts_from,
        }

    @classmethod
    def from_dict(cls, document: dict[str, Any], directory: Path) -> GenerationResult:
        return cls(
            path=Path(directory) / document["file"],
            documents=document["documents"],
            generated_tokens=document["generated_tokens"],
            seconds=document["seconds"],
            settings=GenerationSettings(**document["settings"]),
            prompts_from=document["prompts_from"],
        )


def paragraphs(texts: Sequence[str], min_chars: int) -> list[str]:
    """Split texts at blank lines and keep the paragraphs of at least `min_chars` characters."""
    found = []
    for text in texts:
        for paragraph in re.split(r"\n\s*\n", text.replace("\r\n", "\n")):
            paragraph = paragraph.strip()
            if len(paragraph) >= min_chars:
                found.append(paragraph)
    return found


def paragraph_prompts(candidates: Sequence[str], tokenizer, prompt_tokens: int, seed: int) -> Iterator[list[int]]:
    """Yield prompts of exactly `prompt_tokens` tokens from paragraph starts, in a seeded random order.

    When every paragraph has been used, the order is shuffled again, so the prompts never run out.
    """
    order = list(range(len(candidates)))
    rng = random.Random(seed)
    while True:
        rng.shuffle(order)
        yielded = False
        for index in order:
            ids = tokenizer(candidates[index], add_special_tokens=False, verbose=False)["input_ids"]
            if len(ids) >= prompt_tokens:
                yielded = True
                yield ids[:prompt_tokens]
        if not yielded:
            raise BadInputError(
                f"no paragraph of the prompt text contains {prompt_tokens} tokens; use a longer text or fewer "
                "prompt tokens"
            )


@torch.no_grad()
def sample(
    model: nn.Module, prompts: torch.Tensor, new_tokens: int, temperature: float, eos_token_id: int | None,
    generator: torch.Generator,
) -> list[list[int]]:
    """Sample up to `new_tokens` tokens after each prompt with the KV cache; return each continuation.

    prompts: (batch, prompt_tokens). A continuation stops before the first end-of-sequence token.
    """
    out = model(input_ids=prompts, use_cache=True, logits_to_keep=1)
    cache = out.cache
    batch = prompts.shape[0]
    finished = torch.zeros(batch, dtype=torch.bool)
    steps: list[torch.Tensor] = []
    for _ in range(new_tokens):
        probs = torch.softmax(out.logits[:, -1].float() / temperature, dim=-1)  # (batch, vocab)
        next_ids = torch.multinomial(probs.cpu(), 1, generator=generator)  # (batch, 1)
        steps.append(next_ids[:, 0])
        if eos_token_id is not None:
            finished |= next_ids[:, 0] == eos_token_id
            if bool(finished.all()):
                break
        out = model(input_ids=next_ids.to(prompts.device), cache=cache, use_cache=True)
        cache = out.cache
    sampled = torch.stack(steps, dim=1).tolist()  # (batch, steps)
    continuations = []
    for row in sampled:
        if eos_token_id is not None and eos_token_id in row:
            row = row[: row.index(eos_token_id)]
        continuations.append(row)
    return continuations


def generate_to_directory(
    model: nn.Module, tokenizer, texts: Sequence[str], directory: Path, settings: GenerationSettings, prompts_from: str
) -> GenerationResult:
    """Sample from `model` with prompts from `texts`; write GENERATED_FILE and REPORT_FILE into `directory`.

    Each line of GENERATED_FILE is {"text": prompt followed by its sample}, decoded together so that no
    space is lost at the join. The caller makes `directory` (an empty or temporary one).
    """
    settings.validate()
    candidates = paragraphs(texts, settings.prompt_tokens * MIN_CHARS_PER_PROMPT_TOKEN)
    if not candidates:
        raise BadInputError(f"{prompts_from!r}: no paragraph long enough for a {settings.prompt_tokens}-token prompt")
    prompts = paragraph_prompts(candidates, tokenizer, settings.prompt_tokens, settings.seed)
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(settings.seed)
    eos = tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    generated, documents = 0, 0
    expected_batches = math.ceil(settings.tokens / (settings.new_tokens * settings.batch_size))
    start = time.perf_counter()
    with (Path(directory) / GENERATED_FILE).open("w", encoding="utf-8") as file:
        while generated < settings.tokens:
            batch = torch.tensor([next(prompts) for _ in range(settings.batch_size)], device=device)
            for prompt, continuation in zip(batch.tolist(), sample(model, batch, settings.new_tokens,
                                                                   settings.temperature, eos, generator)):
                if not continuation:
                    continue
                text = tokenizer.decode(prompt + continuation, skip_special_tokens=True)
                file.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
                generated += len(continuation)
                documents += 1
            elapsed = time.perf_counter() - start
            logger.info(
                "self-generated %d of %d tokens (%.0f tokens/s; about %d batches in all)",
                generated, settings.tokens, generated / max(elapsed, 1e-9), expected_batches,
            )
    model.train(was_training)
    result = GenerationResult(
        path=Path(directory) / GENERATED_FILE, documents=documents, generated_tokens=generated,
        seconds=time.perf_counter() - start, settings=settings, prompts_from=prompts_from,
    )
    atomic_write_bytes(Path(directory) / REPORT_FILE, yaml.safe_dump(result.to_dict(), sort_keys=False).encode())
    return result


def read_generation(directory: Path) -> GenerationResult | None:
    """Return the report of a finished generation in `directory`, or None if there is none."""
    report = Path(directory) / REPORT_FILE
    if not report.is_file() or not (Path(directory) / GENERATED_FILE).is_file():
        return None
    return GenerationResult.from_dict(yaml.safe_load(report.read_text()), directory)


@dataclass
class GenerateDataRequest:
    model: str
    prompts_from: str
    """Text whose paragraph starts become prompts: anything --data accepts."""
    output_dir: Path
    settings: GenerationSettings
    text_field: str = "text"
    overwrite: bool = False


def generate_data(request: GenerateDataRequest) -> GenerationResult:
    """Load the base model and write self-generated text to `request.output_dir` (usable as --data)."""
    from balcony_cli.loading import check_decoder_only, load_base_model, load_config, load_tokenizer, resolve_model

    request.settings.validate()
    check_output_dir(request.output_dir, overwrite=request.overwrite)
    source = resolve_data(request.prompts_from)
    model_source = resolve_model(request.model)
    check_decoder_only(load_config(model_source))
    texts = list(load_text_dataset(source, request.text_field)["text"])
    tokenizer = load_tokenizer(model_source)
    model = load_base_model(model_source)
    with atomic_directory(request.output_dir, overwrite=request.overwrite) as directory:
        result = generate_to_directory(model, tokenizer, texts, directory, request.settings, source.spec)
    result.path = Path(request.output_dir) / GENERATED_FILE
    return result
