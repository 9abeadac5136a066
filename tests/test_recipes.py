"""Recipes: validated with pydantic, misspelt keys get a suggestion, YAML is loaded safely."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgetl.cli.run_cmd import apply_overrides
from edgetl.config import load_recipe, parse_recipe
from edgetl.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_validate(path):
    recipe = load_recipe(path)
    assert recipe.finetune.data
    assert recipe.stages


def _write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_misspelt_key_suggests_the_right_one(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_recipe(_write(tmp_path, "finetune:\n  data: x\n  epochz: 3\n"))
    assert "finetune.epochz" in err.value.one_line() and "'epochs'" in err.value.one_line()


def test_misspelt_section_suggests(tmp_path):
    with pytest.raises(ConfigError, match="'finetune'"):
        load_recipe(_write(tmp_path, "finetun:\n  data: x\n"))


def test_wrong_type_names_key(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_recipe(_write(tmp_path, "finetune:\n  data: x\n  epochs: many\n"))
    assert "finetune.epochs" in err.value.one_line()


def test_missing_data_and_bad_yaml_and_unsafe_tags(tmp_path):
    with pytest.raises(ConfigError, match="finetune.data"):
        load_recipe(_write(tmp_path, "finetune:\n  epochs: 3\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(_write(tmp_path, "finetune: [\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(_write(tmp_path, "finetune: !!python/object/apply:os.system ['echo pwned']\n"))
    with pytest.raises(ConfigError, match="mapping"):
        load_recipe(_write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")


def test_unknown_stage_is_refused():
    with pytest.raises(ConfigError, match="stages"):
        parse_recipe({"stages": ["finetune", "deploy"], "finetune": {"data": "x"}})


def test_overrides_are_typed():
    raw = apply_overrides(
        {"finetune": {"data": "x"}}, ["finetune.epochs=3", "finetune.weights=none", "export.samples=5"]
    )
    recipe = parse_recipe(raw)
    assert recipe.finetune.epochs == 3 and recipe.finetune.weights == "none" and recipe.export.samples == 5
    with pytest.raises(ConfigError):
        apply_overrides({}, ["novalue"])
