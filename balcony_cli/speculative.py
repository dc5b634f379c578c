"""Self-speculative decoding: exit k drafts tokens and the full model verifies them in one pass.

Exit k and the full model run the same modules for layers 1..k on the same tokens at the same
positions, so they compute the same keys and values there. The two caches therefore share one cache
layer object per layer 1..k, and the verifier starts every token the draft has already run at layer
k + 1, from the layer-k hidden state the draft saved. Only the Balcony layer's cache belongs to the
draft alone.

Batch size 1. Greedy decoding is lossless token for token: every token kept is the full model's
argmax. NOTE: that holds up to float rounding. The verifier runs layers k+1..L on several tokens in
one matrix product, whose rounding differs in the last bit from one-token steps, so a tie between
the top two logits within about one ulp can go the other way. In benchmarks/speculative.py on
SmolLM2-135M (fp32, CPU, 8 prompts x 128 tokens, four draft settings) this happened at one position
of one prompt in one setting, at a tie that plain decoding also breaks differently with 1 and with
2 CPU threads.

With a temperature, drafts go through the speculative-sampling test (the rule transformers'
`_speculative_sampling` implements). It keeps the full model's sampling distribution but draws random
numbers differently from plain sampling, so a seed gives other text than without drafts.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from balcony_cli.errors import BadInputError
from balcony_cli.model import BalconyModel, shallow_module_copy

PHASES = ("prefill", "draft", "verify", "balcony_fill", "other")


@dataclass
class DraftRound:
    """One round: exit k proposes tokens, then one full-model pass checks them."""

    drafted: list[int]
    """The tokens exit k proposed, in order."""
    accepted: int
    """How many of them the full model kept: a prefix of `drafted`."""


@dataclass
class SpeculativeOutput:
    """The result of one self-speculative generation."""

    sequences: torch.Tensor
    """Prompt and new tokens, shape (1, prompt + new)."""
    prompt_tokens: int
    draft_exit: int
    draft_tokens: int
    rounds: list[DraftRound]
    finish_reason: Literal["eos", "length"]
    seconds: dict[str, float]
    """Wall time per phase (see PHASES); "other" is sampling, cache cropping and bookkeeping."""

    @property
    def new_tokens(self) -> int:
        return self.sequences.shape[1] - self.prompt_tokens

    @property
    def drafted(self) -> int:
        return sum(len(r.drafted) for r in self.rounds)

    @property
    def accepted(self) -> int:
        return sum(r.accepted for r in self.rounds)

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted draft tokens over drafted tokens (None when nothing was drafted)."""
        return self.accepted / self.drafted if self.drafted else None

    @property
    def full_passes(self) -> int:
        """Full-model passes: the prompt pass and one verification per round."""
        return 1 + len(self.rounds)


# Module views that run part of a model body with the body's own forward code.


class _ReplayHiddenStates(nn.Module):
    """Stands in for the first decoder layer of a body and returns hidden states computed earlier.

    Placed in slot 0 of a body whose later slots run for real, it lets the body's own forward code
    build the masks and position embeddings for the later layers, whatever the architecture.
    """

    def __init__(self) -> None:
        super().__init__()
        self.hidden_states: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.hidden_states


class _PassThrough(nn.Module):
    """Fills a decoder-layer slot without computing anything."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


def _body_view(model: BalconyModel, owner: nn.Module, layers: list[nn.Module], final_norm: nn.Module, config):
    """Return a copy of `owner`'s body module with other layers and final norm, sharing every weight."""
    layout = model.layout
    body = shallow_module_copy(layout.body(owner))
    setattr(body, layout.layers_attr, nn.ModuleList(layers))
    setattr(body, layout.final_norm_attr, final_norm)
    body.config = config
    return body


def _crop(layer: DynamicLayer, length: int) -> None:
    """Drop the newest entries of one cache layer so that it contains `length` tokens."""
    excess = layer.get_seq_length() - length
    if excess > 0:
        layer.crop(-excess)


# The decoder.


