"""One `macft train`: recipe -> base model -> LoRA -> data -> memory plan -> the loop -> run folder.

Set up, train, save, as torchtune's recipes do; each phase says what it did in one line.
"""

from dataclasses import replace
from pathlib import Path

import mlx.core as mx
from rich.console import Console
from rich.markup import escape

from macft import device
from macft.config import schema
from macft.config.recipes import load_recipe, resolve_data_path
from macft.cpu.process import describe as describe_backend
from macft.cpu.streams import plan_cpu_streams, stream_count
from macft.data.dataset import data_digest, load_data
from macft.errors import RecipeError
from macft.lora.apply import apply_lora
from macft.models import load_base
from macft.runs.folder import RunDir
from macft.train import plan
from macft.train.loop import train
from macft.train.parallel import world as parallel
from macft.train.progress import TrainProgress
from macft.train.schedule import total_steps
from macft.train.speed import Speed


def default_out(recipe: dict) -> Path:
    """runs/<data name>: the file's stem, or the folder's name (`..` resolved, never empty)."""
    data = Path(recipe["data"]["path"]).resolve()
    name = data.name if data.is_dir() else data.stem
    if name in ("train", "data", ""):
        name = data.parent.name if not data.is_dir() else name
    return Path("runs") / (name if name not in ("", ".", "..") else "run")


def describe_steps(cfg: schema.TrainConfig, n_train: int, machines: int = 1) -> str:
    per_step = cfg.batch_size * cfg.grad_accumulation * machines
    if machines > 1:
        cfg = replace(cfg, batch_size=cfg.batch_size * machines)
    if cfg.iters is not None:
        return f"{cfg.iters} steps of {per_step} examples"
    return f"{cfg.epochs:g} epochs = {total_steps(cfg, n_train)} steps of {per_step} examples"


def describe_method(cfg: schema.TrainConfig) -> tuple[str, str | None]:
    """(what the loss is, for the schedule line; a note when a key of another method is set)."""
    what = {
        "sft": "",
        "dpo": f", DPO beta {cfg.beta:g}"
        + (f" + {cfg.dpo_nll:g} x the chosen answer's loss" if cfg.dpo_nll else ""),
        "orpo": f", ORPO lambda {cfg.orpo_lambda:g}",
    }[cfg.method]
    note = None
    if cfg.dpo_nll and cfg.method != "dpo":  # e.g. the DPO recipe with --set train.method=orpo
        note = f"train.dpo_nll {cfg.dpo_nll:g} is DPO's; train.method {cfg.method} leaves it unused"
    return what, note


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
        recipe_arg = picked = plan.default_recipe(shorthands.get("model.path"))
    recipe, origin = load_recipe(recipe_arg, sets, shorthands)
    recipe["data"]["path"] = resolve_data_path(recipe["data"]["path"], origin)
    out = Path(recipe["out"]).expanduser() if recipe["out"] else default_out(recipe)
    recipe["out"] = str(out)
    return recipe, origin, picked


def load_model(recipe: dict, origin: str, console: Console):
    """The base as the recipe asks, with LoRA applied: (base, LoraInfo)."""
    m = schema.of(recipe, "model")
    with console.status(f"loading {escape(m.path)} ..."):
        base = load_base(m.path, bits=m.bits, group_size=m.group_size, compute=m.compute)
    console.print(
        f"model: {escape(m.path)} ({base.source['kind']}, compute {base.source['compute']})"
    )
    lo = schema.of(recipe, "lora")
    mx.random.seed(recipe["train"]["seed"])  # LoRA's initial A: the same seed, the same run
    try:
        info = apply_lora(base.model, lo)
    except RecipeError as e:  # a target or layer count this model does not have
        raise RecipeError(f"{origin}: {e}") from None
    console.print(
        f"LoRA rank {lo.rank} alpha {lo.alpha:g} on {', '.join(info.keys)} of "
        f"{info.num_layers} layers: {info.trainable:,} trainable of {info.total:,} parameters "
        f"({100 * info.trainable / info.total:.2f}%)"
    )
    return base, info


def load_examples(recipe: dict, tokenizer, console: Console):
    """(train set, valid set, report) tokenized and masked, with what was cut said."""
    d, seed = schema.of(recipe, "data"), recipe["train"]["seed"]
    train_set, valid_set, rep = load_data(
        d.path, tokenizer, d.max_seq_length, d.valid_fraction, seed, d.system,
        recipe["train"]["method"],
    )  # fmt: skip
    console.print(
        f"data: {rep.n_train} train / {rep.n_valid} valid examples ({rep.format}), "
        f"{rep.train_target_tokens:,} of {rep.train_tokens:,} train tokens carry loss"
    )
    if rep.n_truncated or rep.n_dropped:
        console.print(
            f"[yellow]note:[/] {rep.n_truncated} examples cut to data.max_seq_length="
            f"{d.max_seq_length}, {rep.n_dropped} dropped (nothing left to learn after the cut)"
        )
    return train_set, valid_set, rep


