"""Speed of self-speculative decoding, against plain full-model decoding and transformers' early-exit
assistant.

Every setting decodes the same prompts greedily, in one process, batch size 1. Tokens/s counts the
generation call only (prompt pass included, tokenising excluded).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from balcony_cli.compute import ComputeProfile, exit_layers
from balcony_cli.errors import BadInputError
from balcony_cli.generate import end_of_sequence_ids
from balcony_cli.model import BalconyModel
from balcony_cli.speculative import PHASES, SelfSpeculativeDecoder

logger = logging.getLogger(__name__)

WARMUP_TOKENS = 8


@dataclass
class DecodingRow:
    """One decoding setting measured over every prompt."""

    name: str
    kind: Literal["full", "speculative", "assistant_early_exit"]
    draft_exit: int | None
    """The exit that drafts: a Balcony exit for "speculative", a naive exit (layers 1..k with the base's
    final norm and head) for "assistant_early_exit"."""
    draft_tokens: int | None
    """Tokens drafted per round (num_assistant_tokens for "assistant_early_exit")."""
    new_tokens: int
    seconds: float
    """Sum over prompts of each prompt's median time over the repeats."""
    tokens_per_s: float
    prompt_tokens_per_s: list[float]
    """Per prompt, in prompt order."""
    identical: bool
    """Every prompt's tokens equal the plain full-model greedy tokens."""
    mismatched_prompts: list[int]
    """Indices of the prompts whose tokens differ from the plain full-model greedy tokens."""
    speedup: float | None = None
    """tokens_per_s over the plain full-model row's."""
    drafted: int | None = None
    accepted: int | None = None
    acceptance_rate: float | None = None
    tokens_per_full_pass: float | None = None
    """New tokens per full-model forward pass (the prompt pass included)."""
    draft_relative_compute: float | None = None
    """Forward FLOPs per token of the draft against the full model's."""
    seconds_by_phase: dict[str, float] | None = None
    """Speculative rows: wall time per phase, summed over prompts (first repeat)."""
    ms_per_draft_token: float | None = None
    ms_per_verify_pass: float | None = None
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass
class SpeculativeBenchmark:
    """Plain, self-speculative and transformers-assisted greedy decoding on the same prompts."""

    prompt_tokens: list[int]
    max_new_tokens: int
    stop_at_eos: bool
    """False: every setting generates exactly max_new_tokens tokens per prompt."""
    repeats: int
    device: str
    dtype: str
    threads: int
    versions: dict[str, str]
    agreement: dict[int, float]
    """Per Balcony exit k: the fraction of the full model's greedy tokens that exit k's argmax matches,
    teacher-forced on the full model's output. The acceptance rate is lower, because the drafts after a
    first mismatch are discarded."""
    naive_agreement: dict[int, float]
    """The same for the naive exit at layer k, which transformers' assistant_early_exit drafts with."""
    rows: list[DecodingRow]

    def to_dict(self) -> dict[str, Any]:
        document = asdict(self)
        document["agreement"] = {str(k): v for k, v in self.agreement.items()}
        document["naive_agreement"] = {str(k): v for k, v in self.naive_agreement.items()}
        return document


