"""`balcony study` end to end on a tiny model, and `balcony plot-kl` on its runs."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from typer.testing import CliRunner

from balcony_cli.cli import app
from balcony_cli.errors import BadInputError
from balcony_cli.plots import read_validation_curves
from balcony_cli.study import load_study

runner = CliRunner()

SENTENCES = [f"The {i}th fox jumps over {i % 7} lazy dogs near river {i % 5}." for i in range(40)]


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


@pytest.fixture
def data_dir(tmp_path, corpus_dir):
    """A folder laid out like the shared data folder: the study's tasks, WikiText-2, a book, a corpus."""
    root = tmp_path / "data"
    write_jsonl(root / "hellaswag/hellaswag_val.jsonl", [
        {"idx": i, "activity_label": "Foxes", "ctx": f"The {i}th fox", "label": i % 4,
         "endings": ["jumps over dogs.", "eats a cake.", "sings loudly.", "runs to river."]} for i in range(4)])
    write_jsonl(root / "arc/arc_easy_test.jsonl", [
        {"query": f"Question: What does fox {i} jump over?", "choices": ["dogs", "cats", "trees", "rivers"],
         "gold": i % 4} for i in range(4)])
    (root / "wikitext2_raw").mkdir()
    (root / "wikitext2_raw/wiki.test.raw").write_text("\r\n".join(SENTENCES))
    (root / "gutenberg/books").mkdir(parents=True)
    (root / "gutenberg/books/a_book.txt").write_text(" ".join(SENTENCES[::-1]))
    shutil.copytree(corpus_dir, root / "corpus")
    return root


@pytest.fixture
def study_file(tmp_path, tiny_model_dir):
    recipe = tmp_path / "base.yaml"
    recipe.write_text(yaml.safe_dump({
        "exits": [1, 3], "init": "copy-last", "precision": "fp32",
        "data": "${BALCONY_DATA_DIR}/corpus", "seq_len": 32, "batch_size": 2, "max_steps": 3,
        "lr": 1e-2, "loss_chunk_tokens": 16, "val_blocks": 2, "eval_every": 1, "eval_at_start": True,
        "save_every": 0, "log_every": 1,
    }))
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({
        "model": str(tiny_model_dir),
        "budget_minutes": 0.5,
        "recipe": str(recipe),
        "output": str(tmp_path / "runs"),
        "table": str(tmp_path / "tables" / "tiny-study"),
        "eval": {"tasks": ["hellaswag", "arc_easy"], "limit": 3, "baselines": ["prune"], "ppl_tokens": 200,
                 "ppl_window": 50, "batch_size": 2},
        "rows": [{"name": "copy-last"}, {"name": "fit", "overrides": {"init": "fit", "fit_blocks": 4}}],
    }))
    return path


