"""A recipe checked against the schema: defaults filled in, every problem reported at once."""

import difflib
import math
from typing import Any

from macft.config.schema import DEFAULT_EPOCHS, REQUIRED, SCHEMA, TOP_LEVEL, Key
from macft.errors import RecipeError


def shown(text) -> str:
    """A key or --set item for a one-line error: as written, or quoted if it holds a line
    break or other control characters (and cut short if it is long)."""
    text = str(text)
    text = text if text.isprintable() else repr(text)
    return text if len(text) <= 80 else text[:77] + "..."


def _short(value) -> str:
    """A value for an error line: its repr, cut short (a 10,000-item list is not echoed)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _unknown(prefix: str, key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"did you mean {prefix}{close[0]}?" if close else f"valid keys: {', '.join(known)}"
    return f"{prefix}{key}: unknown key; {hint}"


def _num(x) -> str:
    """A bound or value for an error line: 4294967295 in full, a 400-digit integer cut short."""
    if isinstance(x, int) and len(str(x)) > 20:
        return f"{str(x)[:12]}... ({len(str(x))} digits)"
    return str(x) if isinstance(x, int) or float(x) != int(x) else str(int(x))


def _example(spec: Key) -> str:
    """A value to show in an error: the default, or a bound when there is no default."""
    if isinstance(spec.default, int | float) and not isinstance(spec.default, bool):
        return _num(spec.default)
    return _num(spec.lo if spec.lo is not None else 1)


def _check(dotted: str, spec: Key, value: Any) -> tuple[Any, str | None]:
    """Return (normalised value, problem or None)."""
    kind = spec.kind
    if value is None and kind.startswith("opt_"):
        return None, None
    if kind == "auto_int" and value == "auto":
        return value, None
    if kind in ("int", "opt_int", "auto_int"):
        if isinstance(value, bool) or not isinstance(value, int):
            auto = "'auto' or " if kind == "auto_int" else ""
            return value, f"{dotted}: expected {auto}a whole number, got {_short(value)}"
    elif kind in ("float", "opt_float"):
        if isinstance(value, str):
            # YAML 1.1 reads 2e-4 (no dot) as text; take it as the number it plainly is.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return value, f"{dotted}: expected a number, got {_short(value)}"
        try:
            value = float(value)
        except OverflowError:  # an integer of hundreds of digits
            value = math.inf
        if not math.isfinite(value):
            # NaN slips past every bound (nan < lo is False); inf makes no sense for any key
            return value, (
                f"{dotted}: expected a finite number, got {_short(value)}; write e.g. {_example(spec)}"
            )
    elif kind == "bool":
        if not isinstance(value, bool):
            return value, f"{dotted}: expected true or false, got {_short(value)}"
    elif kind in ("str", "opt_str"):
        if not isinstance(value, str) or not value.strip():
            return value, f"{dotted}: expected a non-empty text, got {_short(value)}"
    elif kind == "choice":
        if value not in spec.choices:
            opts = ", ".join(str(c) for c in spec.choices)
            return value, f"{dotted}: must be one of {opts}, got {_short(value)}"
    elif kind == "targets":
        if isinstance(value, str):
            value = value.strip()
        elif not (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
            return (
                value,
                f"{dotted}: expected attention, mlp, all-linear or a list of module names, got {_short(value)}",
            )
    elif kind == "layers":
        if value != "all" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            return (
                value,
                f"{dotted}: expected 'all' or a number of layers >= 1, got {_short(value)}",
            )
    if spec.lo is not None and isinstance(value, (int, float)) and value < spec.lo:
        bound = "> 0" if 0 < spec.lo < 1e-6 else f">= {_num(spec.lo)}"  # a tiny floor: positive
        return value, f"{dotted}: must be {bound}, got {_num(value)}"
    if spec.hi is not None and isinstance(value, (int, float)) and value > spec.hi:
        return value, f"{dotted}: must be <= {_num(spec.hi)}, got {_num(value)}"
    return value, None


def validate(raw: dict, origin: str) -> dict:
    """Fill defaults and check every key; report every problem at once."""
    problems: list[str] = []
    out: dict[str, Any] = {}
    known_top = [*SCHEMA, *TOP_LEVEL]
    for key in raw:
        if key not in known_top:
            problems.append(_unknown("", shown(key), known_top))
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
                problems.append(_unknown(f"{section}.", shown(key), list(keys)))
        out[section] = {}
        for key, spec in keys.items():
            dotted = f"{section}.{key}"
            if key not in given and spec.default is REQUIRED:
                problems.append(f"{dotted}: missing; pass {spec.flag} or set it in the recipe")
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
    if train.get("method") in ("dpo", "orpo") and train.get("moe_aux_loss"):
        # the aux term is added to a token-weighted loss; a pair's loss is not one
        problems.append(
            f"train.moe_aux_loss: not with train.method: {train['method']}; set it to 0"
        )
    if problems:
        n = len(problems)
        raise RecipeError(f"{origin}: {n} problem{'s' * (n > 1)}: " + "; ".join(problems))
    if train["iters"] is None and train["epochs"] is None:
        train["epochs"] = DEFAULT_EPOCHS
    return out
