"""Perplexity under the project's protocol, for the full model, naive exits and Balcony exits at once.

Protocol: read the text as UTF-8 with CRLF turned into LF and tokenise it without special tokens.
Keep the first `max_tokens` tokens and cut them into non-overlapping windows of `window` tokens,
where the last window may be shorter. Report exp(mean NLL) over every predicted token.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from balcony_cli.errors import BadInputError
from balcony_cli.model import BalconyModel

DATA_DIR_ENV = "BALCONY_DATA_DIR"
WIKITEXT2_TEST = Path("wikitext2_raw") / "wiki.test.raw"


def default_eval_text() -> Path | None:
    """Return the WikiText-2 test file under $BALCONY_DATA_DIR, if that variable is set and the file exists."""
    data_dir = os.environ.get(DATA_DIR_ENV)
    if data_dir and (Path(data_dir) / WIKITEXT2_TEST).is_file():
        return Path(data_dir) / WIKITEXT2_TEST
    return None


def read_eval_text(path: str | Path) -> str:
    path = Path(path)
    if path.is_dir():
        raise BadInputError(f"--eval-text {str(path)!r}: is a directory; pass a text file, such as wiki.test.raw")
    if not path.is_file():
        raise BadInputError(f"--eval-text {str(path)!r}: file not found. Check the path.")
    try:
        text = path.read_text(encoding="utf-8").replace("\r\n", "\n")
    except UnicodeDecodeError as error:
        raise BadInputError(
            f"--eval-text {str(path)!r}: not valid UTF-8 (byte {error.start}); convert it, for example with "
            "iconv -f latin1 -t utf-8"
        ) from None
    if not text.strip():
        raise BadInputError(f"--eval-text {str(path)!r}: the file is empty")
    return text


def perplexity_windows(tokenizer, text: str, max_tokens: int, window: int) -> list[torch.Tensor]:
    """Tokenise `text` and cut its first `max_tokens` tokens into windows of at most `window` tokens."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"][:max_tokens]
    windows = [torch.tensor(ids[i : i + window]) for i in range(0, len(ids), window)]
    windows = [w for w in windows if len(w) >= 2]
    if not windows:
        raise BadInputError("the perplexity text has fewer than 2 tokens; use a longer text")
    return windows


