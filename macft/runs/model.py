"""A run's model to generate with: its base with its adapters (which ones, which settings), or a
base alone. chat, eval and fuse load through here."""

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from macft.config.schema import LoraConfig
from macft.errors import MacftError, ModelError, RunError
from macft.lora.apply import apply_lora, load_adapter_weights
from macft.models import ALIASES, load_base
from macft.runs.folder import CHECKPOINT_RE, RunDir


@dataclass
class RunModel:
    model: nn.Module
    tokenizer: object
    base_path: str  # what load_base was given
    adapters: Path | None = None  # the adapters.safetensors file, when a run was loaded
    system: str | None = None  # the run's data.system
    notes: list[str] = field(default_factory=list)  # things the user should be told
    config: dict = field(default_factory=dict)  # the base's config.json
    source: dict = field(default_factory=dict)  # where the base came from (base.json)


def _listing(folder: Path) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    return ", ".join(names[:10]) + (", ..." if len(names) > 10 else "") or "nothing"


def _train_hint(path: Path) -> str:
    return f"train one with: macft train --model MODEL --data FILE --out {path}"


def pick_adapters(run: RunDir, checkpoint: str | None) -> tuple[Path, str | None]:
    """The adapters file of a run (root, best or step-N) and a note when it was not asked for."""
    if checkpoint is None:
        if run.adapters_path.is_file():
            return run.adapters_path, None
        latest = run.latest_checkpoint()
        if latest is None:
            raise RunError(
                f"{run.path}: no adapters yet (no adapters.safetensors, no checkpoints); "
                f"continue the run with: macft train --resume --out {run.path}"
            )
        note = f"{run.path} has no adapters.safetensors (unfinished run?): using {latest.name}"
        return latest / "adapters.safetensors", note
    m = CHECKPOINT_RE.match(checkpoint) or CHECKPOINT_RE.match(f"step-{checkpoint}")
    folder = run.best if checkpoint == "best" else m and run.checkpoints / f"step-{int(m[1]):06d}"
    if folder is None or not (folder / "adapters.safetensors").is_file():
        found = [p.name for p in run.list_checkpoints()] + (["best"] if run.best else [])
        available = ", ".join(found) or "none"
        raise RunError(
            f"{run.path}: no checkpoint {checkpoint!r} (available: {available}); "
            "use --checkpoint best, --checkpoint step-N, or leave it out for the final adapters"
        )
    return folder / "adapters.safetensors", None


def _lora_settings(run: RunDir) -> tuple[dict, dict, str]:
    """(model section, lora settings, where they came from): recipe.yaml, else adapter_config.json."""
    if run.recipe_path.is_file():
        recipe = run.recipe()
        lo = recipe.get("lora", {})
        names = [f.name for f in fields(LoraConfig)]
        return recipe.get("model", {}), {k: lo[k] for k in names if k in lo}, str(run.recipe_path)
    if not run.config_path.is_file():
        return {}, {}, ""
    try:
        cfg = json.loads(run.config_path.read_text(encoding="utf-8"))  # e.g. mlx-lm's adapters
        if not isinstance(cfg, dict):
            raise ValueError("not a JSON object")
    except (ValueError, OSError, RecursionError) as e:
        why = str(e)[:200] if not isinstance(e, RecursionError) else "nested too deeply"
        raise RunError(
            f"{run.config_path}: not readable JSON ({why}); fix it, or copy the "
            "adapter_config.json written with these adapters"
        ) from None
    p, layers = cfg.get("lora_parameters", {}), cfg.get("num_layers")
    lora = {
        "rank": p.get("rank", 8),
        "alpha": p.get("scale", 20.0) * p.get("rank", 8),
        "targets": p.get("keys") or "all-linear",
        "layers": layers if isinstance(layers, int) and layers > 0 else "all",
        "dora": cfg.get("fine_tune_type") == "dora",
    }
    return {}, lora, str(run.config_path)


def load_run_base(path: str, model_cfg: dict, origin: str | None):
    kw = {k: model_cfg[k] for k in ("bits", "group_size", "compute") if k in model_cfg}
    try:
        return load_base(path, **kw)
    except ModelError as e:
        if origin is None:
            raise
        raise ModelError(
            f"{origin}: model.path {path} is not available: {e}. "
            f"Fix it, or point at a copy of that base: macft chat {Path(origin).parent} --model PATH"
        ) from None


