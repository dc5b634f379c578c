from __future__ import annotations

import json

import pytest
import torch
from conftest import VOCAB

from balcony_cli.checkpoint import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    atomic_directory,
    fingerprint_weights,
    load_balcony,
    save_balcony,
)
from balcony_cli.errors import BadInputError
from balcony_cli.insert import insert
from balcony_cli.model import BalconyModel


def test_insert_writes_config_and_weights_only(tiny_model_dir, tmp_path):
    output = tmp_path / "out"
    document = insert(str(tiny_model_dir), [1, 3], output)
    assert sorted(p.name for p in output.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    saved = json.loads((output / CONFIG_NAME).read_text())
    assert saved == document
    assert saved["exits"] == [1, 3]
    assert saved["trained"] is False
    assert saved["base_model"]["num_layers"] == 4
    assert saved["base_model"]["model_type"] == "llama"
    assert saved["base_fingerprint"].startswith("sha256:")
    assert saved["init"] == "copy-last"
    assert "transformers" in saved["library_versions"]


@torch.no_grad()
def test_save_then_load_gives_identical_logits(tiny_model_dir, tmp_path):
    output = tmp_path / "out"
    insert(str(tiny_model_dir), [1, 2], output)
    model, config = load_balcony(output)
    for param in model.balcony_parameters():
        param.add_(torch.randn_like(param))
    save_balcony(output, model, config)

    reloaded, _ = load_balcony(output)
    input_ids = torch.randint(0, VOCAB, (2, 9))
    for k in (1, 2):
        expected = model(input_ids, exit=k).logits
        assert torch.equal(reloaded(input_ids, exit=k).logits, expected)


def test_truncated_weights_give_clear_error(tiny_model_dir, tmp_path):
    output = tmp_path / "out"
    insert(str(tiny_model_dir), [2], output)
    weights = output / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(BadInputError, match="truncated or corrupted"):
        load_balcony(output)


def test_base_mismatch_rejected_with_both_fingerprints(tiny_model_dir, tmp_path):
    output = tmp_path / "out"
    insert(str(tiny_model_dir), [2], output)
    config = json.loads((output / CONFIG_NAME).read_text())
    config["base_fingerprint"] = "sha256:" + "0" * 64
    (output / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(BadInputError, match="sha256:0000") as error:
        load_balcony(output)
    assert "--allow-base-mismatch" in str(error.value)
    model, _ = load_balcony(output, allow_base_mismatch=True)
    assert model.exits == [2]


def test_fingerprint_changes_with_weights():
    from conftest import tiny_model

    model = tiny_model("llama")
    first = fingerprint_weights(model)
    assert fingerprint_weights(model) == first
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] += 1.0
    assert fingerprint_weights(model) != first


def test_atomic_directory_keeps_target_on_error(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(target, overwrite=True) as directory:
            (directory / "new.txt").write_text("new")
            raise RuntimeError("interrupted")
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_atomic_directory_rejects_existing_without_overwrite(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("old")
    with pytest.raises(BadInputError, match="--overwrite"):
        with atomic_directory(target):
            pass
    assert (target / "keep.txt").read_text() == "old"


def test_missing_checkpoint_named(tmp_path):
    with pytest.raises(BadInputError, match="not found"):
        load_balcony(tmp_path / "nothing")


def test_balcony_state_has_only_exit_parameters():
    from conftest import tiny_model

    model = BalconyModel(tiny_model("llama"), [1, 2])
    names = set(model.balcony_state_dict())
    assert names
    assert all(name.startswith(("exit_layers.", "exit_norms.")) for name in names)
    assert any(name.startswith("exit_norms.2.") for name in names)
