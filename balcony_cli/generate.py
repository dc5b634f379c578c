"""Text generation from one loaded checkpoint: at any exit or compute budget, or self-speculatively.

The exit is chosen per call, so one loaded model serves every exit without reloading or copying
weights (see `BalconyModel.exit_model`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import TextStreamer

from balcony_cli.compute import ComputeProfile, exit_for_budget, exit_layers
from balcony_cli.errors import BadInputError
from balcony_cli.model import BalconyModel

DEFAULT_MAX_NEW_TOKENS = 128
DEFAULT_DRAFT_TOKENS = 4


@dataclass(frozen=True)
class GenerationSettings:
    """How to generate: which exit, which decoding, and whether to draft self-speculatively."""

    exit: int | None = None
    """Exit k to generate with; None (and no budget) means the full model."""
    budget: float | None = None
    """Fraction of the full model's forward FLOPs per token, in (0, 1]: picks the deepest exit that fits."""
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0
    """0 means greedy decoding; above 0, sampling at this temperature."""
    top_p: float = 1.0
    """Nucleus sampling: sample from the smallest set of tokens whose probability reaches top_p."""
    seed: int = 0
    """Random seed for sampling."""
    chat_template: bool = False
    """Wrap the prompt as one user message in the tokenizer's chat template."""
    speculative: bool = False
    """Output the full model's tokens, drafted by exit `draft_exit` and verified by the full model."""
    draft_exit: int | None = None
    draft_tokens: int | None = None
    """Tokens drafted per round (default DEFAULT_DRAFT_TOKENS)."""

    def check(self) -> None:
        """Reject invalid values and conflicting options. Needs no model."""
        if self.exit is not None and self.budget is not None:
            raise BadInputError(f"--exit {self.exit} and --budget {self.budget}: pass only one of them")
        if self.budget is not None and not 0 < self.budget <= 1:
            raise BadInputError(
                f"--budget {self.budget}: expected a fraction of the full model's compute in (0, 1]"
            )
        if self.max_new_tokens < 1:
            raise BadInputError(f"--max-new-tokens {self.max_new_tokens}: expected at least 1")
        if self.temperature < 0:
            raise BadInputError(f"--temperature {self.temperature}: expected 0 (greedy) or more")
        if not 0 < self.top_p <= 1:
            raise BadInputError(f"--top-p {self.top_p}: expected a probability mass in (0, 1]")
        if self.top_p < 1 and self.temperature == 0:
            raise BadInputError(
                f"--top-p {self.top_p} applies only to sampling; pass --temperature above 0 as well"
            )
        if self.speculative:
            if self.exit is not None or self.budget is not None:
                raise BadInputError(
                    "--speculative outputs the full model's tokens, so --exit and --budget do not apply; "
                    "choose the draft with --draft-exit instead"
                )
            if self.draft_exit is None:
                raise BadInputError("--speculative needs --draft-exit K: the exit that drafts the tokens")
            if self.draft_tokens is not None and self.draft_tokens < 1:
                raise BadInputError(
                    f"--draft-tokens {self.draft_tokens}: expected at least 1 token drafted per round"
                )
        elif self.draft_exit is not None or self.draft_tokens is not None:
            raise BadInputError(
                "--draft-exit and --draft-tokens apply only with --speculative; add --speculative"
            )

    def check_exits(self, exits: list[int], num_layers: int) -> None:
        """Reject an exit or draft exit that the checkpoint does not have."""
        listed = ",".join(map(str, exits))
        if self.exit is not None and self.exit != num_layers and self.exit not in exits:
            raise BadInputError(
                f"--exit {self.exit}: this checkpoint has exits {listed}; pick one of them, or {num_layers} "
                "for the full model"
            )
        if self.draft_exit is not None and self.draft_exit not in exits:
            raise BadInputError(
                f"--draft-exit {self.draft_exit}: this checkpoint has exits {listed}; pick one of them"
            )


@dataclass
class GenerateResult:
    """One generation: the text, the exit that produced it, and its speed."""

    text: str
    """The new text only, without the prompt; special tokens are left out."""
    exit: int | None
    """The exit that produced the tokens; None for the full model (also under --speculative)."""
    layers: int
    """Decoder layers run per token by that exit (k + 1 for exit k)."""
    num_layers: int
    relative_compute: float
    prompt_tokens: int
    new_tokens: int
    seconds: float
    """Wall time of the generation itself, after loading and tokenising."""
    finish_reason: Literal["eos", "length"]
    token_ids: list[int]
    speculative: dict[str, Any] | None = None
    """Under --speculative: the draft exit and length, drafted and accepted tokens, time per phase."""

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tokens_per_s": self.tokens_per_s}


class _CallbackStreamer(TextStreamer):
    """A transformers streamer that hands each finished piece of text to a callback."""

    def __init__(self, tokenizer, on_text: Callable[[str], None]):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.on_text = on_text

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.on_text(text)


def check_prompt(prompt: str) -> None:
    if not prompt.strip():
        raise BadInputError(
            'PROMPT is empty; pass the text to continue, for example: balcony generate "Once upon a time"'
        )


def encode_prompt(tokenizer, prompt: str, chat_template: bool = False) -> torch.Tensor:
    """Tokenise the prompt, wrapped in the chat template when asked; return ids of shape (1, n)."""
    check_prompt(prompt)
    if chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise BadInputError(
                "--chat-template: this model's tokenizer has no chat template; drop --chat-template"
            )
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        input_ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    else:
        input_ids = tokenizer(prompt, return_tensors="pt").input_ids
    if input_ids.shape[1] == 0:
        raise BadInputError(f"PROMPT {prompt!r}: the tokenizer turned it into no tokens; pass other text")
    return input_ids


