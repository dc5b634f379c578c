"""Training data: variables in --data, and mixtures of several sources."""

from __future__ import annotations

import pytest
from conftest import char_tokenizer

from balcony_cli.data import build_mixture_splits, resolve_data, resolve_mixture
from balcony_cli.errors import BadInputError


@pytest.fixture
def two_sources(tmp_path):
    """Two corpora whose blocks differ by letter: one of only 'a's, one of only 'b's."""
    for name, letter, length in (("left", "a", 32 * 200), ("right", "b", 32 * 60)):
        directory = tmp_path / name
        directory.mkdir()
        (directory / "text.txt").write_text(letter * length)
    return tmp_path / "left", tmp_path / "right"


def letters(blocks) -> list[str]:
    """Name each block by the one letter it contains ('a', 'b'), or 'mixed'."""
    tokenizer = char_tokenizer()
    names = []
    for row in blocks["input_ids"]:
        found = set(row.tolist()) - {tokenizer.eos_token_id}
        names.append(tokenizer.convert_ids_to_tokens(found.pop()) if len(found) == 1 else "mixed")
    return names


def test_mixture_draws_from_both_sources(two_sources):
    left, right = two_sources
    mixture = resolve_mixture({str(left): 1.0, str(right): 1.0})
    train, validation = build_mixture_splits(mixture, char_tokenizer(), seq_len=32, val_blocks=4, seed=0)
    drawn = letters(train)
    assert drawn.count("a") > 0
    assert drawn.count("b") > 0
    # Equal weights, drawn until the smaller source ('b': 60 blocks less 2 held out) runs out.
    assert drawn.count("b") == 58
    assert abs(drawn.count("a") - drawn.count("b")) <= 20
    assert sorted(letters(validation)) == ["a", "a", "b", "b"]


def test_mixture_weights_set_shares(two_sources):
    left, right = two_sources
    mixture = resolve_mixture({str(left): 3.0, str(right): 1.0})
    train, _ = build_mixture_splits(mixture, char_tokenizer(), seq_len=32, val_blocks=0, seed=0)
    drawn = letters(train)
    share = drawn.count("a") / len(drawn)
    assert 0.6 < share < 0.9
    assert drawn.count("b") == 60


def test_data_expands_environment_variables(two_sources, monkeypatch):
    left, _ = two_sources
    monkeypatch.setenv("CORPUS_ROOT", str(left.parent))
    source = resolve_data("${CORPUS_ROOT}/left")
    assert source.files == (str(left / "text.txt"),)
    assert resolve_data("$CORPUS_ROOT/left/text.txt").files == source.files
    monkeypatch.delenv("CORPUS_ROOT")
    with pytest.raises(BadInputError, match="environment variable CORPUS_ROOT is not set"):
        resolve_data("${CORPUS_ROOT}/left")
