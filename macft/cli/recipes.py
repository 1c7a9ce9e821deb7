"""`macft recipes`: the shipped recipes; `macft recipes show NAME` prints one."""

import re

import click
from rich.console import Console
from rich.table import Table

from macft.config.recipes import find_recipe, read_recipe_file, shipped_recipes


@click.group("recipes", invoke_without_command=True)
@click.pass_context
def command(ctx):
    """List the shipped recipes; `macft recipes show NAME` prints one."""
    if ctx.invoked_subcommand is None:
        print_recipes(Console())


@command.command("show")
@click.argument("name")
def show(name):
    """Print a shipped recipe (or a recipe file)."""
    click.echo(show_recipe(name), nl=False)


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
