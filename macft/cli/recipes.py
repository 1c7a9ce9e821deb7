"""`macft recipes`: the shipped recipes; `macft recipes show NAME` prints one."""

import re

import click

from macft.cli.options import console, json_option
from macft.config.recipes import find_recipe, read_recipe_file, shipped_recipes
from macft.console import Column, print_json, print_table

COLUMNS = [
    Column("name", no_wrap=True),
    *(Column(h, fold=True) for h in ("model", "memory", "description")),
]


@click.group("recipes", invoke_without_command=True)
@json_option("Print the recipes as JSON, for scripts.")
@click.pass_context
def command(ctx, as_json):
    """List the shipped recipes; `macft recipes show NAME` prints one."""
    if ctx.invoked_subcommand is not None:
        return
    rows = [recipe_info(path) for path in shipped_recipes().values()]
    if as_json:
        print_json(rows)
    else:
        print_recipes(rows, console())


@command.command("show")
@click.argument("name")
def show(name):
    """Print a shipped recipe (or a recipe file)."""
    click.echo(show_recipe(name), nl=False)


def recipe_info(path) -> dict:
    """One recipe's row: what the table shows and --json prints."""
    text = path.read_text(encoding="utf-8")
    first = next((ln[1:].strip() for ln in text.splitlines() if ln.startswith("#")), "")
    model = (read_recipe_file(path).get("model") or {}).get("path", "?")
    tier = re.search(r"-(\d+)gb$", path.stem)
    return {"name": path.stem, "model": model, "memory_gb": int(tier[1]) if tier else None,
            "description": first}  # fmt: skip


def print_recipes(rows: list[dict], console) -> None:
    cells = [
        [
            r["name"],
            r["model"],
            f"{r['memory_gb']} GB" if r["memory_gb"] else "any",
            r["description"],
        ]
        for r in rows
    ]
    title = "shipped recipes (macft recipes show NAME; macft train --recipe NAME)"
    print_table(console, COLUMNS, cells, title)


def show_recipe(name: str) -> str:
    return find_recipe(name).read_text(encoding="utf-8")
