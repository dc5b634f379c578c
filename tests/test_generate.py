"""`balcony generate` and its core on tiny models: exits, budgets, streaming, speculative output, CLI."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import NUM_LAYERS, char_tokenizer
from test_speculative import draft_model
from typer.testing import CliRunner

from balcony_cli.cli import app
from balcony_cli.compute import ComputeProfile, exit_for_budget
from balcony_cli.errors import BadInputError
from balcony_cli.generate import GenerationSettings, generate_text
from balcony_cli.insert import insert

runner = CliRunner()
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def model():
    return draft_model("llama", 0.05, seed=1)


@pytest.fixture
def checkpoint(tiny_model_dir, tmp_path):
    directory = tmp_path / "checkpoint"
    insert(str(tiny_model_dir), [1, 2], directory)
    return directory


def greedy(model, exit=None, **settings):
    return generate_text(
        model, char_tokenizer(), PROMPT, GenerationSettings(exit=exit, max_new_tokens=12, **settings)
    )


def test_exit_output_equals_model_generate(model):
    tokenizer = char_tokenizer()
    input_ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    for k in (1, 3, None):
        expected = model.generate(
            input_ids,
            exit=k,
            max_new_tokens=12,
            do_sample=False,
            attention_mask=torch.ones_like(input_ids),
            pad_token_id=0,
            eos_token_id=tokenizer.eos_token_id,
        )
        result = greedy(model, k)
        assert result.token_ids == expected[0, input_ids.shape[1] :].tolist()
        assert result.exit == k
        assert result.layers == (NUM_LAYERS if k is None else k + 1)


def test_budget_selects_exit(model):
    # Tiny Llama: 18,432 FLOPs per layer and 6,400 for the head, so exits 1, 2 and 3 (2, 3 and 4 layers)
    # cost 0.54, 0.77 and 1.0 of the full model.
    profile = ComputeProfile.of(model.base)
    assert profile.relative_compute(3) == pytest.approx((3 * 18432 + 6400) / (4 * 18432 + 6400))
    for budget, expected in ((0.6, 1), (0.8, 2), (0.99, 2), (1.0, None)):
        assert greedy(model, budget=budget).exit == expected, budget
        assert exit_for_budget(budget, model.exits, profile) == expected
    with pytest.raises(BadInputError, match="cheapest is exit 1 at 0.540"):
        greedy(model, budget=0.5)


def test_exit_never_runs_later_layers(model):
    layers = model.layout.layers(model.base)
    calls: list[int] = []
    handles = [
        layer.register_forward_hook(lambda module, args, output, i=i: calls.append(i))
        for i, layer in enumerate(layers)
    ]
    try:
        for k in (1, 2):
            calls.clear()
            greedy(model, k)
            assert calls
            assert max(calls) == k - 1
    finally:
        for handle in handles:
            handle.remove()


def test_switching_exits_copies_no_weights(model):
    pointers = {param.data_ptr() for param in model.parameters()}
    count = sum(param.numel() for param in model.parameters())
    outputs = [greedy(model, k).token_ids for k in (1, 2, 3, None)]
    assert {param.data_ptr() for param in model.parameters()} == pointers
    assert sum(param.numel() for param in model.parameters()) == count
    for k in (1, 2, 3):
        view = model.exit_model(k)
        assert view is model.exit_model(k)
        assert model.layout.layers(view)[0] is model.layout.layers(model.base)[0]
    assert outputs[0] != outputs[3]


def test_speculative_equals_full_greedy(model):
    full = greedy(model)
    for draft_exit, draft_tokens in ((1, 2), (3, 4), (3, 20)):
        result = greedy(model, speculative=True, draft_exit=draft_exit, draft_tokens=draft_tokens)
        assert result.token_ids == full.token_ids
        assert result.exit is None
        figures = result.speculative
        assert figures["draft_exit"] == draft_exit
        assert figures["drafted"] >= figures["accepted"]
        assert figures["full_passes"] < result.new_tokens or figures["accepted"] == 0


def test_streamed_text_equals_result(model):
    for settings in ({"exit": 2}, {"speculative": True, "draft_exit": 3}):
        pieces: list[str] = []
        result = generate_text(
            model,
            char_tokenizer(),
            PROMPT,
            GenerationSettings(max_new_tokens=12, **settings),
            on_text=pieces.append,
        )
        assert "".join(pieces) == result.text
        assert len(pieces) > 1


def test_sampling_is_seeded(model):
    first = greedy(model, 2, temperature=0.9, top_p=0.9, seed=3)
    again = greedy(model, 2, temperature=0.9, top_p=0.9, seed=3)
    assert first.token_ids == again.token_ids
    assert first.new_tokens == 12


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"exit": 2, "budget": 0.5}, "pass only one"),
        ({"budget": 0.0}, "--budget 0.0"),
        ({"budget": 1.5}, "--budget 1.5"),
        ({"exit": 7}, "--exit 7: this checkpoint has exits 1,2,3"),
        ({"speculative": True}, "needs --draft-exit"),
        ({"speculative": True, "draft_exit": 9}, "--draft-exit 9"),
        ({"speculative": True, "draft_exit": 2, "draft_tokens": 0}, "--draft-tokens 0"),
        ({"speculative": True, "draft_exit": 2, "exit": 2}, "--exit and --budget do not apply"),
        ({"draft_exit": 2}, "add --speculative"),
        ({"top_p": 0.9}, "--temperature above 0"),
        ({"temperature": -1.0}, "--temperature -1.0"),
        ({"max_new_tokens": 0}, "--max-new-tokens 0"),
    ],
)
def test_bad_settings_rejected(model, settings, message):
    with pytest.raises(BadInputError, match=message):
        generate_text(model, char_tokenizer(), PROMPT, GenerationSettings(**settings))


def test_empty_prompt_and_missing_chat_template(model):
    with pytest.raises(BadInputError, match="PROMPT is empty"):
        generate_text(model, char_tokenizer(), "  \n", GenerationSettings())
    with pytest.raises(BadInputError, match="no chat template"):
        generate_text(model, char_tokenizer(), PROMPT, GenerationSettings(chat_template=True))


def test_cli_json_document(checkpoint):
    result = runner.invoke(
        app,
        ["generate", PROMPT, "-c", str(checkpoint), "--exit", "2", "--max-new-tokens", "5", "--json", "-"],
    )
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["schema_version"] == 1
    assert document["settings"]["exit"] == 2
    assert document["base_fingerprint"].startswith("sha256:")
    assert document["prompt"] == PROMPT
    assert document["exit"] == 2
    assert document["layers"] == 3
    assert document["new_tokens"] == len(document["token_ids"]) <= 5
    assert document["tokens_per_s"] > 0


def test_cli_streams_text_and_reports_speculative_figures(checkpoint, tmp_path):
    path = tmp_path / "out.json"
    argv = [
        "generate",
        PROMPT,
        "-c",
        str(checkpoint),
        "--speculative",
        "--draft-exit",
        "1",
        "--draft-tokens",
        "3",
        "--max-new-tokens",
        "6",
        "--json",
        str(path),
    ]
    result = runner.invoke(app, argv)
    assert result.exit_code == 0, result.output
    document = json.loads(path.read_text())
    assert result.stdout == document["text"] + "\n"
    assert "acceptance rate" in result.stderr
    assert document["speculative"]["draft_exit"] == 1
    assert document["exit"] is None
    rerun = runner.invoke(app, argv)
    assert rerun.exit_code == 2
    assert "--overwrite" in rerun.output
