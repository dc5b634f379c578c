"""Self-speculative decoding on tiny models: lossless greedy output, cache reuse and sampling."""

from __future__ import annotations

import pytest
import torch
from conftest import NUM_LAYERS, VOCAB, tiny_model

from balcony_cli.errors import BadInputError
from balcony_cli.model import BalconyModel
from balcony_cli.speculative import SelfSpeculativeDecoder, accept_or_resample, speculative_generate

EXITS = [1, 2, 3]


def draft_model(model_type: str, noise: float, seed: int = 0) -> BalconyModel:
    """A model whose exits agree with the full model often, but not always, when `noise` is small.

    Each exit norm is a copy of the final norm, so with noise 0 exit 3 (layers 1..3, then a copy of
    layer 4 in slot 4) computes exactly what the full model computes.
    """
    base = tiny_model(model_type, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # At the default initialisation scale, greedy decoding repeats one token after a few steps. Larger
        # weights give varied continuations, so the tests compare more than a constant run.
        for name, param in base.named_parameters():
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
            elif "bias" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    model = BalconyModel(base, EXITS)
    with torch.no_grad():
        for k in EXITS:
            model.exit_norms[str(k)].load_state_dict(model.layout.final_norm(model.base).state_dict())
        for param in model.balcony_parameters():
            param.add_(torch.randn(param.shape, generator=generator) * noise)
    # No end-of-sequence token unless a test sets one, so that every run has the same length.
    model.base.generation_config.eos_token_id = None
    return model


def plain_greedy(model: BalconyModel, prompt: torch.Tensor, max_new_tokens: int, eos: int | None = None):
    model.base.generation_config.eos_token_id = eos
    try:
        return model.generate(
            prompt,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=0,
            attention_mask=torch.ones_like(prompt),
        )
    finally:
        model.base.generation_config.eos_token_id = None


@torch.no_grad()
def exit_greedy(model: BalconyModel, prefix: list[int], k: int, count: int) -> list[int]:
    """Exit k's greedy continuation of `prefix`, one uncached forward pass per token."""
    sequence = list(prefix)
    for _ in range(count):
        logits = model(torch.tensor([sequence]), exit=k, use_cache=False).logits
        sequence.append(int(logits[0, -1].argmax()))
    return sequence[len(prefix) :]


@torch.no_grad()
def test_greedy_equals_plain_greedy(model_type):
    rounds = accepted = drafted = 0
    for seed, noise in ((0, 0.0), (1, 0.05)):
        model = draft_model(model_type, noise, seed=seed)
        for prompt_length in (1, 6, 17):
            prompt = torch.randint(
                0, VOCAB, (1, prompt_length), generator=torch.Generator().manual_seed(seed)
            )
            expected = plain_greedy(model, prompt, 16).tolist()
            for k in (1, 3):
                for draft_tokens in (1, 3, 8):
                    output = speculative_generate(model, prompt, k, draft_tokens, max_new_tokens=16)
                    assert output.sequences.tolist() == expected, (seed, prompt_length, k, draft_tokens)
                    assert output.finish_reason == "length"
                    rounds += len(output.rounds)
                    accepted += output.accepted
                    drafted += output.drafted
    # Both the accepting and the rejecting path ran.
    assert 0 < accepted < drafted
    assert rounds > 0


@torch.no_grad()
@pytest.mark.parametrize("max_new_tokens", [1, 2, 3, 5])
def test_draft_longer_than_remaining_budget(max_new_tokens):
    model = draft_model("llama", 0.0)
    prompt = torch.randint(0, VOCAB, (1, 4), generator=torch.Generator().manual_seed(0))
    output = speculative_generate(model, prompt, 3, draft_tokens=8, max_new_tokens=max_new_tokens)
    assert output.sequences.tolist() == plain_greedy(model, prompt, max_new_tokens).tolist()
    assert output.new_tokens == max_new_tokens
    generated = 1
    for round_ in output.rounds:
        assert len(round_.drafted) <= max_new_tokens - generated - 1
        generated += round_.accepted + 1


@torch.no_grad()
@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_eos_inside_draft_stops_like_plain(model_type):
    model = draft_model(model_type, 0.0)
    prompt = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(3))
    k = 3  # identical to the full model here, so every draft is accepted and the EOS arrives in a draft
    free_run = plain_greedy(model, prompt, 12)[0, 5:].tolist()
    eos_in_draft = 0
    for position in range(1, 8):
        eos = free_run[position]
        if eos in free_run[:position]:
            continue
        expected = plain_greedy(model, prompt, 12, eos=eos).tolist()
        output = speculative_generate(
            model, prompt, k, draft_tokens=4, max_new_tokens=12, eos_token_ids=[eos]
        )
        assert output.sequences.tolist() == expected
        assert output.sequences[0, -1].item() == eos
        assert output.finish_reason == "eos"
        eos_in_draft += any(eos in r.drafted[: r.accepted] for r in output.rounds)
    assert eos_in_draft > 0


