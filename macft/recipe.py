"""Recipes: the schema of every key, YAML files and --set overrides, and validation of it all."""

import difflib
import importlib.resources
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from macft.errors import RecipeError

REQUIRED = object()
COMPUTE = ("auto", "quantized", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Key:
    default: Any
    kind: str  # int, float, bool, str, choice, targets, layers, opt_int, opt_float, opt_str
    lo: float | None = None
    hi: float | None = None
    choices: tuple = ()
    help: str = ""


# Defaults are chosen so an 8B model trains on a 24 GB Mac: batch 1 with accumulation,
# gradient checkpointing, rank 16 on all linear layers.
SCHEMA: dict[str, dict[str, Key]] = {
    "model": {
        "path": Key(
            REQUIRED, "str", help="HF/MLX folder, GGUF file, or an alias like smollm2-135m"
        ),
        "bits": Key(4, "choice", choices=(2, 3, 4, 5, 6, 8), help="bits of the quantized base"),
        "group_size": Key(64, "choice", choices=(32, 64, 128), help="quantization group size"),
        "compute": Key(
            "auto", "choice", choices=COMPUTE, help="auto: 4-bit on Metal, float32 on CPU"
        ),
    },
    "lora": {
        "rank": Key(16, "int", lo=1, hi=1024),
        "alpha": Key(32.0, "float", lo=1e-9, help="scale = alpha / rank, as in PEFT"),
        "dropout": Key(0.05, "float", lo=0.0, hi=0.9),
        "targets": Key(
            "all-linear",
            "targets",
            help="attention, mlp, all-linear, or names; MoE models also: experts, shared-expert",
        ),
        "layers": Key("all", "layers", help="'all' or the number of last layers"),
        "dora": Key(False, "bool"),
        "router": Key(False, "bool", help="MoE: train the routers too (LoRA on each gate)"),
    },
    "data": {
        "path": Key(REQUIRED, "str", help="a .jsonl file or a folder with train.jsonl"),
        "max_seq_length": Key(2048, "int", lo=8, hi=1 << 20),
        "valid_fraction": Key(0.1, "float", lo=0.0, hi=0.5),
        "system": Key(None, "opt_str", help="system prompt for chat data without one"),
    },
    "train": {
        "iters": Key(None, "opt_int", lo=1, help="optimizer steps (or set epochs)"),
        "epochs": Key(None, "opt_float", lo=0.01, help="passes over the data (default 2)"),
        "batch_size": Key(1, "int", lo=1, hi=4096),
        "grad_accumulation": Key(8, "int", lo=1, hi=4096),
        "learning_rate": Key(2e-4, "float", lo=1e-9, hi=1.0),
        "warmup": Key(10, "int", lo=0),
        "schedule": Key("cosine", "choice", choices=("cosine", "constant")),
        "min_lr_ratio": Key(0.1, "float", lo=0.0, hi=1.0),
        "weight_decay": Key(0.0, "float", lo=0.0, hi=1.0),
        "max_grad_norm": Key(1.0, "float", lo=0.0),
        "eval_every": Key(50, "int", lo=0),
        "eval_batches": Key(0, "int", lo=0, help="0 = the whole validation set"),
        "save_every": Key(100, "int", lo=0),
        "grad_checkpoint": Key(True, "bool"),
        "seed": Key(0, "int", lo=0),
        "early_stopping": Key(0, "int", lo=0, help="evals without improvement; 0 = off"),
        "report_every": Key(5, "int", lo=1),
        "pack": Key(True, "bool", help="several examples per row; positions restart per example"),
        "loss_chunk": Key(
            64, "int", lo=0, help="LM head + loss on target positions only, N at a time; 0 = off"
        ),
        "compile": Key(True, "bool", help="one compiled graph per batch shape (faster)"),
        "moe_aux_loss": Key(
            0.0, "float", lo=0.0, hi=1.0, help="MoE load-balancing loss weight; 0 = off"
        ),
    },
}
TOP_LEVEL = {"out": Key(None, "opt_str", help="run folder (default runs/<data name>)")}
DEFAULT_EPOCHS = 2.0


def recipes_dir() -> Path:
    return Path(str(importlib.resources.files("macft") / "recipes"))


def shipped_recipes() -> dict[str, Path]:
    return {p.stem: p for p in sorted(recipes_dir().glob("*.yaml"))}


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
        raise RecipeError(
            f"{where}: not valid YAML ({getattr(e, 'problem', e)}); fix the syntax"
        ) from None
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
        raise RecipeError(f"--set {item}: expected KEY=VALUE, e.g. --set train.iters=200")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def apply_override(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RecipeError(f"--set {dotted}: {part} is not a section")
    node[parts[-1]] = value


def _unknown(prefix: str, key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"did you mean {prefix}{close[0]}?" if close else f"valid keys: {', '.join(known)}"
    return f"{prefix}{key}: unknown key; {hint}"


def _check(dotted: str, spec: Key, value: Any) -> tuple[Any, str | None]:
    """Return (normalised value, problem or None)."""
    kind = spec.kind
    if value is None and kind.startswith("opt_"):
        return None, None
    if kind in ("int", "opt_int"):
        if isinstance(value, bool) or not isinstance(value, int):
            return value, f"{dotted}: expected a whole number, got {value!r}"
    elif kind in ("float", "opt_float"):
        if isinstance(value, str):
            # YAML 1.1 reads 2e-4 (no dot) as text; take it as the number it plainly is.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return value, f"{dotted}: expected a number, got {value!r}"
        value = float(value)
    elif kind == "bool":
        if not isinstance(value, bool):
            return value, f"{dotted}: expected true or false, got {value!r}"
    elif kind in ("str", "opt_str"):
        if not isinstance(value, str) or not value.strip():
            return value, f"{dotted}: expected a non-empty text, got {value!r}"
    elif kind == "choice":
        if value not in spec.choices:
            opts = ", ".join(str(c) for c in spec.choices)
            return value, f"{dotted}: must be one of {opts}, got {value!r}"
    elif kind == "targets":
        if isinstance(value, str):
            value = value.strip()
        elif not (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
            return (
                value,
                f"{dotted}: expected attention, mlp, all-linear or a list of module names, got {value!r}",
            )
    elif kind == "layers":
        if value != "all" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            return value, f"{dotted}: expected 'all' or a number of layers >= 1, got {value!r}"
    if spec.lo is not None and isinstance(value, (int, float)) and value < spec.lo:
        bound = "> 0" if 0 < spec.lo < 1e-6 else f">= {spec.lo:g}"  # a tiny floor means "positive"
        return value, f"{dotted}: must be {bound}, got {value!r}"
    if spec.hi is not None and isinstance(value, (int, float)) and value > spec.hi:
        return value, f"{dotted}: must be <= {spec.hi:g}, got {value!r}"
    return value, None


def validate(raw: dict, origin: str) -> dict:
    """Fill defaults and check every key; report every problem at once."""
    problems: list[str] = []
    out: dict[str, Any] = {}
    known_top = [*SCHEMA, *TOP_LEVEL]
    for key in raw:
        if key not in known_top:
            problems.append(_unknown("", str(key), known_top))
    for key, spec in TOP_LEVEL.items():
        out[key], problem = _check(key, spec, raw.get(key, spec.default))
        problems += [problem] if problem else []
    for section, keys in SCHEMA.items():
        given = raw.get(section) or {}
        if not isinstance(given, dict):
            problems.append(f"{section}: expected a section of keys, got {given!r}")
            given = {}
        for key in given:
            if key not in keys:
                problems.append(_unknown(f"{section}.", str(key), list(keys)))
        out[section] = {}
        for key, spec in keys.items():
            dotted = f"{section}.{key}"
            if key not in given and spec.default is REQUIRED:
                flag = {"model.path": "--model PATH", "data.path": "--data FILE"}.get(dotted)
                problems.append(f"{dotted}: missing; pass {flag} or set it in the recipe")
                continue
            value, problem = _check(dotted, spec, given.get(key, spec.default))
            out[section][key] = value
            problems += [problem] if problem else []
    train = out["train"]
    if train.get("iters") is not None and train.get("epochs") is not None:
        problems.append("train.iters and train.epochs: set one of them, not both")
    if isinstance(train.get("moe_aux_loss"), float) and train["moe_aux_loss"] > 0:
        if out["lora"].get("router") is not True:
            problems.append(
                "train.moe_aux_loss: the load-balancing loss trains the router, which is frozen; "
                "set lora.router: true, or train.moe_aux_loss: 0"
            )
    if problems:
        n = len(problems)
        raise RecipeError(f"{origin}: {n} problem{'s' * (n > 1)}: " + "; ".join(problems))
    if train["iters"] is None and train["epochs"] is None:
        train["epochs"] = DEFAULT_EPOCHS
    return out


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