class SelfSpeculativeDecoder:
    """Generates with the full model, using exit `draft_exit` of the same BalconyModel as the draft.

    Per round, with n committed tokens of which the last is not in any cache yet:
    1. Draft: exit k runs the pending token and its own proposals one at a time, through layers
       1..k (their cache shared with the full model), Balcony layer k, exit norm k and the head.
       Layer k's output for each token is saved.
    2. Verify: layers 1..k run only the last proposal, the one the draft never fed back in. Layers
       k+1..L then run every token of the round in one pass, starting from the saved layer-k
       outputs, so the shared layers are never recomputed for drafted tokens.
    3. Keep the longest prefix of proposals the full model agrees with, plus the full model's own
       next token, and crop every cache back to the kept tokens.
    """

    def __init__(self, model: BalconyModel, draft_exit: int):
        if draft_exit not in model.exits:
            raise BadInputError(
                f"--draft-exit {draft_exit}: this checkpoint has exits {','.join(map(str, model.exits))}; "
                "pick one of them"
            )

        self.model = model
        self.draft_exit = draft_exit
        k = draft_exit
        layout = model.layout
        base = model.base
        draft_model = model.exit_model(k)
        base_layers = list(layout.layers(base))
        self.head = layout.head(base)
        self.balcony_layer = model.exit_layers[str(k)]
        self.base_body = layout.body(base)
        self.draft_body = layout.body(draft_model)

        self.replay = _ReplayHiddenStates()
        # The verifier and Balcony-layer views keep their real layers in their own slots (k..L-1 and
        # k), because a layer's slot picks its cache entry and, in models that mix attention types,
        # its mask. Slots before them replay the saved layer-k output or pass it through.
        padding = [_PassThrough() for _ in range(k - 1)]
        self.trunk_body = _body_view(
            model, base, base_layers[:k], nn.Identity(), layout.truncated_config(base.config, k)
        )
        self.verifier_body = _body_view(
            model, base, [self.replay, *padding, *base_layers[k:]], layout.final_norm(base), base.config
        )
        # No exit norm: the Balcony layer runs here only to fill its cache, and its output is unused.
        self.balcony_body = _body_view(
            model, draft_model, [self.replay, *padding, self.balcony_layer], nn.Identity(), draft_model.config
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        draft_tokens: int,
        eos_token_ids: Sequence[int] = (),
        temperature: float = 0.0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        on_tokens: Callable[[list[int]], None] | None = None,
    ) -> SpeculativeOutput:
        """Generate up to `max_new_tokens` tokens after `input_ids` (shape (1, prompt)).

        `temperature` 0 means greedy decoding. `on_tokens` receives each round's new tokens as soon as
        they are final, for streaming.
        """
        _check_decoding_settings(max_new_tokens, draft_tokens, temperature, top_p)
        if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] == 0:
            raise BadInputError(
                f"speculative decoding takes one non-empty prompt (input_ids of shape (1, n)); got shape "
                f"{tuple(input_ids.shape)}"
            )
        k = self.draft_exit
        device = input_ids.device
        eos = set(eos_token_ids)
        timer = _PhaseTimer(device)
        choose = _TokenChooser(temperature, top_p, generator)

        full_cache = DynamicCache(config=self.model.base.config)
        if any(full_cache.is_sliding):
            # TODO: sliding-window cache layers drop old entries, so a rejected draft cannot be cropped
            # back out of them; supporting them needs a cache that keeps the window plus the draft.
            raise BadInputError(
                "speculative decoding does not support sliding-window attention layers yet; "
                "generate without --speculative"
            )
        balcony_cache_layer = DynamicLayer()
        # One cache layer object per shared layer 1..k, listed in both caches: the draft and the
        # verifier read and extend the same keys and values there.
        draft_cache = Cache(layers=[*full_cache.layers[:k], balcony_cache_layer])
        # Slots 0..k-1 of the next two caches are never written (replay and pass-through modules sit
        # there). They repeat the first real layer's cache so that the body sizes its masks and
        # positions by that layer's length.
        verifier_cache = Cache(layers=[full_cache.layers[k]] * k + full_cache.layers[k:])
        balcony_cache = Cache(layers=[balcony_cache_layer] * (k + 1))

        base_layers = self.model.layout.layers(self.model.base)
        saved: list[torch.Tensor] = []  # layer k's output for each token the draft ran, (1, 1, hidden)
        try:
            # Prefill: the full model runs the prompt. Layers 1..k fill the shared cache on the way. Layer
            # k's output, caught on its way into layer k + 1, fills the Balcony layer's cache: the draft
            # never ran the prompt, so that cache has nothing to reuse.
            prompt_length = input_ids.shape[1]
            prompt_hidden: list[torch.Tensor] = []
            with timer("prefill"), _capture_inputs(base_layers[k], prompt_hidden):
                hidden = self.base_body(
                    input_ids=input_ids,
                    position_ids=_positions(0, prompt_length, device),
                    cache=full_cache,
                    use_cache=True,
                ).last_hidden_state
                first_logits = self.head(hidden[:, -1])  # (1, vocab)
            with timer("balcony_fill"):
                self._fill_balcony(prompt_hidden[0], input_ids, 0, balcony_cache)
            with timer("other"):
                pending = choose.from_target(first_logits)
            committed = input_ids[0].tolist() + [pending]
            if on_tokens is not None:
                on_tokens([pending])
            rounds: list[DraftRound] = []
            finish_reason: Literal["eos", "length"] = "eos" if pending in eos else "length"
            generated = 1

            while generated < max_new_tokens and finish_reason != "eos":
                # `cached` tokens are in every cache; `pending` (the last committed token) is in none.
                cached = len(committed) - 1
                remaining = max_new_tokens - generated
                # A round yields its accepted drafts plus one token of the full model's own, so at most
                # remaining - 1 drafts can be used.
                budget = min(draft_tokens, remaining - 1)

                drafts: list[int] = []
                draft_probs: list[torch.Tensor | None] = []
                with timer("draft"), _capture_inputs(self.balcony_layer, saved):
                    token = pending
                    for i in range(budget):
                        hidden = self.draft_body(
                            input_ids=_token(token, device),
                            position_ids=_positions(cached + i, 1, device),
                            cache=draft_cache,
                            use_cache=True,
                        ).last_hidden_state
                        token, probs = choose.draft(self.head(hidden[:, -1]))
                        drafts.append(token)
                        draft_probs.append(probs)
                        # Tokens after an end-of-sequence token would be discarded anyway.
                        if token in eos:
                            break

                round_ids = [pending, *drafts]
                round_tensor = torch.tensor([round_ids], device=device)
                with timer("verify"):
                    # The last token of the round has not run through layers 1..k: the draft proposed it
                    # but never fed it back in.
                    last = self.trunk_body(
                        input_ids=round_tensor[:, -1:],
                        position_ids=_positions(cached + len(drafts), 1, device),
                        cache=draft_cache,
                        use_cache=True,
                    ).last_hidden_state
                    layer_k_output = torch.cat([*saved, last], dim=1)  # (1, drafts + 1, hidden)
                    self.replay.hidden_states = layer_k_output
                    hidden = self.verifier_body(
                        input_ids=round_tensor,
                        position_ids=_positions(cached, len(round_ids), device),
                        cache=verifier_cache,
                        use_cache=True,
                    ).last_hidden_state
                    self.replay.hidden_states = None
                    target_logits = self.head(hidden[0])  # (drafts + 1, vocab)
                saved.clear()
                with timer("other"):
                    accepted, next_token = choose.verify(drafts, draft_probs, target_logits)
                    rounds.append(DraftRound(drafted=drafts, accepted=accepted))
                    # Rejected drafts leave entries in every cache (layers 1..k from drafting, layers
                    # k+1..L from verifying): they belong to tokens that are not in the output.
                    for layer in full_cache.layers:
                        _crop(layer, cached + 1 + accepted)
                    _crop(balcony_cache_layer, cached + 1 + accepted)
                    new = [*drafts[:accepted], next_token]
                    for position, token in enumerate(new):
                        if token in eos:
                            new = new[: position + 1]
                            finish_reason = "eos"
                            break
                    committed.extend(new)
                    generated += len(new)
                if on_tokens is not None:
                    on_tokens(new)
                if accepted == len(drafts) and finish_reason != "eos" and generated < max_new_tokens:
                    # The draft ran every kept token through the Balcony layer except the last one of
                    # the round, which it proposed but never fed back in. The verifier computed that
                    # token's layer-k output, so only the Balcony layer runs.
                    with timer("balcony_fill"):
                        self._fill_balcony(
                            layer_k_output[:, -1:], round_tensor[:, -1:], cached + len(drafts), balcony_cache
                        )
                pending = new[-1]
        finally:
            self.replay.hidden_states = None

        return SpeculativeOutput(
            sequences=torch.tensor([committed], device=device),
            prompt_tokens=input_ids.shape[1],
            draft_exit=k,
            draft_tokens=draft_tokens,
            rounds=rounds,
            finish_reason=finish_reason,
            seconds=timer.totals(),
        )

    def _fill_balcony(
        self, layer_k_output: torch.Tensor, input_ids: torch.Tensor, start: int, cache: Cache
    ) -> None:
        """Run only Balcony layer k on saved layer-k outputs, to add their entries to its cache."""
        self.replay.hidden_states = layer_k_output
        try:
            self.balcony_body(
                input_ids=input_ids,
                position_ids=_positions(start, input_ids.shape[1], input_ids.device),
                cache=cache,
                use_cache=True,
            )
        finally:
            self.replay.hidden_states = None


