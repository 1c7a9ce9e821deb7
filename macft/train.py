"""The train command: recipe -> base model -> LoRA -> data -> trainer -> run folder."""

from dataclasses import replace
from pathlib import Path

import mlx.core as mx
from rich.console import Console

from macft import backend, distributed, planning
from macft.data import load_data
from macft.errors import DataError, RecipeError
from macft.lora import apply_lora
from macft.models import load_base
from macft.progress import TrainProgress
from macft.recipe import dump, load_recipe
from macft.run_dir import RunDir
from macft.schedule import total_steps
from macft.train_state import stream_count
from macft.trainer import TrainConfig, train, uses_compile

PACKAGE_DIR = Path(__file__).parent


def resolve_data_path(path: str, origin: str) -> str:
    """Paths are relative to where macft runs; shipped recipes may point at shipped examples."""
    p = Path(path).expanduser()
    if p.exists():
        return str(p)
    shipped = PACKAGE_DIR / path
    if not p.is_absolute() and shipped.exists():
        return str(shipped)
    where = f"{origin}: data.path" if origin != "command line" else "--data"
    raise DataError(
        f"{where}: {path} does not exist; give a .jsonl file or a folder with train.jsonl"
    )


def default_out(recipe: dict) -> Path:
    data = Path(recipe["data"]["path"])
    name = data.name if data.is_dir() else data.stem
    if name in ("train", "data", ""):
        name = data.parent.name if data.is_file() else name
    return Path("runs") / (name or "run")


def train_config(recipe: dict) -> TrainConfig:
    t = recipe["train"]
    return TrainConfig(**{k: v for k, v in t.items() if k in TrainConfig.__dataclass_fields__})


def describe_steps(cfg: TrainConfig, n_train: int, machines: int = 1) -> str:
    per_step = cfg.batch_size * cfg.grad_accumulation * machines
    if machines > 1:
        cfg = replace(cfg, batch_size=cfg.batch_size * machines)
    if cfg.iters is not None:
        return f"{cfg.iters} steps of {per_step} examples"
    return f"{cfg.epochs:g} epochs = {total_steps(cfg, n_train)} steps of {per_step} examples"


def describe_speed(cfg: TrainConfig, base, world_size: int = 1) -> str:
    """Which of the speed-ups this run uses, and how to turn each off."""
    from macft.batches import can_pack

    if not cfg.pack:
        rows = "padded rows grouped by length (train.pack=false)"
    elif can_pack(base.model):
        rows = "examples packed in rows (train.pack)"
    else:
        rows = f"padded rows grouped by length ({base.config.get('model_type')} is not packed)"
    loss = "full logits"
    if cfg.loss_chunk:
        loss = f"loss on target positions, {cfg.loss_chunk} at a time"
    parts = [rows, loss]
    if uses_compile(cfg, base.model):
        parts.append("one compiled step per batch shape (train.compile)")
    if not backend.metal_available():
        quantized = base.source["compute"] == "quantized"
        if quantized:
            parts.append("quantized weights dequantized per matmul for the CPU's BLAS")
        else:
            parts.append("float base on CPU (model.compute=quantized keeps 4-bit)")
        if (n := stream_count(cfg, world_size, quantized)) > 1:
            parts.append(f"each batch split over {n} CPU streams (MACFT_NO_CPU_STREAMS=1: one)")
    return "; ".join(parts)


def resolve_recipe(recipe_arg, sets, shorthands: dict, resume: bool) -> tuple[dict, str, str]:
    """(recipe, where it came from, the shipped recipe picked for this Mac or None)."""
    if resume and shorthands.get("out") is None and not recipe_arg:
        raise RecipeError("--resume needs the run folder: macft train --resume --out runs/NAME")
    if resume and recipe_arg is None:
        saved = Path(shorthands["out"]) / "recipe.yaml"
        if not saved.is_file():
            raise RecipeError(f"{saved}: no run to resume there; start one with macft train")
        recipe_arg = str(saved)
    picked = None
    if recipe_arg is None and not resume:
        # `--model llama-3.1-8b` alone: the catalog model's shipped recipe for this memory size.
        recipe_arg = picked = planning.default_recipe(shorthands.get("model.path"))
    recipe, origin = load_recipe(recipe_arg, sets, shorthands)
    recipe["data"]["path"] = resolve_data_path(recipe["data"]["path"], origin)
    out = Path(recipe["out"]) if recipe["out"] else default_out(recipe)
    recipe["out"] = str(out)
    return recipe, origin, picked


