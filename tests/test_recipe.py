from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from llmquant.recipe import RecipeError, load_recipe

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


@pytest.mark.parametrize("name", sorted(p.name for p in RECIPES.glob("*.yaml")))
def test_committed_recipes_validate(name):
    recipe = load_recipe(RECIPES / name)
    assert recipe.name


def test_w4_recipe_turns_awq_on_and_rtn_off():
    assert load_recipe(RECIPES / "llama_w4.yaml").awq.enabled
    assert not load_recipe(RECIPES / "llama_w4_rtn.yaml").awq.enabled


def test_unknown_key_names_its_path(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("quant:\n  bitz: 4\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert "quant.bitz" in str(err.value) and str(path) in str(err.value)


def test_wrong_type_names_key_and_value(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("quant:\n  bits: four\n")
    with pytest.raises(RecipeError, match=r"quant\.bits.*'four'"):
        load_recipe(path)


@pytest.mark.parametrize("bits", [1, 9])
def test_bits_out_of_range(tmp_path, bits):
    path = tmp_path / "r.yaml"
    path.write_text(f"quant:\n  bits: {bits}\n")
    with pytest.raises(RecipeError, match=r"quant\.bits"):
        load_recipe(path)


def test_set_overrides_nested_keys():
    recipe = load_recipe(
        RECIPES / "llama_w4.yaml",
        ["quant.bits=8", "quant.symmetric=true", "quant.ignore=[lm_head, down_proj]"],
    )
    assert recipe.quant.bits == 8 and recipe.quant.symmetric
    assert recipe.quant.ignore == ["lm_head", "down_proj"]


def test_set_unknown_key_fails():
    with pytest.raises(RecipeError, match="awq.n_grids"):
        load_recipe(RECIPES / "llama_w4.yaml", ["awq.n_grids=3"])


def test_missing_file():
    with pytest.raises(RecipeError, match="not found"):
        load_recipe("does/not/exist.yaml")


def test_recipe_is_frozen():
    recipe = load_recipe(None)
    with pytest.raises(ValidationError):
        recipe.quant.bits = 3
