"""The speculative benchmark and its prompts file, on tiny models."""

from __future__ import annotations

import json

import pytest
from conftest import char_tokenizer
from test_speculative import draft_model

from balcony_cli.errors import BadInputError
from balcony_cli.speculative_bench import benchmark_speculative, read_prompts


def test_read_prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes(b"Once upon a time\r\n\n   \nThe tower was\n")
    assert read_prompts(path) == ["Once upon a time", "The tower was"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "no prompts"),
        (b"\n  \n\t\n", "no prompts"),
        (b"caf\xe9\n", "not valid UTF-8"),
        (None, "not found"),
    ],
)
def test_read_prompts_rejects(tmp_path, content, message):
    path = tmp_path / "prompts.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(BadInputError, match=message):
        read_prompts(path)


def test_benchmark_rows_and_figures():
    model = draft_model("llama", 0.0)
    result = benchmark_speculative(
        model,
        char_tokenizer(),
        ["Hello there", "A b c"],
        draft_exits=[1, 3],
        draft_tokens=[2],
        max_new_tokens=6,
        assistant_tokens=2,
        repeats=2,
    )
    names = [row.name for row in result.rows]
    assert names == [
        "full",
        "speculative exit 1 x 2",
        "speculative exit 3 x 2",
        "assistant_early_exit 1 x 2",
        "assistant_early_exit 3 x 2",
    ]
    for row in result.rows:
        assert row.new_tokens == 12
        assert row.identical, row.name
        assert row.tokens_per_s > 0
    exit3 = result.rows[2]
    # Exit 3 computes what the full model computes, so it agrees everywhere and every draft is kept.
    assert result.agreement[3] == 1.0
    assert exit3.acceptance_rate == 1.0
    assert exit3.drafted == exit3.accepted > 0
    assert set(exit3.seconds_by_phase) >= {"prefill", "draft", "verify", "balcony_fill", "other", "total"}
    assistant = result.rows[3]
    assert assistant.settings["num_assistant_tokens"] == 2
    assert assistant.settings["assistant_confidence_threshold"] is not None
    assert 0 <= assistant.acceptance_rate <= 1
    assert json.loads(json.dumps(result.to_dict()))["agreement"]["3"] == 1.0
    assert model.base.generation_config.num_assistant_tokens != 2  # restored after the benchmark


def test_benchmark_rejects_unknown_draft_exit():
    model = draft_model("llama", 0.0)
    with pytest.raises(BadInputError, match="--draft-exit 4"):
        benchmark_speculative(
            model, char_tokenizer(), ["Hi"], draft_exits=[4], draft_tokens=[2], max_new_tokens=4
        )