def benchmark_speculative(
    model: BalconyModel,
    tokenizer,
    prompts: Sequence[str],
    draft_exits: Sequence[int],
    draft_tokens: Sequence[int],
    max_new_tokens: int = 128,
    assistant_exits: Sequence[int] | None = None,
    assistant_tokens: int = 4,
    assistant_confidence_threshold: float | None = None,
    repeats: int = 1,
    stop_at_eos: bool = False,
) -> SpeculativeBenchmark:
    """Time plain full-model greedy decoding, self-speculative decoding for each (draft exit, draft
    length), and transformers' `assistant_early_exit` for each of `assistant_exits` (default: the
    draft exits), on the same prompts in one run.

    `assistant_confidence_threshold` None keeps transformers' default. Each setting first decodes a few
    tokens of the first prompt to warm up.
    """
    _check_benchmark_settings(
        model, prompts, draft_exits, draft_tokens, max_new_tokens, assistant_tokens, repeats
    )
    assistant_exits = list(draft_exits if assistant_exits is None else assistant_exits)
    device = model.base.device
    encoded = [tokenizer(prompt, return_tensors="pt").input_ids.to(device) for prompt in prompts]
    eos_ids = end_of_sequence_ids(model, tokenizer) if stop_at_eos else []
    profile = ComputeProfile.of(model.base)
    rows: list[DecodingRow] = []

    logger.info("timing plain full-model decoding")
    full_tokens, full_seconds = _time_prompts(
        encoded, repeats, lambda ids, n: _plain_greedy(model, ids, n, eos_ids), max_new_tokens
    )
    full = _row("full", "full", None, None, full_tokens, full_seconds, full_tokens)
    rows.append(full)

    for k in draft_exits:
        decoder = SelfSpeculativeDecoder(model, k)
        for n in draft_tokens:
            logger.info("timing self-speculative decoding, exit %d drafting %d tokens", k, n)
            outputs = []

            def run(ids, count, decoder=decoder, n=n, outputs=outputs):
                output = decoder.generate(ids, max_new_tokens=count, draft_tokens=n, eos_token_ids=eos_ids)
                outputs.append(output)
                return output.sequences[0, ids.shape[1] :].tolist()

            tokens, seconds = _time_prompts(encoded, repeats, run, max_new_tokens, after_warmup=outputs.clear)
            row = _row(f"speculative exit {k} x {n}", "speculative", k, n, tokens, seconds, full_tokens)
            # Greedy decoding repeats itself exactly, so the first run of each prompt stands for the others.
            firsts = outputs[::repeats]
            _add_speculative_figures(row, firsts, profile.relative_compute(exit_layers(k, model.num_layers)))
            rows.append(row)

    for k in assistant_exits:
        logger.info("timing transformers assistant_early_exit=%d, %d assistant tokens", k, assistant_tokens)
        counter = _PassCounter(model)
        settings = _assistant_settings(model, assistant_tokens, assistant_confidence_threshold)
        with _generation_config(model, **settings), counter:
            tokens, seconds = _time_prompts(
                encoded,
                repeats,
                lambda ids, n, k=k: _assisted_greedy(model, ids, n, k, eos_ids),
                max_new_tokens,
                after_warmup=counter.reset,
            )
        row = _row(
            f"assistant_early_exit {k} x {assistant_tokens}",
            "assistant_early_exit",
            k,
            assistant_tokens,
            tokens,
            seconds,
            full_tokens,
        )
        row.settings = {**settings, "assistant_early_exit": k, "transformers": _version("transformers")}
        # The naive exit runs layers 1..k, the base's final norm and the head.
        row.draft_relative_compute = profile.relative_compute(k)
        # Every full-model pass verifies one round and adds one token of its own after the accepted drafts.
        full_passes = counter.full_passes / repeats
        row.drafted = round(counter.draft_passes / repeats)
        row.accepted = round(row.new_tokens - full_passes)
        row.acceptance_rate = row.accepted / row.drafted if row.drafted else None
        row.tokens_per_full_pass = row.new_tokens / full_passes if full_passes else None
        rows.append(row)

    for row in rows:
        row.speedup = row.tokens_per_s / full.tokens_per_s if full.tokens_per_s else None

    logger.info("measuring greedy agreement of every exit with the full model")
    agreement, naive_agreement = exit_agreement(model, encoded, full_tokens)
    return SpeculativeBenchmark(
        prompt_tokens=[ids.shape[1] for ids in encoded],
        max_new_tokens=max_new_tokens,
        stop_at_eos=stop_at_eos,
        repeats=repeats,
        device=str(device),
        dtype=str(next(model.base.parameters()).dtype).removeprefix("torch."),
        threads=torch.get_num_threads(),
        versions={name: _version(name) for name in ("torch", "transformers")},
        agreement=agreement,
        naive_agreement=naive_agreement,
        rows=rows,
    )


