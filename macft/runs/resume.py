"""What `macft train --resume` may change in a run.

Nothing its adapters depend on (the model and lora sections: refused always), and, unless
--force, nothing that changes the data order or the result: the data files' contents and the
keys config/schema.py marks `same_on_resume` (the split, the batch, the seed, the schedule's
shape...). Where the run ends (train.iters, train.epochs) and how each step is computed
(packing, compile, checkpointing, how often to evaluate or save) may change.
"""

from macft.config.schema import FIXED_ON_RESUME, SCHEMA
from macft.errors import RunError

DATA_CHANGED = "the data (its files' contents)"


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 24 else text[:21] + "..."


def fixed_changes(saved: dict, recipe: dict) -> list[str]:
    """The model and lora keys that differ: the checkpoint's adapters would not fit them."""
    return [
        f"{sec}.{k}"
        for sec in FIXED_ON_RESUME
        for k in sorted(set(saved.get(sec, {})) | set(recipe.get(sec, {})))
        if saved.get(sec, {}).get(k) != recipe.get(sec, {}).get(k)
    ]


def result_changes(saved: dict, recipe: dict, saved_digest, digest) -> list[str]:
    """The data and the settings that differ and would change the order or the result."""
    out = [DATA_CHANGED] if saved_digest and digest and saved_digest != digest else []
    for sec, keys in SCHEMA.items():
        for name, key in keys.items():
            if key.same_on_resume:
                # a key a run's recipe lacks (written by an older macft) had its default
                old = saved.get(sec, {}).get(name, key.default)
                new = recipe.get(sec, {}).get(name, key.default)
                if old != new:
                    out.append(f"{sec}.{name} ({_short(old)} -> {_short(new)})")
    return out


def check(path, saved: dict, recipe: dict, saved_digest, digest, force: bool) -> None:
    """Refuse a resume with changed settings (see the module's docstring)."""
    if not saved:
        return  # no recipe.yaml to compare with (adapters from elsewhere)
    fixed = fixed_changes(saved, recipe)
    if fixed:
        raise RunError(
            f"{path}: cannot resume with changed {', '.join(fixed)}; "
            "keep the run's recipe.yaml settings, or start a new run with another --out"
        )
    changed = result_changes(saved, recipe, saved_digest, digest)
    if changed and not force:
        raise RunError(
            f"{path}: cannot resume: {', '.join(changed)} changed since the run started, which "
            "changes the data order or the results; keep the run's settings (its recipe.yaml), "
            "add --force to resume with the changes anyway, or start a new run with another --out"
        )