def test_two_row_study_end_to_end(study_file, data_dir, tmp_path):
    result = runner.invoke(app, ["study", str(study_file), "--data-dir", str(data_dir)])
    assert result.exit_code == 0, result.output
    tables = tmp_path / "tables"
    document = json.loads((tables / "tiny-study.json").read_text())
    assert document["schema_version"] == 1
    assert document["base_fingerprint"].startswith("sha256:")
    assert [row["name"] for row in document["rows"]] == ["copy-last", "fit"]
    for row in document["rows"]:
        assert row["recipe"]["max_minutes"] == 0.5
        assert row["recipe"]["data"] == "${BALCONY_DATA_DIR}/corpus"
        assert row["train"]["train_tokens"] == row["train"]["steps"] * 2 * 32
        assert row["train"]["train_tokens_per_s"] > 0
        assert [exit_row["k"] for exit_row in row["exits"]] == [1, 3]
        for exit_row in row["exits"]:
            assert exit_row["tasks"]["hellaswag"]["metric"] == "acc_norm"
            assert exit_row["tasks"]["hellaswag"]["samples"] == 3
            assert exit_row["tasks"]["arc_easy"]["stderr"] is not None
            # Every harness metric is kept, so ARC-Easy's acc_norm can be set against its acc.
            assert set(exit_row["tasks"]["arc_easy"]["metrics"]) >= {"acc", "acc_stderr", "acc_norm"}
            choices = exit_row["tasks"]["arc_easy"]["choices"]
            assert choices["items"] == 3
            # The tiny data's gold answers are "dogs", "cats", "trees": two of three are shortest.
            assert choices["shortest_gold_rate"] == pytest.approx(2 / 3)
            assert 0 < choices["choice_entropy"] <= 1.3863
            assert exit_row["perplexity"] > 1
    assert document["rows"][0]["train"]["preparation_seconds"] == 0
    assert document["rows"][1]["train"]["preparation"]["init_fit"]["seconds"] > 0
    assert [row["name"] for row in document["reference"]["rows"]] == ["full", "pruned 1", "pruned 3"]
    # Each run's recipe has the data folder written out, so the run can be resumed without the variable.
    saved = yaml.safe_load((tmp_path / "runs/fit/run/recipe.yaml").read_text())
    assert saved["data"] == str(data_dir / "corpus")

    markdown = (tables / "tiny-study.md").read_text()
    assert "| copy-last | 1 |" in markdown
    assert "| fit | 1 |" in markdown
    assert "| full (reference) | 4 layers |" in markdown
    assert "| pruned 3 (reference) | 4 layers |" in markdown
    assert "HellaSwag acc_norm" in markdown
    assert "ARC-Easy shortest picked / choice entropy" in markdown
    assert "the right answer is a shortest one in 0.67 of items" in markdown
    assert (tmp_path / "runs/validation-kl.png").read_bytes()[:4] == b"\x89PNG"

    curves = read_validation_curves(tmp_path / "runs/fit/run")
    assert curves[1][0][0] == 0
    assert len(curves[1]) == document["rows"][1]["train"]["steps"] + 1

    # A second start reuses both rows.
    stamp = (tmp_path / "runs/fit/result.json").stat().st_mtime_ns
    again = runner.invoke(app, ["study", str(study_file), "--data-dir", str(data_dir)])
    assert again.exit_code == 0, again.output
    assert "Reused stored results for copy-last, fit" in again.output
    assert (tmp_path / "runs/fit/result.json").stat().st_mtime_ns == stamp

    # Without the run folders, the committed table still carries the finished rows.
    shutil.rmtree(tmp_path / "runs")
    from_table = runner.invoke(app, ["study", str(study_file), "--data-dir", str(data_dir)])
    assert from_table.exit_code == 0, from_table.output
    assert "Reused stored results for copy-last, fit" in from_table.output
    assert not (tmp_path / "runs/fit").exists()
    assert [row["name"] for row in json.loads((tables / "tiny-study.json").read_text())["rows"]] == ["copy-last", "fit"]


def test_changed_row_recipe_rejected(study_file, data_dir, tmp_path):
    result = runner.invoke(app, ["study", str(study_file), "--data-dir", str(data_dir), "--rows", "copy-last"])
    assert result.exit_code == 0, result.output
    document = yaml.safe_load(study_file.read_text())
    document["rows"][0]["overrides"] = {"lr": 0.5}
    study_file.write_text(yaml.safe_dump(document))
    changed = runner.invoke(app, ["study", str(study_file), "--data-dir", str(data_dir), "--rows", "copy-last"])
    assert changed.exit_code == 2
    assert "contains the result of a different recipe" in changed.output

    runs = tmp_path / "runs" / "copy-last" / "run"
    plot = tmp_path / "curves.png"
    plotted = runner.invoke(app, ["plot-kl", f"baseline={runs}", "-o", str(plot)])
    assert plotted.exit_code == 0, plotted.output
    assert plot.read_bytes()[:4] == b"\x89PNG"
    assert "exits 1, 3" in plotted.output


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"rows": [{"name": "a"}, {"name": "a"}]}, "used twice"),
        ({"rows": [{"name": "a b"}]}, "letters, digits"),
        ({"budget_minute": 3}, "did you mean 'budget_minutes'"),
        ({"rows": [{"name": "a", "overrides": {"exits": [2]}}, {"name": "b"}]}, "same exits"),
        ({"rows": [{"name": "a", "overrides": {"lr": -1.0}}]}, "study row 'a'"),
        ({"eval": {"limt": 3}}, "did you mean 'limit'"),
    ],
)
def test_bad_study_file_rejected(study_file, change, message):
    document = {**yaml.safe_load(study_file.read_text()), **change}
    study_file.write_text(yaml.safe_dump(document))
    with pytest.raises(BadInputError, match=message):
        load_study(study_file)


def test_shipped_study_loads():
    from pathlib import Path

    root = Path(__file__).parents[1]
    study = load_study(root / "studies" / "exit-learning.yaml")
    assert len(study.rows) >= 6
    assert study.budget_minutes == 10
    assert study.eval.limit == 300
    assert study.eval.tasks == ["hellaswag", "arc_easy"]
    assert study.eval.baselines == ["prune"]