def _check_benchmark_settings(
    model, prompts, draft_exits, draft_tokens, max_new_tokens, assistant_tokens, repeats
):
    if not prompts:
        raise BadInputError("--prompts: no prompts given; write one prompt per line")
    if not draft_exits:
        raise BadInputError("--draft-exit: no draft exits given; pass at least one exit of the checkpoint")
    for k in draft_exits:
        if k not in model.exits:
            raise BadInputError(
                f"--draft-exit {k}: this checkpoint has exits {','.join(map(str, model.exits))}; "
                "pick from them"
            )
    for n in [*draft_tokens, assistant_tokens]:
        if n < 1:
            raise BadInputError(f"--draft-tokens {n}: expected at least 1 token drafted per round")
    if not draft_tokens:
        raise BadInputError("--draft-tokens: no draft lengths given; pass at least one, such as 4")
    if max_new_tokens < 1:
        raise BadInputError(f"--max-new-tokens {max_new_tokens}: expected at least 1")
    if repeats < 1:
        raise BadInputError(f"--repeats {repeats}: expected at least 1")


def _time_prompts(
    encoded, repeats, run, max_new_tokens, after_warmup=None
) -> tuple[list[list[int]], list[float]]:
    """Run `run(input_ids, max_new_tokens)` on every prompt `repeats` times, after one short warm-up run.

    Returns each prompt's new tokens (from its first run) and its median time.
    """
    run(encoded[0], min(WARMUP_TOKENS, max_new_tokens))
    if after_warmup is not None:
        after_warmup()
    tokens, seconds = [], []
    for ids in encoded:
        times = []
        for repeat in range(repeats):
            start = _now(ids.device)
            new = run(ids, max_new_tokens)
            times.append(_now(ids.device) - start)
            if repeat == 0:
                tokens.append(new)
        seconds.append(statistics.median(times))
    return tokens, seconds


def _row(name, kind, draft_exit, draft_tokens, tokens, seconds, full_tokens) -> DecodingRow:
    new_tokens = sum(len(t) for t in tokens)
    total = sum(seconds)
    mismatched = [i for i, (got, want) in enumerate(zip(tokens, full_tokens)) if got != want]
    return DecodingRow(
        name=name,
        kind=kind,
        draft_exit=draft_exit,
        draft_tokens=draft_tokens,
        new_tokens=new_tokens,
        seconds=total,
        tokens_per_s=new_tokens / total if total > 0 else float("inf"),
        prompt_tokens_per_s=[len(t) / s if s > 0 else float("inf") for t, s in zip(tokens, seconds)],
        identical=not mismatched,
        mismatched_prompts=mismatched,
    )


def _add_speculative_figures(row: DecodingRow, outputs, draft_relative_compute: float) -> None:
    drafted = sum(o.drafted for o in outputs)
    accepted = sum(o.accepted for o in outputs)
    full_passes = sum(o.full_passes for o in outputs)
    phases = {phase: sum(o.seconds[phase] for o in outputs) for phase in (*PHASES, "total")}
    row.drafted = drafted
    row.accepted = accepted
    row.acceptance_rate = accepted / drafted if drafted else None
    row.tokens_per_full_pass = sum(o.new_tokens for o in outputs) / full_passes
    row.draft_relative_compute = draft_relative_compute
    row.seconds_by_phase = phases
    row.ms_per_draft_token = 1000 * phases["draft"] / drafted if drafted else None
    verify_passes = full_passes - len(outputs)
    row.ms_per_verify_pass = 1000 * phases["verify"] / verify_passes if verify_passes else None


def _plain_greedy(model: BalconyModel, input_ids: torch.Tensor, max_new_tokens: int, eos_ids) -> list[int]:
    with _generation_config(model, eos_token_id=eos_ids or None):
        sequences = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return sequences[0, input_ids.shape[1] :].tolist()


def _assisted_greedy(model: BalconyModel, input_ids: torch.Tensor, max_new_tokens: int, exit: int, eos_ids):
    with _generation_config(model, eos_token_id=eos_ids or None):
        sequences = model.base.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=0,
            assistant_early_exit=exit,
        )
    return sequences[0, input_ids.shape[1] :].tolist()


