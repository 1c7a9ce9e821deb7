"""Recipe files: the shipped ones, YAML files and --set overrides merged, then validated."""

import difflib
from importlib.resources import files
from pathlib import Path
from typing import Any

import yaml

from macft.config.validate import shown, validate
from macft.errors import DataError, RecipeError


def shipped_recipes() -> dict[str, Path]:
    """The recipes that ship with macft (package data), by name."""
    folder = files("macft") / "recipes"
    found = [p for p in folder.iterdir() if p.name.endswith(".yaml")]
    return {p.name.removesuffix(".yaml"): Path(str(p)) for p in sorted(found, key=lambda p: p.name)}


def find_recipe(name_or_path: str) -> Path:
    p = Path(name_or_path).expanduser()
    if p.is_file():
        return p
    shipped = shipped_recipes()
    stem = Path(name_or_path).name.removesuffix(".yaml")
    if stem in shipped:
        return shipped[stem]
    close = difflib.get_close_matches(stem, list(shipped), n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise RecipeError(
        f"no recipe file {name_or_path}; {hint}pass a path to a .yaml file or the name of one "
        f"of the {len(shipped)} shipped recipes (macft recipes lists them)"
    )


def read_recipe_file(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        why = " ".join(str(getattr(e, "problem", None) or e).split())[:200]  # one line
        raise RecipeError(f"{where}: not valid YAML ({why}); fix the syntax") from None
    except RecursionError:
        raise RecipeError(f"{path}: nested too deeply to be a recipe; fix the file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"{path}: cannot read the recipe ({e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping with sections model, lora, data, train")
    return data


def parse_set(item: str) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"--set {shown(item)}: expected KEY=VALUE, e.g. --set train.iters=200")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except (yaml.YAMLError, RecursionError):
        value = raw
    return key.strip(), value


def apply_override(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RecipeError(f"--set {shown(dotted)}: {shown(part)} is not a section")
    node[parts[-1]] = value


def resolve_data_path(path: str, origin: str) -> str:
    """Paths are relative to where macft runs; shipped recipes may point at shipped examples."""
    p = Path(path).expanduser()
    if p.exists():
        return str(p)
    shipped = Path(str(files("macft").joinpath(*Path(path).parts)))
    if not p.is_absolute() and shipped.exists():
        return str(shipped)
    where = f"{origin}: data.path" if origin != "command line" else "--data"
    raise DataError(
        f"{where}: {path} does not exist; give a .jsonl file or a folder with train.jsonl"
    )


def load_recipe(
    recipe: str | None = None, sets: tuple[str, ...] = (), shorthands: dict | None = None
) -> tuple[dict, str]:
    """Merge a recipe file, shorthands (--model, --data, --out) and --set; return (recipe, origin)."""
    raw: dict = {}
    origin = "command line"
    if recipe:
        path = find_recipe(recipe)
        raw = read_recipe_file(path)
        origin = str(path)
    for dotted, value in (shorthands or {}).items():
        if value is not None:
            apply_override(raw, dotted, value)
    for item in sets:
        apply_override(raw, *parse_set(item))
    return validate(raw, origin), origin


def dump(recipe: dict) -> str:
    return yaml.safe_dump(recipe, sort_keys=False)
