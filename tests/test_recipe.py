from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from balcony_cli.errors import BadInputError
from balcony_cli.recipe import Recipe, load_recipe, recipe_from_dict

RECIPES = sorted((Path(__file__).parents[1] / "recipes").rglob("*.yaml"))


def test_recipes_folder_not_empty():
    names = {p.name for p in RECIPES}
    assert {"smollm2-135m-cpu.yaml", "smollm2-135m-quick.yaml", "llama3-8b.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_recipe_loads(path):
    recipe = load_recipe(path)
    assert recipe.exits
    assert recipe.exits == sorted(recipe.exits)


def test_shipped_recipe_values():
    root = Path(__file__).parents[1] / "recipes"
    assert load_recipe(root / "smollm2-135m-cpu.yaml").exits == [10, 15, 20]
    assert load_recipe(root / "smollm2-135m-quick.yaml").exits == [10, 15, 20]
    llama = load_recipe(root / "llama3-8b.yaml")
    assert llama.exits == [15, 18, 21]
    assert llama.seq_len == 4096
    assert llama.lr == 5e-4
    assert llama.warmup_ratio == 0.01


def test_unknown_key_names_closest(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("exits: [1]\nwarmup_ratoi: 0.1\n")
    with pytest.raises(BadInputError, match="'warmup_ratoi'; did you mean 'warmup_ratio'"):
        load_recipe(path)


def test_wrong_type_rejected():
    with pytest.raises(BadInputError, match="max_steps"):
        recipe_from_dict({"max_steps": "ten"})
    with pytest.raises(BadInputError, match="precision"):
        recipe_from_dict({"precision": "fp8"})


def test_invalid_values_all_reported():
    with pytest.raises(BadInputError) as error:
        Recipe(lr=-1.0, seq_len=0)
    assert "lr" in str(error.value)
    assert "seq_len" in str(error.value)


def test_overrides_win_and_roundtrip(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("exits: [2, 1]\nlr: 0.01\nmax_steps: 5\n")
    recipe = load_recipe(path, {"lr": 0.5, "max_steps": None})
    assert recipe.lr == 0.5
    assert recipe.max_steps == 5
    assert recipe.exits == [1, 2]
    again = recipe_from_dict(yaml.safe_load(recipe.to_yaml()))
    assert again == recipe


def test_missing_recipe_file():
    with pytest.raises(BadInputError, match="not found"):
        load_recipe("no-such-recipe.yaml")


def test_synonym_key_suggests_our_name():
    with pytest.raises(BadInputError, match="'learning_rate'; did you mean 'lr'"):
        recipe_from_dict({"learning_rate": 0.1})


def test_study_levers_load_from_yaml(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        "exits: [1, 2]\ninit: fit\nfit_blocks: 8\nhidden_loss_weight: 1\nmax_minutes: 10\neval_at_start: true\n"
        "data_mix:\n  a/books: 1\n  b/stories: 0.5\n"
    )
    recipe = load_recipe(path)
    assert recipe.init == "fit"
    assert recipe.hidden_loss_weight == 1.0
    assert isinstance(recipe.hidden_loss_weight, float)
    assert recipe.max_minutes == 10.0
    assert recipe.data_mix == {"a/books": 1, "b/stories": 0.5}
    assert recipe_from_dict(yaml.safe_load(recipe.to_yaml())) == recipe
    assert load_recipe(path, {"init": "copy-next"}).init == "copy-next"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"data": "a", "data_mix": {"b": 1.0}}, "both set"),
        ({"data_mix": {}}, "data_mix is empty"),
        ({"data_mix": {"b": 0}}, "positive weight"),
        ({"data_mix": {"b": 1.0}, "self_generated_tokens": 100}, "prompts from data"),
        ({"max_minutes": 0.0}, "max_minutes"),
        ({"hidden_loss_weight": -1.0}, "hidden_loss_weight"),
        ({"fit_ridge": 0.0}, "fit_ridge"),
        ({"self_generated_tokens": -5}, "self_generated_tokens"),
        ({"init": "copy-first"}, "copy-next"),
    ],
)
def test_invalid_study_levers_rejected(changes, message):
    with pytest.raises(BadInputError, match=message):
        recipe_from_dict({"exits": [1], **changes})


def test_default_schedule_follows_init():
    default = load_recipe(None)
    assert default.init == "fit"
    assert (default.lr, default.warmup_ratio) == (3e-4, 0.2)
    copy_last = load_recipe(None, {"init": "copy-last"})
    assert (copy_last.lr, copy_last.warmup_ratio) == (1e-2, 0.05)


def test_explicit_schedule_overrides_init_default(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("exits: [1]\ninit: copy-last\nlr: 1.0e-3\n")
    recipe = load_recipe(path)
    assert recipe.lr == 1e-3
    # warmup_ratio was not set, so it still comes from init.
    assert recipe.warmup_ratio == 0.05
    # The saved recipe stores the resolved values, so a resumed run keeps them whatever the defaults.
    saved = recipe.to_dict()
    assert (saved["lr"], saved["warmup_ratio"]) == (1e-3, 0.05)
