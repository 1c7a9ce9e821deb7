"""Recipe schema, files, --set overrides and validation."""

import pytest

from macft.config.recipes import load_recipe, parse_set, shipped_recipes
from macft.config.schema import DEFAULT_EPOCHS, SCHEMA
from macft.errors import RecipeError

BASE = {"model.path": "m", "data.path": "d.jsonl"}


def problems_of(fn):
    with pytest.raises(RecipeError) as e:
        fn()
    return str(e.value)


def test_defaults_fill_every_key():
    recipe, origin = load_recipe(None, (), BASE)
    assert origin == "command line"
    for section, keys in SCHEMA.items():
        assert set(recipe[section]) == set(keys)
    assert recipe["lora"]["rank"] == 16 and recipe["lora"]["alpha"] == 32.0
    assert recipe["train"]["epochs"] == DEFAULT_EPOCHS  # neither iters nor epochs given


def test_set_parses_yaml_values():
    recipe, _ = load_recipe(
        None,
        ("train.iters=200", "lora.targets=[q_proj, v_proj]", "lora.dora=true", "lora.layers=4"),
        BASE,
    )
    assert recipe["train"]["iters"] == 200 and recipe["train"]["epochs"] is None
    assert recipe["lora"]["targets"] == ["q_proj", "v_proj"]
    assert recipe["lora"]["dora"] is True and recipe["lora"]["layers"] == 4


def test_set_needs_key_value():
    assert "expected KEY=VALUE" in problems_of(lambda: parse_set("train.iters"))


def test_every_problem_reported_at_once(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text(
        "model: {path: m, bits: 5}\n"
        "lora: {rnak: 8, rank: -1, alpha: 0, targets: 7}\n"
        "data: {path: d}\n"
        "train: {iters: ten, shedule: cosine, learning_rate: 2e-4}\n"
        "extra: 1\n"
    )
    msg = problems_of(lambda: load_recipe(str(f)))
    assert msg.startswith(f"{f}: 7 problems: ")
    for needle in (
        "lora.rnak: unknown key; did you mean lora.rank?",
        "lora.rank: must be >= 1, got -1",
        "lora.alpha: must be > 0, got 0",
        "lora.targets: expected attention, mlp, all-linear",
        "train.iters: expected a whole number, got 'ten'",
        "train.shedule: unknown key; did you mean train.schedule?",
        "extra: unknown key",
    ):
        assert needle in msg
    assert "\n" not in msg
    # 2e-4 is text to YAML 1.1; it must be accepted as the number it is
    assert "learning_rate" not in msg


def test_missing_required_names_the_flag():
    msg = problems_of(lambda: load_recipe(None, (), {"model.path": "m"}))
    assert "data.path: missing; pass --data FILE" in msg


def test_iters_and_epochs_exclusive():
    msg = problems_of(lambda: load_recipe(None, ("train.iters=5", "train.epochs=1"), BASE))
    assert "set one of them, not both" in msg


def test_bad_yaml_names_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("model:\n  path: m\n lora: [\n")
    msg = problems_of(lambda: load_recipe(str(f)))
    assert f"{f}:" in msg and "not valid YAML" in msg


def test_unknown_recipe_suggests_close_names():
    msg = problems_of(lambda: load_recipe("smollm2-135m-nett"))
    assert "did you mean smollm2-135m-net" in msg and "macft recipes" in msg
    msg = problems_of(lambda: load_recipe("no-such-thing"))
    assert "did you mean" not in msg and f"{len(shipped_recipes())} shipped recipes" in msg


@pytest.mark.parametrize("name", sorted(shipped_recipes()))
def test_shipped_recipes_validate(name):
    recipe, origin = load_recipe(name)
    assert origin.endswith(f"{name}.yaml")
    assert recipe["model"]["path"] and recipe["data"]["path"]


def test_shorthands_override_file(tmp_path):
    recipe, _ = load_recipe("smollm2-135m-net", (), {"data.path": "x.jsonl", "out": "runs/x"})
    assert recipe["data"]["path"] == "x.jsonl" and recipe["out"] == "runs/x"