@torch.no_grad()
@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gpt2", "gpt_neox"])
def test_drafts_equal_uncached_exit_greedy(model_type):
    """The Balcony layer's cache (filled from the prompt pass and the verifier) is right: each round's
    drafts are what exit k predicts from the committed tokens without any cache."""
    model = draft_model(model_type, 0.05, seed=1)
    prompt = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(1))
    for k in (2, 3):
        output = speculative_generate(model, prompt, k, draft_tokens=3, max_new_tokens=20)
        sequence = output.sequences[0].tolist()
        committed = prompt.shape[1] + 1
        for round_ in output.rounds:
            assert round_.drafted == exit_greedy(model, sequence[:committed], k, len(round_.drafted))
            committed += round_.accepted + 1


@torch.no_grad()
def test_shared_layers_run_each_token_once():
    """The verifier starts drafted tokens at layer k + 1: layers 1..k see as many tokens as layer L."""
    model = draft_model("llama", 0.05, seed=1)
    layers = model.layout.layers(model.base)
    tokens_seen = [0] * NUM_LAYERS
    handles = [
        layer.register_forward_hook(
            lambda module, args, output, i=i: tokens_seen.__setitem__(i, tokens_seen[i] + output.shape[1])
        )
        for i, layer in enumerate(layers)
    ]
    prompt = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(0))
    try:
        output = speculative_generate(model, prompt, 3, draft_tokens=3, max_new_tokens=20)
    finally:
        for handle in handles:
            handle.remove()
    expected = prompt.shape[1] + sum(len(r.drafted) + 1 for r in output.rounds)
    assert tokens_seen == [expected] * NUM_LAYERS
    assert output.drafted > output.accepted  # some drafts were rejected and cropped


def test_rejection_sampling_keeps_target_distribution():
    generator = torch.Generator().manual_seed(0)
    target = torch.tensor([0.5, 0.3, 0.15, 0.05])
    draft = torch.tensor([0.1, 0.6, 0.1, 0.2])
    counts = torch.zeros(4)
    draws = 20000
    for _ in range(draws):
        token = int(torch.multinomial(draft, 1, generator=generator))
        accepted, replacement = accept_or_resample(token, draft, target, generator)
        counts[token if accepted else replacement] += 1
    torch.testing.assert_close(counts / draws, target, atol=0.015, rtol=0)


@torch.no_grad()
def test_sampling_is_seeded_and_bounded():
    model = draft_model("llama", 0.02, seed=1)
    prompt = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(0))

    def sample(seed):
        return speculative_generate(
            model,
            prompt,
            2,
            draft_tokens=3,
            max_new_tokens=15,
            temperature=0.9,
            top_p=0.95,
            generator=torch.Generator().manual_seed(seed),
        )

    first, again, other = sample(0), sample(0), sample(1)
    assert first.sequences.tolist() == again.sequences.tolist()
    assert first.sequences.tolist() != other.sequences.tolist()
    assert first.new_tokens == 15


def test_rejects_batch_sliding_window_and_unknown_exit():
    model = draft_model("llama", 0.0)
    with pytest.raises(BadInputError, match="shape \\(2, 3\\)"):
        speculative_generate(model, torch.zeros(2, 3, dtype=torch.long), 1, 2, 4)
    with pytest.raises(BadInputError, match="--draft-exit 4: this checkpoint has exits 1,2,3"):
        SelfSpeculativeDecoder(model, 4)
    with pytest.raises(BadInputError, match="--draft-tokens 0"):
        speculative_generate(model, torch.zeros(1, 3, dtype=torch.long), 1, 0, 4)

    from transformers import AutoModelForCausalLM, MistralConfig

    config = MistralConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=4,
    )
    sliding = BalconyModel(AutoModelForCausalLM.from_config(config).eval(), EXITS)
    with pytest.raises(BadInputError, match="sliding-window"):
        speculative_generate(sliding, torch.zeros(1, 3, dtype=torch.long), 1, 2, 4)
