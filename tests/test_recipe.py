"""Recipe schema: validation errors name the field and help fix it; overrides; flattening."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from qlora.tasks.recipe import RecipeError, flatten, load_recipe, recipe_from_dict

REPO = Path(__file__).resolve().parent.parent
MINIMAL = {"name": "t", "model": {"name_or_path": "m"}, "data": {"path": "d.csv"}}


def _error(raw: dict) -> RecipeError:
    with pytest.raises(RecipeError) as e:
        recipe_from_dict(raw, "r.yaml")
    return e.value


def test_every_shipped_recipe_validates():
    for path in sorted((REPO / "recipes").glob("*.yaml")):
        recipe = load_recipe(path)
        assert recipe.name == path.stem
        assert path.read_text().startswith("#"), f"{path.name} should open with a comment saying what it does"


def test_defaults_are_qlora():
    r = recipe_from_dict(MINIMAL)
    assert r.quantization.mode == "4bit" and r.quantization.bnb_4bit_quant_type == "nf4"
    assert r.quantization.bnb_4bit_use_double_quant and r.lora.target_modules == "all-linear"
    assert r.tokenize.padding == "dynamic"


def test_unknown_key_suggests_the_right_one():
    e = _error({**MINIMAL, "lora": {"rr": 8}})
    assert e.field == "lora.rr" and "did you mean 'r'" in str(e) and e.file == "r.yaml"
    e = _error({**MINIMAL, "trian": {}})
    assert e.field == "trian" and "did you mean 'train'" in str(e)
    e = _error({**MINIMAL, "train": {"learning_rat": 1e-3}})
    assert "did you mean 'learning_rate'" in str(e)


def test_wrong_type_names_field_and_value():
    e = _error({**MINIMAL, "train": {"per_device_train_batch_size": "big"}})
    assert e.field == "train.per_device_train_batch_size" and "'big'" in str(e)


def test_missing_required_section():
    e = _error({"name": "t", "data": {"path": "d.csv"}})
    assert e.field == "model" and "missing" in str(e)


def test_data_needs_exactly_one_source():
    assert "exactly one" in str(_error({**MINIMAL, "data": {"path": "a", "hub": "b"}}))
    assert "exactly one" in str(_error({**MINIMAL, "data": {}}))


def test_4bit_and_8bit_are_exclusive():
    e = _error({**MINIMAL, "quantization": {"load_in_8bit": True}})
    assert e.field == "quantization" and "exclusive" in str(e)


def test_empty_target_modules_and_bad_sample():
    assert _error({**MINIMAL, "lora": {"target_modules": []}}).field == "lora.target_modules"
    assert _error({**MINIMAL, "data": {"path": "x", "sample": {"train": 0}}}).field == "data.sample"


def test_set_overrides_any_field_with_yaml_values(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    r = load_recipe(path, ["train.learning_rate=1e-3", "lora.target_modules=[query, value]",
                           "quantization.load_in_4bit=false", "data.sample.train=100"])
    assert r.train.learning_rate == 1e-3 and r.lora.target_modules == ["query", "value"]
    assert r.quantization.mode == "none" and r.data.sample == {"train": 100}
    with pytest.raises(RecipeError, match="KEY=VALUE"):
        load_recipe(path, ["train.learning_rate"])
    with pytest.raises(RecipeError, match="did you mean 'learning_rate'"):
        load_recipe(path, ["train.learnin_rate=1"])


def test_bad_files(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)
    bad.write_text("- a list")
    with pytest.raises(RecipeError, match="mapping"):
        load_recipe(bad)


def test_flatten_is_dotted_and_complete():
    flat = flatten(recipe_from_dict({**MINIMAL, "description": "x" * 10_000}))
    assert flat["lora.r"] == "8" and flat["model.name_or_path"] == "m" and flat["data.hub"] == "null"
    assert len(flat["description"]) == 10_000  # truncation for MLflow happens where it is logged


def test_every_recipe_field_has_its_description_under_it():
    """Each field's docstring is its description (read from the source, not at import): a field
    without one, or one the reader misses, would be a blank row in the reference."""
    from pydantic import BaseModel

    from qlora.tasks.recipe import ModelSection, Recipe, Section, field_descriptions

    def undocumented(model, prefix=""):
        docs = field_descriptions(model)
        for name, field in model.model_fields.items():
            if not docs.get(name, "").strip():
                yield prefix + name
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                yield from undocumented(field.annotation, f"{prefix}{name}.")

    assert list(undocumented(Recipe)) == []
    assert field_descriptions(ModelSection)["name_or_path"].startswith("A Hub id, a local directory")
    assert field_descriptions(Section) == {}


def test_the_recipe_reference_page_is_the_generated_one():
    """The recipe reference page is generated from the schema: every field, its type, default and
    description. A field added or changed without `python scripts/recipe_reference.py --write` fails."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "scripts" / "recipe_reference.py"
    spec = importlib.util.spec_from_file_location("recipe_reference", path)
    reference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reference)
    copy = reference.page_copy(reference.PAGE.read_text())
    assert copy is not None, "docs/recipe-reference.md lost its recipe reference markers"
    assert copy == reference.reference(), "the recipe reference is stale: python scripts/recipe_reference.py --write"
    for field in ("merge.compare", "quantization.llm_int8_skip_modules", "train.max_memory_gib",
                  "tracking.promotion.metric"):
        assert f"| `{field}` |" in copy
    from qlora.tasks.recipe import QuantizationSection, field_descriptions
    from qlora.tasks.training.loading import NOT_QUANTIZED

    skip = field_descriptions(QuantizationSection)["llm_int8_skip_modules"]
    assert all(name in skip for name in NOT_QUANTIZED), skip
    documented = copy.count("\n| `")
    assert documented >= 80, documented
