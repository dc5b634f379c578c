from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import torch
from conftest import VOCAB, char_tokenizer, tiny_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from balcony_cli.checkpoint import CONFIG_NAME, WEIGHTS_NAME, load_balcony
from balcony_cli.cli import app
from balcony_cli.export import export
from balcony_cli.insert import insert

runner = CliRunner()


def trained_checkpoint(tmp_path, model_type: str, exits=(1, 2)):
    """A checkpoint whose Balcony weights differ from the copy-last initialisation, marked trained."""
    base_dir = tmp_path / f"base-{model_type}"
    tiny_model(model_type).save_pretrained(base_dir)
    char_tokenizer().save_pretrained(base_dir)
    checkpoint = tmp_path / f"ckpt-{model_type}"
    insert(str(base_dir), list(exits), checkpoint)
    torch.manual_seed(1)
    weights = {name: tensor + 0.05 * torch.randn_like(tensor) for name, tensor in
               load_file(str(checkpoint / WEIGHTS_NAME)).items()}
    save_file(weights, str(checkpoint / WEIGHTS_NAME))
    config = json.loads((checkpoint / CONFIG_NAME).read_text())
    config["trained"] = True
    config["training"] = {"steps": 7, "train_tokens": 1234, "data": "corpus", "recipe": {"lr": 0.001, "seq_len": 32}}
    (checkpoint / CONFIG_NAME).write_text(json.dumps(config))
    return checkpoint


@torch.no_grad()
def test_exported_model_matches_exit_logits(tmp_path, model_type):
    checkpoint = trained_checkpoint(tmp_path, model_type)
    output = tmp_path / "export"
    [result] = export(checkpoint, 2, output)
    assert result.num_layers == 3

    exported = AutoModelForCausalLM.from_pretrained(output)
    assert exported.config.num_hidden_layers == 3
    assert exported.config.model_type == model_type
    model, _ = load_balcony(checkpoint)
    input_ids = torch.randint(0, VOCAB, (2, 9))
    torch.testing.assert_close(exported(input_ids).logits, model(input_ids, exit=2).logits, rtol=0, atol=1e-5)
    assert result.parameters < result.full_parameters


def test_export_keeps_tied_embeddings(tmp_path):
    checkpoint = trained_checkpoint(tmp_path, "llama")
    output = tmp_path / "export"
    export(checkpoint, 1, output)
    exported = AutoModelForCausalLM.from_pretrained(output)
    assert exported.config.tie_word_embeddings is True
    assert exported.lm_head.weight.data_ptr() == exported.model.embed_tokens.weight.data_ptr()
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "README.md"):
        assert (output / name).is_file(), name
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((output / "model.safetensors").stat().st_mode) == 0o666 & ~umask


def test_export_loads_without_balcony(tmp_path):
    checkpoint = trained_checkpoint(tmp_path, "llama")
    output = tmp_path / "export"
    export(checkpoint, 2, output)
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(output)!r})\n"
        f"tokenizer = AutoTokenizer.from_pretrained({str(output)!r})\n"
        "ids = tokenizer('a fox', return_tensors='pt').input_ids\n"
        "print(model.generate(ids, max_new_tokens=4, do_sample=False).shape[1] - ids.shape[1])\n"
        "print('balcony_cli' in sys.modules)\n"
    )
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.split() == ["4", "False"]


def test_export_all_exits_into_subfolders(tmp_path):
    checkpoint = trained_checkpoint(tmp_path, "qwen2", exits=(1, 3))
    output = tmp_path / "export"
    results = export(checkpoint, "all", output)
    assert [r.exit for r in results] == [1, 3]
    assert sorted(p.name for p in output.iterdir()) == ["exit-1", "exit-3"]
    assert AutoModelForCausalLM.from_pretrained(output / "exit-3").config.num_hidden_layers == 4
    assert results[1].directory == output / "exit-3"


def test_model_card_states_training(tmp_path):
    checkpoint = trained_checkpoint(tmp_path, "llama")
    output = tmp_path / "export"
    export(checkpoint, 2, output)
    card = (output / "README.md").read_text()
    assert "Balcony exit 2" in card
    assert "| decoder layers | 3 | 4 |" in card
    assert "training tokens: 1234" in card
    assert "Untrained" not in card


def test_untrained_export_warns_in_card(tiny_model_dir, tmp_path):
    checkpoint = tmp_path / "ckpt"
    insert(str(tiny_model_dir), [2], checkpoint)
    output = tmp_path / "export"
    export(checkpoint, 2, output)
    assert "**Untrained.**" in (output / "README.md").read_text()


def test_export_cli_bad_input(tmp_path):
    checkpoint = trained_checkpoint(tmp_path, "llama")
    output = tmp_path / "export"
    result = runner.invoke(app, ["export", "-c", str(checkpoint), "--exit", "3", "-o", str(output)])
    assert result.exit_code == 2
    assert "--exit 3" in result.output
    assert "1,2" in result.output
    assert not output.exists()

    output.mkdir()
    (output / "keep.txt").write_text("keep")
    result = runner.invoke(app, ["export", "-c", str(checkpoint), "--exit", "2", "-o", str(output)])
    assert result.exit_code == 2
    assert "--overwrite" in result.output
    assert [p.name for p in output.iterdir()] == ["keep.txt"]

    result = runner.invoke(app, ["export", "-c", str(checkpoint), "--exit", "2", "-o", str(tmp_path / "x"),
                                 "--format", "onnx"])
    assert result.exit_code == 2
    assert "--format 'onnx'" in result.output


def test_export_cli_json(tmp_path):
    checkpoint = trained_checkpoint(tmp_path, "llama")
    output = tmp_path / "export"
    result = runner.invoke(app, ["export", "-c", str(checkpoint), "--exit", "2", "-o", str(output), "--json", "-"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["exports"][0]["num_layers"] == 3
    assert document["base_fingerprint"].startswith("sha256:")