def speculative_generate(
    model: BalconyModel,
    input_ids: torch.Tensor,
    draft_exit: int,
    draft_tokens: int,
    max_new_tokens: int,
    eos_token_ids: Sequence[int] = (),
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    on_tokens: Callable[[list[int]], None] | None = None,
) -> SpeculativeOutput:
    """Generate with the full model, drafting `draft_tokens` tokens per round with exit `draft_exit`."""
    decoder = SelfSpeculativeDecoder(model, draft_exit)
    return decoder.generate(
        input_ids,
        max_new_tokens=max_new_tokens,
        draft_tokens=draft_tokens,
        eos_token_ids=eos_token_ids,
        temperature=temperature,
        top_p=top_p,
        generator=generator,
        on_tokens=on_tokens,
    )


def _check_decoding_settings(
    max_new_tokens: int, draft_tokens: int, temperature: float, top_p: float
) -> None:
    if draft_tokens < 1:
        raise BadInputError(f"--draft-tokens {draft_tokens}: expected at least 1 token drafted per round")
    if max_new_tokens < 1:
        raise BadInputError(f"--max-new-tokens {max_new_tokens}: expected at least 1")
    if temperature < 0:
        raise BadInputError(f"--temperature {temperature}: expected 0 (greedy) or more")
    if not 0 < top_p <= 1:
        raise BadInputError(f"--top-p {top_p}: expected a probability mass in (0, 1]")