def load_run_model(
    target: str | None, model: str | None = None, checkpoint: str | None = None, base_loader=None
) -> RunModel:
    """A run folder (base + adapters), a model (folder, GGUF, alias), or --model alone.

    base_loader(path, model section, origin) -> Base replaces how a run's base loads (fuse).
    """
    if target is None:
        if model is None:
            raise MacftError(
                "nothing to chat with; give a run folder (macft chat runs/NAME) "
                "or a model (macft chat --model smollm2-135m)"
            )
        target, model = model, None
    p = Path(target).expanduser()
    run = RunDir(p)
    if p.is_dir() and (run.holds_run() or run.config_path.is_file()):
        return _load_run(run, model, checkpoint, base_loader or load_run_base)
    if checkpoint is not None:
        raise RunError(f"--checkpoint needs a run folder; {target} is not one")
    if model is not None:
        raise MacftError(
            f"{target} is a model, not a run folder; give one of them (--model is for a run "
            "whose recipe.yaml points at a base that moved)"
        )
    if p.is_file() or (p.is_dir() and (p / "config.json").is_file()):
        base = load_base(str(p))
    elif target.strip().lower() in ALIASES:
        base = load_base(target)
    elif p.is_dir():
        raise RunError(
            f"{p} holds no run (no recipe.yaml, adapters or checkpoints) and no model "
            f"(no config.json); it has: {_listing(p)}. {_train_hint(p)}"
        )
    else:
        parent = next((a for a in p.parents if a.is_dir()), Path("."))
        raise RunError(
            f"{p} does not exist ({parent} holds: {_listing(parent)}); give a run folder, "
            f"a model folder, a .gguf file or an alias ({', '.join(ALIASES)}); or {_train_hint(p)}"
        )
    base.model.eval()
    return RunModel(base.model, base.tokenizer, str(target), config=base.config, source=base.source)


@dataclass
class RunAdapters:
    """A run's adapters read from disk, before any base: what serve stacks on one shared base."""

    run: RunDir
    path: Path  # the adapters.safetensors file
    weights: dict  # mlx-lm's names (model.layers.N.<key>.lora_a ...) -> tensors
    lora: dict  # LoraConfig keyword arguments
    model_cfg: dict  # the recipe's model section ({} for mlx-lm adapter folders)
    base_path: str | None  # --model, else the recipe's model.path
    origin: str | None  # the file that named the base (None when --model did)
    system: str | None  # the run's data.system
    note: str | None  # e.g. an unfinished run's latest checkpoint was taken

    @property
    def scale(self) -> float:
        return LoraConfig(**self.lora).alpha / self.lora["rank"]


def read_adapters(run: RunDir, model: str | None, checkpoint: str | None) -> RunAdapters:
    """A run folder's adapter tensors and LoRA settings, checked against each other."""
    adapters, note = pick_adapters(run, checkpoint)
    model_cfg, lora_kw, origin = _lora_settings(run)
    base_path = model or model_cfg.get("path")
    try:
        weights = mx.load(str(adapters))
    except (OSError, ValueError, RuntimeError) as e:
        raise RunError(
            f"{adapters}: cannot read the adapters ({e}); the file is damaged: "
            "pick a checkpoint with --checkpoint best or step-N, or train again"
        ) from None
    # lora_a is (in, rank), or (experts, rank, in) on a mixture of experts' stacked experts
    ranks = sorted(
        {
            v.shape[-1] if v.ndim == 2 else v.shape[-2]
            for k, v in weights.items()
            if k.endswith(".lora_a")
        }
    )
    if "rank" not in lora_kw and len(ranks) == 1:
        lora_kw["rank"] = ranks[0]  # no settings saved with them: the tensors tell
    elif ranks and lora_kw.get("rank") not in ranks:
        key = "lora.rank" if origin.endswith(".yaml") else "lora_parameters.rank"
        raise ModelError(
            f"{adapters} holds rank-{'/'.join(map(str, ranks))} adapters but {origin} says "
            f"{key} {lora_kw.get('rank')}; set {key} to the rank they were trained with"
        )
    system = (run.recipe().get("data") or {}).get("system") if run.recipe_path.is_file() else None
    origin = None if model else origin
    return RunAdapters(run, adapters, weights, lora_kw, model_cfg, base_path, origin, system, note)


def _load_run(run: RunDir, model: str | None, checkpoint: str | None, loader) -> RunModel:
    ra = read_adapters(run, model, checkpoint)
    if not ra.base_path:
        raise RunError(
            f"{run.path}: no recipe.yaml says which base these adapters belong to; "
            f"name it: macft chat {run.path} --model PATH"
        )
    base_path, adapters, lora_kw = ra.base_path, ra.path, ra.lora
    base = loader(base_path, ra.model_cfg, ra.origin)
    depth = len(getattr(base.model, "layers", None) or [])
    if isinstance(lora_kw.get("layers"), int) and lora_kw["layers"] > depth:
        lora_kw["layers"] = "all"  # mlx-lm's num_layers may exceed the model's depth
    try:
        apply_lora(base.model, LoraConfig(**lora_kw))
    except MacftError as e:
        raise ModelError(f"{adapters} does not fit the base {base_path}: {e}") from None
    try:
        load_adapter_weights(base.model, ra.weights)
    except ModelError:
        raise ModelError(
            f"{adapters} does not fit the base {base_path} (tensor names or shapes differ); "
            f"were these adapters trained on another model? Name that base: macft chat {run.path} "
            "--model PATH"
        ) from None
    mx.eval(base.model.trainable_parameters())  # the adapters; a lazy base stays unread
    base.model.eval()  # no LoRA dropout while generating
    return RunModel(
        base.model,
        base.tokenizer,
        base_path,
        adapters,
        ra.system,
        [ra.note] if ra.note else [],
        base.config,
        base.source,
    )
