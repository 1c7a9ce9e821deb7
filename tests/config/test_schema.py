"""The schema is the one source of every recipe key: README's reference, --help and the
trainer's settings are made from it."""

import re

import yaml
from click.testing import CliRunner
from helpers import ROOT

from macft.cli import cli
from macft.config import schema
from macft.config.validate import validate

README = ROOT / "README.md"


def readme_reference() -> str:
    text = README.read_text(encoding="utf-8")
    blocks = re.findall(r"```yaml\n(model:\n.*?)```", text, re.S)
    assert len(blocks) == 1, "README.md should hold one recipe reference (```yaml model: ...)"
    return blocks[0]


def test_readme_reference_is_the_schema():
    expected = schema.reference_yaml()
    assert readme_reference() == expected, (
        "README.md's recipe reference differs from macft/config/schema.py; replace the block "
        "with the output of: python -c 'from macft.config.schema import reference_yaml; "
        'print(reference_yaml(), end="")\''
    )


def test_reference_is_a_valid_recipe_of_the_defaults():
    recipe = validate(yaml.safe_load(schema.reference_yaml()), "reference")
    for section, keys in schema.SCHEMA.items():
        for name, key in keys.items():
            if key.default is not schema.REQUIRED:
                assert recipe[section][name] == key.default or (
                    section, name) == ("train", "epochs"), (section, name)  # fmt: skip
    assert recipe["train"]["epochs"] == schema.DEFAULT_EPOCHS


def test_section_classes_take_a_validated_recipe():
    recipe = validate({"model": {"path": "m"}, "data": {"path": "d.jsonl"}}, "test")
    for section, cls in schema.SECTIONS.items():
        settings = schema.of(recipe, section)
        assert isinstance(settings, cls)
    assert schema.of(recipe, "train").grad_accumulation == 8
    assert schema.of(recipe, "lora").rank == 16


def test_train_help_lists_every_key():
    result = CliRunner().invoke(cli, ["train", "--help"])
    assert result.exit_code == 0
    for section, keys in schema.SCHEMA.items():
        for name in keys:
            assert f"{section}.{name}=" in result.output, f"{section}.{name}"