def run_train(recipe_arg, sets, shorthands: dict, resume: bool, console: Console,
              force: bool = False, world=parallel.SOLO) -> dict:  # fmt: skip
    """Set up, train and save one run; returns its summary (result_summary)."""
    # Rank 0 reads the recipe (on --resume, from its run folder) and hands it to the others.
    recipe, origin, picked = world.from_main(
        lambda: resolve_recipe(recipe_arg, sets, shorthands, resume)
    )
    out, cfg = Path(recipe["out"]), schema.of(recipe, "train")
    run = world.run_view(RunDir(out))  # only rank 0 writes the run folder
    world.on_timeout(lambda message: parallel.mark_failed(run, message))
    digest = world.from_main(lambda: data_digest(recipe["data"]["path"]))
    if resume:  # saved once training starts
        run.open_for_resume(recipe, write=False, data_digest=digest, force=force)
    else:
        run.check_free()

    console.print(f"[bold]macft train[/] -> {escape(str(out))}   backend: {describe_backend()}")
    if picked:
        console.print(f"recipe: {escape(picked)} (picked for {plan.usable_gb()} usable memory)")
    device.set_wired_limit()
    if stream_count(cfg, world.size, quantized=recipe["model"]["compute"] == "quantized") > 1:
        # before the first evaluation (the model's load); if "auto" picks the 4-bit base after
        # all, nothing is split and the order alone leaves the peak as it was
        plan_cpu_streams()
    base, info = load_model(recipe, origin, console)
    train_set, valid_set, rep = load_examples(recipe, base.tokenizer, console)
    # Every rank must train on the same examples of the same model, or the sums mean nothing.
    if world.size > 1:  # the weights too: a config alone says nothing of the file behind it
        weights = parallel.weights_digest(base.model)
        world.agree(
            "data or model", parallel.fingerprint(train_set, valid_set, base.config, weights)
        )
    method, note = describe_method(cfg)
    console.print(
        f"schedule: {describe_steps(cfg, rep.n_train, world.size)}, "
        f"lr {cfg.learning_rate:g} ({cfg.schedule}){method}"
    )
    if note:
        console.print(f"[yellow]note:[/] {note}")
    if world.size > 1:
        console.print(
            f"data parallel: {world.size} processes, each {cfg.batch_size} examples a micro-batch"
        )
    speed = Speed.choose(cfg, base.model, world.size)
    model_type = base.config.get("model_type")
    console.print(f"speed: {speed.describe(cfg, model_type, base.source['compute'])}")
    step_plan = plan.check_before_training(
        recipe, base.config, base.source, rep.lengths, console, force, world.size, base.model
    )
    device.limit_cache(step_plan.step_bytes)

    pad_id = base.tokenizer.pad_token_id
    if pad_id is None:
        pad_id = base.tokenizer.eos_token_id
    # The lock is held from the first write on (the trainer's own lock nests in it).
    with run.lock(), TrainProgress(console) as progress:
        if resume:
            run.save_recipe(recipe, digest)
        else:
            run.create(recipe, base.source, digest)
        result = train(base.model, train_set, valid_set, cfg, run, pad_id, resume, progress,
                       info, world)  # fmt: skip
    summary = result_summary(result, run, out, world.size)
    say_result(summary, console)
    return summary


def result_summary(result, run, out: Path, machines: int) -> dict:
    """How the run ended, once: the last lines say it and `macft train --json` prints it."""
    finished = result.status != "interrupted"
    before = next((r["val_loss"] for r in run.read_metrics() if r["step"] == 0), None)
    resume = f"macft train --resume --out {out}"
    return {
        "status": result.status,
        "out": str(out),
        "step": result.step,
        "total_steps": result.total_steps,
        "best_val_loss": result.best_val_loss,
        "best_step": result.best_step,
        "val_loss": result.val_loss,
        "val_loss_before": before,
        "stopped_early": result.stopped_early,
        "adapters": f"{out}/adapters.safetensors" if finished else None,
        "metrics": f"{out}/metrics.jsonl",
        "recipe": f"{out}/recipe.yaml",
        "machines": machines,
        "resume": None if finished else resume,
    }


def say_result(s: dict, console: Console) -> None:
    if s["resume"]:
        more = f" --hosts (the same {s['machines']} machines)" if s["machines"] > 1 else ""
        console.print(
            f"[yellow]interrupted[/] at step {s['step']}: checkpoint saved. "
            f"Continue with: {escape(s['resume'])}{more}"
        )
    else:
        best = ""
        if s["best_val_loss"] is not None:
            best = f", best val loss {s['best_val_loss']:.3f} (step {s['best_step']})"
            if s["val_loss_before"] is not None:
                best += f", {s['val_loss_before']:.3f} before training"
        adapters = escape(s["adapters"])  # a path is text, not rich markup: "a[/]b" would raise
        console.print(f"[green]done[/]: {s['step']} steps{best}. Adapters: {adapters}")
    console.print(escape(f"metrics: {s['metrics']}   recipe: {s['recipe']}"))