def nll_sum(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, chunk_tokens: int = 2048) -> float:
    """Sum of next-token NLLs. hidden: (batch, seq, dim) predicting labels: (batch, seq)."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    total = 0.0
    for start in range(0, hidden.shape[0], chunk_tokens):
        logits = head(hidden[start : start + chunk_tokens]).float()  # (chunk, vocab)
        total += F.cross_entropy(logits, labels[start : start + chunk_tokens], reduction="sum").item()
    return total


# Equal-width confidence bins for the expected calibration error, as in Guo et al. (2017), "On
# Calibration of Modern Neural Networks".
CALIBRATION_BINS = 15


@dataclass
class PredictionStatistics:
    """Running sums over predicted tokens: NLL, entropy, and top-1 confidence and accuracy per bin."""

    tokens: int = 0
    nll: float = 0.0
    entropy: float = 0.0
    bin_counts: list[int] = field(default_factory=lambda: [0] * CALIBRATION_BINS)
    bin_confidence: list[float] = field(default_factory=lambda: [0.0] * CALIBRATION_BINS)
    bin_correct: list[float] = field(default_factory=lambda: [0.0] * CALIBRATION_BINS)

    @torch.no_grad()
    def add(self, head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, chunk_tokens: int = 2048) -> None:
        """Add the predictions of `head` on hidden: (batch, seq, dim) for labels: (batch, seq)."""
        hidden = hidden.reshape(-1, hidden.shape[-1])
        labels = labels.reshape(-1)
        for start in range(0, hidden.shape[0], chunk_tokens):
            log_probs = F.log_softmax(head(hidden[start : start + chunk_tokens]).float(), dim=-1)  # (chunk, vocab)
            chunk_labels = labels[start : start + chunk_tokens]
            self.tokens += chunk_labels.numel()
            self.nll -= log_probs.gather(1, chunk_labels[:, None]).sum().item()
            self.entropy -= (log_probs.exp() * log_probs).sum().item()
            confidence, guess = log_probs.max(dim=-1)
            confidence = confidence.exp()
            correct = (guess == chunk_labels).float()
            bins = (confidence * CALIBRATION_BINS).long().clamp_(max=CALIBRATION_BINS - 1)
            counts = torch.bincount(bins, minlength=CALIBRATION_BINS)
            confidence_sums = torch.bincount(bins, weights=confidence, minlength=CALIBRATION_BINS)
            correct_sums = torch.bincount(bins, weights=correct, minlength=CALIBRATION_BINS)
            for index in range(CALIBRATION_BINS):
                self.bin_counts[index] += int(counts[index])
                self.bin_confidence[index] += float(confidence_sums[index])
                self.bin_correct[index] += float(correct_sums[index])

    @property
    def perplexity(self) -> float:
        return perplexity_from_nll(self.nll, self.tokens)

    @property
    def mean_entropy(self) -> float:
        """Mean entropy of the predicted next-token distribution, in nats."""
        return self.entropy / max(self.tokens, 1)

    @property
    def expected_calibration_error(self) -> float:
        """Token-weighted mean over bins of |mean top-1 confidence - top-1 accuracy|."""
        total = sum(abs(confidence - correct) for confidence, correct in zip(self.bin_confidence, self.bin_correct))
        return total / max(self.tokens, 1)


@dataclass
class PerplexityTable:
    """Perplexity of each row, and how many tokens were predicted."""

    tokens: int
    full: float | None = None
    naive: dict[int, float] = field(default_factory=dict)
    exits: dict[int, float] = field(default_factory=dict)


def perplexity_from_nll(total_nll: float, tokens: int) -> float:
    """Return exp(mean NLL), capped at exp(700) so that the value stays a finite float for JSON."""
    return math.exp(min(total_nll / tokens, 700.0))


@torch.no_grad()
def perplexity_table(
    model: BalconyModel,
    windows: Sequence[torch.Tensor],
    exits: Sequence[int] | None = None,
    full: bool = True,
    naive: bool = True,
    batch_size: int = 4,
) -> PerplexityTable:
    """Score the windows with one base pass per batch: the full model, naive exits and Balcony exits."""
    exits = list(model.exits if exits is None else exits)
    device = next(model.base.parameters()).device
    head = model.head
    full_nll, tokens = 0.0, 0
    naive_nll = dict.fromkeys(exits, 0.0)
    exit_nll = dict.fromkeys(exits, 0.0)
    by_length: dict[int, list[torch.Tensor]] = {}
    for window in windows:
        by_length.setdefault(len(window), []).append(window)
    for same_length in by_length.values():
        for start in range(0, len(same_length), batch_size):
            input_ids = torch.stack(same_length[start : start + batch_size]).to(device)  # (batch, seq)
            out = model.forward_all(input_ids, exits=exits, naive=naive)
            labels = input_ids[:, 1:]
            tokens += labels.numel()
            if full:
                full_nll += nll_sum(head, out.full_hidden[:, :-1], labels)
            for k in exits:
                exit_nll[k] += nll_sum(head, out.exit_hidden[k][:, :-1], labels)
                if naive:
                    naive_nll[k] += nll_sum(head, out.naive_hidden[k][:, :-1], labels)
    return PerplexityTable(
        tokens=tokens,
        full=perplexity_from_nll(full_nll, tokens) if full else None,
        naive={k: perplexity_from_nll(v, tokens) for k, v in naive_nll.items()} if naive else {},
        exits={k: perplexity_from_nll(v, tokens) for k, v in exit_nll.items()},
    )


@torch.no_grad()
def model_perplexity(model: nn.Module, windows: Sequence[torch.Tensor], batch_size: int = 4) -> float:
    """Score the windows with any causal LM of a supported layout (a pruned baseline, an exported exit)."""
    from balcony_cli.architectures import layout_for

    layout = layout_for(model.config)
    body, head = layout.body(model), layout.head(model)
    device = next(model.parameters()).device
    total_nll, tokens = 0.0, 0
    by_length: dict[int, list[torch.Tensor]] = {}
    for window in windows:
        by_length.setdefault(len(window), []).append(window)
    for same_length in by_length.values():
        for start in range(0, len(same_length), batch_size):
            input_ids = torch.stack(same_length[start : start + batch_size]).to(device)  # (batch, seq)
            hidden = body(input_ids=input_ids, use_cache=False).last_hidden_state
            labels = input_ids[:, 1:]
            tokens += labels.numel()
            total_nll += nll_sum(head, hidden[:, :-1], labels)
    return perplexity_from_nll(total_nll, tokens)
