"""`macft plan`: the predicted peak memory of a training run, and what to change when it does not fit."""

from dataclasses import replace

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from macft.cli.options import set_option


@click.command("plan")
@click.option(
    "--model", "-m", help="Base model: alias, folder or GGUF (weights not needed for aliases)."
)
@click.option("--data", "-d", help="Training data whose lengths decide the sequence length.")
@click.option("--recipe", "-r", help="A recipe file, or the name of a shipped recipe.")
@set_option("Override a recipe key.")
@click.option(
    "--memory", help="Plan for a Mac with this much memory, e.g. 24GB (default: this machine)."
)
@click.option(
    "--fit", is_flag=True, help="Apply the changes that make it fit and print the recipe."
)
@click.option("--hosts", help="Plan for training on these Macs (macft train --hosts).")
@click.option("--machines", type=click.IntRange(1), help="Plan for training on N Macs.")
def command(model, data, recipe, sets, memory, fit, hosts, machines):
    """Predict peak memory of a training run, and what to change when it does not fit.

    \b
    macft plan --model llama-3.1-8b --data net.jsonl --memory 24GB
    macft plan --recipe qwen3-8b-24gb --data net.jsonl --fit
    """
    from macft.train.parallel.hosts import machine_count
    from macft.train.plan import plan_recipe

    n = machine_count(hosts, machines)
    found = plan_recipe(model, data, recipe, sets, memory, machines=n)
    show_plan(found, n, fit, Console(width=120))


def show_plan(found, machines: int, fit: bool, console: Console) -> None:
    from macft.config.recipes import apply_override, dump
    from macft.train import memory as mp
    from macft.train.plan import set_flags

    plan, s, max_len = found.plan, found.plan.setup, found.recipe["data"]["max_seq_length"]
    longest = max(found.lengths, default=0)
    console.print(
        f"[bold]memory plan[/] for {escape(found.recipe['model']['path'])} "
        f"({escape(found.shape_from)}), "
        f"{s.compute} base"
    )
    capped = f" (capped by data.max_seq_length={max_len})" if longest > max_len else ""
    console.print(
        f"data: {len(found.lengths)} examples, longest {longest} tokens, {found.lengths_how}; "
        f"rows of {found.seq} tokens x batch {s.batch_size}{capped}"
    )
    if machines > 1:
        console.print(
            f"{machines} machines: each trains batch {s.batch_size} x {s.grad_accumulation} "
            f"accumulation, {s.batch_size * s.grad_accumulation * machines} examples a step in "
            "all; the memory below is what each machine needs"
        )
    console.print(_parts_table(plan))
    if not s.grad_checkpoint:
        other = mp.plan(plan.shape, replace(s, grad_checkpoint=True), plan.usable)
        console.print(f"with gradient checkpointing: {mp.gb(other.total)}")
    verdict = "[green]fits[/]" if plan.fits else "[red]does not fit[/]"
    console.print(f"usable memory ({escape(found.where)}): {mp.gb(plan.usable)} -> {verdict}")
    changes = found.fit()
    if not changes:
        return
    console.print(f"to fit: {set_flags(changes)}")
    if fit:
        for k, v in changes:
            apply_override(found.recipe, k, v)
        console.print("adjusted recipe:\n" + dump(found.recipe))


def _parts_table(plan) -> Table:
    from macft.train import memory as mp

    s = plan.setup
    table = Table(show_header=True)
    table.add_column("part")
    table.add_column("GB", justify="right")
    table.add_column("what")
    ck = "with" if s.grad_checkpoint else "without"
    what = {
        "weights": f"{s.bits}-bit base with scales and biases" if s.compute == "quantized"
        else f"{s.compute} base",
        "lora": f"{mp.lora_params(plan.shape, s):,} LoRA parameters, gradients, AdamW state",
        "activations": f"kept for the backward pass, {ck} gradient checkpointing",
        "logits": "logits, softmax and its gradient (float32)"
        + (f", {s.loss_chunk} rows at a time" if s.loss_chunk else ""),
        "overhead": "MLX, Python, tokenizer",
    }  # fmt: skip
    for k, v in plan.parts.items():
        table.add_row(k, f"{v / mp.GB:.2f}", what[k])
    table.add_row("[bold]total[/]", f"[bold]{plan.total / mp.GB:.2f}[/]", "")
    return table
