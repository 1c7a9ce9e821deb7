"""`macft plan`: the predicted peak memory of a training run, and what to change when it does not fit."""

from dataclasses import replace

import click
from rich.markup import escape
from rich.text import Text

from macft.cli.options import console, json_option, set_option
from macft.console import Column, print_json, print_table

COLUMNS = [Column("part"), Column("GB", right=True), Column("what")]


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
@json_option("Print the plan as JSON, for scripts.")
def command(model, data, recipe, sets, memory, fit, hosts, machines, as_json):
    """Predict peak memory of a training run, and what to change when it does not fit.

    \b
    macft plan --model llama-3.1-8b --data net.jsonl --memory 24GB
    macft plan --recipe qwen3-8b-24gb --data net.jsonl --fit
    """
    from macft.train.parallel.hosts import machine_count
    from macft.train.plan import plan_recipe

    n = machine_count(hosts, machines)
    found = plan_recipe(model, data, recipe, sets, memory, machines=n)
    report, out = plan_report(found, n), console()
    if not as_json:
        print_plan(report, out)
    # after the table: when no change can make it fit, the error follows what was planned
    report.update(fit_report(found, fit))
    if as_json:
        print_json(report)
    else:
        print_fit(report, out)


def plan_report(found, machines: int) -> dict:
    """What the plan says, once: the lines and table print it, --json prints it as it is."""
    from macft.train import memory as mp

    plan, s = found.plan, found.plan.setup
    other = None
    if not s.grad_checkpoint:
        other = mp.plan(plan.shape, replace(s, grad_checkpoint=True), plan.usable).total
    return {
        "model": found.recipe["model"]["path"],
        "shapes_from": found.shape_from,
        "compute": s.compute,
        "examples": len(found.lengths),
        "longest_tokens": max(found.lengths, default=0),
        "lengths_how": found.lengths_how,
        "max_seq_length": found.recipe["data"]["max_seq_length"],
        "row_tokens": found.seq,
        "batch_size": s.batch_size,
        "grad_accumulation": s.grad_accumulation,
        "machines": machines,
        "parts": [{"part": k, "bytes": v, "what": _what(k, plan)} for k, v in plan.parts.items()],
        "total_bytes": plan.total,
        "with_grad_checkpoint_bytes": other,
        "usable_bytes": plan.usable,
        "where": found.where,
        "fits": plan.fits,
    }


def fit_report(found, fit: bool) -> dict:
    """The --set changes that make it fit, and with --fit the recipe they make."""
    from macft.config.recipes import apply_override

    changes = found.fit()
    if fit:
        for k, v in changes:
            apply_override(found.recipe, k, v)
    return {
        "to_fit": [{"key": k, "value": v} for k, v in changes],
        "adjusted_recipe": found.recipe if fit and changes else None,
    }


def _what(part: str, plan) -> str:
    from macft.train import memory as mp

    s = plan.setup
    if part == "weights":
        return (
            f"{s.bits}-bit base with scales and biases"
            if s.compute == "quantized"
            else f"{s.compute} base"
        )
    if part == "lora":
        return f"{mp.lora_params(plan.shape, s):,} LoRA parameters, gradients, AdamW state"
    if part == "activations":
        ck = "with" if s.grad_checkpoint else "without"
        return f"kept for the backward pass, {ck} gradient checkpointing"
    if part == "logits":
        chunk = f", {s.loss_chunk} rows at a time" if s.loss_chunk else ""
        return "logits, softmax and its gradient (float32)" + chunk
    return "MLX, Python, tokenizer"


def print_plan(r: dict, console) -> None:
    from macft.train import memory as mp

    console.print(
        f"[bold]memory plan[/] for {escape(r['model'])} ({escape(r['shapes_from'])}), "
        f"{r['compute']} base"
    )
    capped = ""
    if r["longest_tokens"] > r["max_seq_length"]:
        capped = f" (capped by data.max_seq_length={r['max_seq_length']})"
    console.print(
        f"data: {r['examples']} examples, longest {r['longest_tokens']} tokens, {r['lengths_how']}; "
        f"rows of {r['row_tokens']} tokens x batch {r['batch_size']}{capped}"
    )
    if r["machines"] > 1:
        console.print(
            f"{r['machines']} machines: each trains batch {r['batch_size']} x "
            f"{r['grad_accumulation']} accumulation, "
            f"{r['batch_size'] * r['grad_accumulation'] * r['machines']} examples a step in "
            "all; the memory below is what each machine needs"
        )
    rows = [[p["part"], f"{p['bytes'] / mp.GB:.2f}", p["what"]] for p in r["parts"]]
    rows.append(
        [Text("total", style="bold"), Text(f"{r['total_bytes'] / mp.GB:.2f}", style="bold"), ""]
    )
    print_table(console, COLUMNS, rows)
    if r["with_grad_checkpoint_bytes"] is not None:
        console.print(f"with gradient checkpointing: {mp.gb(r['with_grad_checkpoint_bytes'])}")
    verdict = "[green]fits[/]" if r["fits"] else "[red]does not fit[/]"
    console.print(f"usable memory ({escape(r['where'])}): {mp.gb(r['usable_bytes'])} -> {verdict}")


def print_fit(r: dict, console) -> None:
    from macft.config.recipes import dump
    from macft.train.plan import set_flags

    if not r["to_fit"]:
        return
    console.print(f"to fit: {set_flags([(c['key'], c['value']) for c in r['to_fit']])}")
    if r["adjusted_recipe"] is not None:
        # YAML lists are [a, b]: printed as they are, not read as markup
        console.print("adjusted recipe:\n" + dump(r["adjusted_recipe"]), markup=False)