def run_train(
    recipe_arg: str | None,
    sets: tuple[str, ...],
    shorthands: dict,
    resume: bool,
    console: Console,
    force: bool = False,
    world=None,
) -> Path:
    world = world or distributed.SOLO
    # Rank 0 reads the recipe (on --resume, from its run folder) and hands it to the others.
    recipe, origin, picked = world.from_main(
        lambda: resolve_recipe(recipe_arg, sets, shorthands, resume)
    )
    out = Path(recipe["out"])
    cfg = train_config(recipe)

    run = world.run_view(RunDir(out))  # only rank 0 writes the run folder
    world.on_timeout(lambda message: distributed.mark_failed(run, message))
    if resume:
        run.open_for_resume(recipe, write=False)  # saved once training starts
    else:
        run.check_free()

    console.print(f"[bold]macft train[/] -> {out}   backend: {backend.describe()}")
    if picked:
        console.print(f"recipe: {picked} (picked for {planning.usable_gb()} usable memory)")
    backend.set_wired_limit()
    if stream_count(cfg, world.size, quantized=recipe["model"]["compute"] == "quantized") > 1:
        # before the first evaluation (the model's load); if "auto" picks the 4-bit base after
        # all, nothing is split and the order alone leaves the peak as it was
        backend.plan_cpu_streams()
    m = recipe["model"]
    with console.status(f"loading {m['path']} ..."):
        base = load_base(
            m["path"], bits=m["bits"], group_size=m["group_size"], compute=m["compute"]
        )
    console.print(f"model: {m['path']} ({base.source['kind']}, compute {base.source['compute']})")

    lo = recipe["lora"]
    mx.random.seed(cfg.seed)  # LoRA's initial A matrices: the same seed gives the same run
    try:
        keys = ("rank", "alpha", "dropout", "targets", "layers", "dora", "router")
        info = apply_lora(base.model, *(lo[k] for k in keys))
    except RecipeError as e:  # a target or layer count this model does not have
        raise RecipeError(f"{origin}: {e}") from None
    console.print(
        f"LoRA rank {lo['rank']} alpha {lo['alpha']:g} on {', '.join(info.keys)} of "
        f"{info.num_layers} layers: {info.trainable:,} trainable of {info.total:,} parameters "
        f"({100 * info.trainable / info.total:.2f}%)"
    )

    d = recipe["data"]
    train_set, valid_set, rep = load_data(
        d["path"], base.tokenizer, d["max_seq_length"], d["valid_fraction"], cfg.seed, d["system"]
    )
    console.print(
        f"data: {rep.n_train} train / {rep.n_valid} valid examples ({rep.format}), "
        f"{rep.train_target_tokens:,} of {rep.train_tokens:,} train tokens carry loss"
    )
    if rep.n_truncated or rep.n_dropped:
        console.print(
            f"[yellow]note:[/] {rep.n_truncated} examples cut to data.max_seq_length="
            f"{d['max_seq_length']}, {rep.n_dropped} dropped (nothing left to learn after the cut)"
        )
    # Every rank must train on the same examples of the same model, or the sums mean nothing.
    world.agree("data or model", distributed.fingerprint(train_set, valid_set, base.config))
    steps = describe_steps(cfg, rep.n_train, world.size)
    console.print(f"schedule: {steps}, lr {cfg.learning_rate:g} ({cfg.schedule})")
    if world.size > 1:
        console.print(
            f"data parallel: {world.size} processes, each {cfg.batch_size} examples a micro-batch"
        )
    console.print(f"speed: {describe_speed(cfg, base, world.size)}")
    planning.check_before_training(
        recipe, base.config, base.source, rep.lengths, console, force, machines=world.size
    )

    pad_id = base.tokenizer.pad_token_id
    if pad_id is None:
        pad_id = base.tokenizer.eos_token_id
    # The lock is held from the first write on (the trainer's own lock nests in it).
    with run.lock(), TrainProgress(console) as progress:
        if resume:
            run.save_recipe(recipe)
        else:
            run.create(recipe, base.source)
        result = train(
            base.model,
            train_set,
            valid_set,
            cfg,
            run,
            pad_id=pad_id,
            resume=resume,
            on_start=progress.on_start,
            on_report=progress.on_report,
            lora_info=info,
            world=world,
        )
    if result.status == "interrupted":
        console.print(
            f"[yellow]interrupted[/] at step {result.step}: checkpoint saved. "
            f"Continue with: macft train --resume --out {out}"
            + (f" --hosts (the same {world.size} machines)" if world.size > 1 else "")
        )
    else:
        before = next((r["val_loss"] for r in run.read_metrics() if r["step"] == 0), None)
        best = ""
        if result.best_val_loss is not None:
            best = f", best val loss {result.best_val_loss:.3f} (step {result.best_step})"
            best += f", {before:.3f} before training" if before is not None else ""
        console.print(
            f"[green]done[/]: {result.step} steps{best}. Adapters: {out}/adapters.safetensors"
        )
    console.print(f"metrics: {out}/metrics.jsonl   recipe: {out}/recipe.yaml")
    return out


__all__ = ["run_train", "dump"]