@contextmanager
def _capture_inputs(module: nn.Module, outputs: list[torch.Tensor]) -> Iterator[None]:
    """Append the hidden states that enter `module` to `outputs` while the block runs."""

    def hook(module, args, kwargs):
        outputs.append(args[0] if args else kwargs["hidden_states"])

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _positions(start: int, length: int, device: torch.device) -> torch.Tensor:
    return torch.arange(start, start + length, device=device).unsqueeze(0)


def _token(token: int, device: torch.device) -> torch.Tensor:
    return torch.tensor([[token]], device=device)


class _PhaseTimer:
    """Adds up wall time per phase, synchronising a GPU so that its queued work is counted."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self._start = time.perf_counter()

    def __call__(self, phase: str):
        return _Phase(self, phase)

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def totals(self) -> dict[str, float]:
        elapsed = self._now() - self._start
        totals = dict(self.seconds)
        # Time outside every phase (the Python loop itself) counts as "other".
        totals["other"] += max(0.0, elapsed - sum(self.seconds.values()))
        totals["total"] = elapsed
        return totals


class _Phase:
    def __init__(self, timer: _PhaseTimer, phase: str) -> None:
        self.timer, self.phase = timer, phase

    def __enter__(self) -> None:
        self.start = self.timer._now()

    def __exit__(self, *exc) -> None:
        self.timer.seconds[self.phase] += self.timer._now() - self.start


class _TokenChooser:
    """Picks draft and full-model tokens: argmax when greedy, else rejection sampling."""

    def __init__(self, temperature: float, top_p: float, generator: torch.Generator | None) -> None:
        self.greedy = temperature == 0
        self.generator = generator
        self.warpers = []
        if not self.greedy:
            if temperature != 1.0:
                self.warpers.append(TemperatureLogitsWarper(temperature))
            if top_p < 1.0:
                self.warpers.append(TopPLogitsWarper(top_p))

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Turn logits of shape (n, vocab) into the sampling distribution that plain sampling uses."""
        scores = logits.float()
        for warper in self.warpers:
            scores = warper(None, scores)
        return scores.softmax(dim=-1)

    def _sample(self, probs: torch.Tensor) -> int:
        return int(torch.multinomial(probs, 1, generator=self.generator).item())

    def from_target(self, logits: torch.Tensor) -> int:
        """Choose the full model's token from logits of shape (1, vocab)."""
        if self.greedy:
            return int(logits.argmax(dim=-1).item())
        return self._sample(self.probabilities(logits)[0])

    def draft(self, logits: torch.Tensor) -> tuple[int, torch.Tensor | None]:
        """Choose a draft token from exit logits of shape (1, vocab); return it and its distribution."""
        if self.greedy:
            return int(logits.argmax(dim=-1).item()), None
        probs = self.probabilities(logits)[0]
        return self._sample(probs), probs

    def verify(
        self, drafts: list[int], draft_probs: list[torch.Tensor | None], target_logits: torch.Tensor
    ) -> tuple[int, int]:
        """Return how many drafts the full model accepts and the token it adds after them.

        `target_logits` has shape (drafts + 1, vocab): row i is the full model's prediction for the
        position of draft i (row drafts: the position after the last draft).
        """
        if self.greedy:
            choices = target_logits.argmax(dim=-1).tolist()
            accepted = 0
            while accepted < len(drafts) and drafts[accepted] == choices[accepted]:
                accepted += 1
            return accepted, choices[accepted]
        target_probs = self.probabilities(target_logits)
        for i, (token, probs) in enumerate(zip(drafts, draft_probs)):
            accepted, replacement = accept_or_resample(token, probs, target_probs[i], self.generator)
            if not accepted:
                return i, replacement
        return len(drafts), self._sample(target_probs[len(drafts)])


def accept_or_resample(
    token: int,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[bool, int | None]:
    """Apply the speculative-sampling test to one draft token drawn from `draft_probs`.

    The token is kept with probability min(1, target / draft). Otherwise a replacement is drawn from
    max(0, target - draft), normalised. The token that ends up at this position then follows
    `target_probs` exactly. It is x with probability min(draft(x), target(x)) plus the rejection
    probability 1 - sum_y min(draft(y), target(y)) times max(0, target(x) - draft(x)) / sum_y
    max(0, target(y) - draft(y)). That rejection probability equals the normaliser, so the sum is
    min(draft(x), target(x)) + max(0, target(x) - draft(x)) = target(x).
    """
    ratio = target_probs[token] / draft_probs[token]
    if torch.rand((), generator=generator, device=target_probs.device) < ratio:
        return True, None
    residual = (target_probs - draft_probs).clamp(min=0)
    total = residual.sum()
    if total <= 0:
        # Only reachable through rounding when the two distributions are equal; then the draft is exact.
        return True, None
    return False, int(torch.multinomial(residual / total, 1, generator=generator).item())