def end_of_sequence_ids(model: BalconyModel, tokenizer) -> list[int]:
    """Token ids that end generation: the model's generation config's and the tokenizer's."""
    ids: set[int] = set()
    configured = model.base.generation_config.eos_token_id
    if isinstance(configured, int):
        ids.add(configured)
    elif configured is not None:
        ids.update(configured)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def resolve_exit(model: BalconyModel, settings: GenerationSettings) -> int | None:
    """Return the exit that produces the output: --exit, the exit --budget picks, or None (full)."""
    if settings.speculative:
        return None
    if settings.budget is not None:
        return exit_for_budget(settings.budget, model.exits, ComputeProfile.of(model.base))
    if settings.exit == model.num_layers:
        return None
    return settings.exit


def generate_text(
    model: BalconyModel,
    tokenizer,
    prompt: str,
    settings: GenerationSettings,
    on_text: Callable[[str], None] | None = None,
) -> GenerateResult:
    """Generate a continuation of `prompt` on a loaded model; `on_text` receives the text as it streams."""
    settings.check()
    settings.check_exits(model.exits, model.num_layers)
    exit = resolve_exit(model, settings)
    input_ids = encode_prompt(tokenizer, prompt, settings.chat_template).to(model.base.device)
    eos_ids = end_of_sequence_ids(model, tokenizer)
    streamer = _CallbackStreamer(tokenizer, on_text) if on_text is not None else None
    sampling = settings.temperature > 0

    start = _now(input_ids.device)
    speculative = None
    if settings.speculative:
        from balcony_cli.speculative import speculative_generate

        generator = torch.Generator(device=input_ids.device).manual_seed(settings.seed) if sampling else None
        if streamer is not None:
            streamer.put(input_ids.cpu())
        output = speculative_generate(
            model,
            input_ids,
            draft_exit=settings.draft_exit,
            draft_tokens=settings.draft_tokens or DEFAULT_DRAFT_TOKENS,
            max_new_tokens=settings.max_new_tokens,
            eos_token_ids=eos_ids,
            temperature=settings.temperature,
            top_p=settings.top_p,
            generator=generator,
            on_tokens=(lambda tokens: streamer.put(torch.tensor([tokens]))) if streamer is not None else None,
        )
        if streamer is not None:
            streamer.end()
        sequences = output.sequences
        finish_reason = output.finish_reason
        speculative = speculative_summary(output)
    else:
        kwargs: dict[str, Any] = {"do_sample": sampling}
        if sampling:
            torch.manual_seed(settings.seed)
            # top_k=0 turns off transformers' default top-k of 50, so that only temperature and top-p apply.
            kwargs.update(temperature=settings.temperature, top_p=settings.top_p, top_k=0)
        sequences = model.generate(
            input_ids,
            exit=exit,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=settings.max_new_tokens,
            eos_token_id=eos_ids or None,
            pad_token_id=tokenizer.pad_token_id
            if tokenizer.pad_token_id is not None
            else (eos_ids or [0])[0],
            streamer=streamer,
            **kwargs,
        )
        new = sequences[0, input_ids.shape[1] :].tolist()
        finish_reason = "eos" if new and new[-1] in eos_ids else "length"
    seconds = _now(input_ids.device) - start

    new_ids = sequences[0, input_ids.shape[1] :].tolist()
    layers = exit_layers(exit, model.num_layers)
    return GenerateResult(
        text=tokenizer.decode(new_ids, skip_special_tokens=True),
        exit=exit,
        layers=layers,
        num_layers=model.num_layers,
        relative_compute=ComputeProfile.of(model.base).relative_compute(layers),
        prompt_tokens=input_ids.shape[1],
        new_tokens=len(new_ids),
        seconds=seconds,
        finish_reason=finish_reason,
        token_ids=new_ids,
        speculative=speculative,
    )


def speculative_summary(output) -> dict[str, Any]:
    """The figures of one self-speculative generation, as written to JSON."""
    return {
        "draft_exit": output.draft_exit,
        "draft_tokens": output.draft_tokens,
        "drafted": output.drafted,
        "accepted": output.accepted,
        "acceptance_rate": output.acceptance_rate,
        "full_passes": output.full_passes,
        "tokens_per_full_pass": output.new_tokens / output.full_passes,
        "seconds": output.seconds,
    }


def generate(
    checkpoint: Path,
    prompt: str,
    settings: GenerationSettings,
    allow_base_mismatch: bool = False,
    on_text: Callable[[str], None] | None = None,
) -> tuple[GenerateResult, dict]:
    """Load a checkpoint and generate from it; return the result and the checkpoint's config.

    Every check that needs no model runs before the model is loaded.
    """
    from balcony_cli.checkpoint import base_source, load_balcony, read_balcony_config
    from balcony_cli.loading import load_tokenizer

    check_prompt(prompt)
    settings.check()
    config = read_balcony_config(checkpoint)
    settings.check_exits(config["exits"], config["base_model"]["num_layers"])
    model, config = load_balcony(checkpoint, allow_base_mismatch=allow_base_mismatch)
    tokenizer = load_tokenizer(base_source(config))
    return generate_text(model, tokenizer, prompt, settings, on_text=on_text), config


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