def _assistant_settings(model: BalconyModel, tokens: int, threshold: float | None) -> dict[str, Any]:
    """Return the assistant settings. transformers reads them from the model's generation config, not
    from `generate`'s keyword arguments."""
    if threshold is None:
        threshold = model.base.generation_config.assistant_confidence_threshold
        if threshold is None:
            from transformers import GenerationConfig

            threshold = GenerationConfig._get_default_generation_params()["assistant_confidence_threshold"]
    return {
        "num_assistant_tokens": tokens,
        "num_assistant_tokens_schedule": "constant",
        "assistant_confidence_threshold": threshold,
    }


@contextlib.contextmanager
def _generation_config(model: BalconyModel, **values) -> Iterator[None]:
    """Set fields of the base's generation config (shared by every exit view) for the block."""
    config = model.base.generation_config
    saved = {name: getattr(config, name, None) for name in values}
    for name, value in values.items():
        setattr(config, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(config, name, value)


class _PassCounter:
    """Counts full-model and draft passes of transformers' assisted generation through hooks.

    A full-model pass runs the last layer; transformers' early-exit assistant runs only layers 1..k.
    So passes of layer 1 that skip the last layer are draft passes, one per drafted token.
    """

    def __init__(self, model: BalconyModel):
        layers = model.layout.layers(model.base)
        self.first, self.last = layers[0], layers[-1]
        self.first_calls = self.last_calls = 0
        self._handles = []

    def __enter__(self) -> None:
        def count_first(*_):
            self.first_calls += 1

        def count_last(*_):
            self.last_calls += 1

        self._handles = [
            self.first.register_forward_hook(count_first),
            self.last.register_forward_hook(count_last),
        ]

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()

    def reset(self) -> None:
        self.first_calls = self.last_calls = 0

    @property
    def full_passes(self) -> int:
        return self.last_calls

    @property
    def draft_passes(self) -> int:
        return self.first_calls - self.last_calls


@torch.no_grad()
def exit_agreement(
    model: BalconyModel, encoded: Sequence[torch.Tensor], full_tokens: Sequence[list[int]]
) -> tuple[dict[int, float], dict[int, float]]:
    """Return, per exit, how often its argmax equals the full model's greedy token (Balcony and naive).

    Each prompt and its full-model greedy continuation run through the model once, teacher-forced, so
    every exit predicts every position of the full model's own output.
    """
    matches = {k: 0 for k in model.exits}
    naive_matches = {k: 0 for k in model.exits}
    total = 0
    head = model.head
    for ids, tokens in zip(encoded, full_tokens):
        if not tokens:
            continue
        target = torch.tensor(tokens, device=ids.device)
        sequence = torch.cat([ids[0], target[:-1]]).unsqueeze(0)
        out = model.forward_all(sequence, naive=True)
        # Positions prompt - 1 onwards predict the new tokens.
        start = ids.shape[1] - 1
        for k in model.exits:
            matches[k] += int((head(out.exit_hidden[k][0, start:]).argmax(-1) == target).sum())
            naive_matches[k] += int((head(out.naive_hidden[k][0, start:]).argmax(-1) == target).sum())
        total += len(tokens)
    return (
        {k: matches[k] / total if total else 0.0 for k in model.exits},
        {k: naive_matches[k] / total if total else 0.0 for k in model.exits},
    )


def read_prompts(path: str | Path) -> list[str]:
    """Read one prompt per line from a UTF-8 text file, skipping blank lines."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(
            f"--prompts {str(path)!r}: file not found; pass a text file with one prompt per line"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise BadInputError(
            f"--prompts {str(path)!r}: not valid UTF-8 ({error.reason} at byte {error.start}); "
            "convert it to UTF-8"
        ) from None
    prompts = [line.rstrip("\r") for line in text.split("\n") if line.strip()]
    if not prompts:
        raise BadInputError(f"--prompts {str(path)!r}: the file has no prompts; write one prompt per line")
    return prompts


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
