"""`macft runs`: the run folders with their state, steps, validation loss, size and age."""

import click
from rich.markup import escape

from macft.cli.options import console, json_option
from macft.console import Column, print_json, print_table

COLORS = {
    "running": "cyan",
    "finished": "green",
    "interrupted": "yellow",
    "crashed": "red",
    "failed": "red",
}
COLUMNS = [
    Column("run"),
    Column("state"),
    *(Column(h, right=True) for h in ("step", "best val (step)", "last val", "size", "updated")),
]


@click.command("runs")
@click.argument("folders", nargs=-1)
@json_option("Print the rows as JSON, for scripts.")
def command(folders, as_json):
    """List runs: state, steps, best validation loss, size, last update.

    \b
    macft runs                 # the runs under ./runs
    macft runs runs/net other/ --json
    """
    from macft.runs.listing import find_runs, run_info

    rows = [run_info(p) for p in find_runs(folders)]
    if as_json:
        print_json(rows)
    else:
        print_runs(rows, folders, console())


def _loss(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def _cells(r: dict) -> list:
    from rich.text import Text

    from macft.atomic import human
    from macft.runs.listing import human_age

    best = _loss(r["best_val_loss"])
    if r["best_step"] is not None:
        best += f" ({r['best_step']})"
    return [
        r["path"],
        Text(r["state"], style=COLORS.get(r["state"], "white")),
        f"{r['step']}/{r['total_steps'] if r['total_steps'] is not None else '?'}",
        best,
        _loss(r["last_val_loss"]),
        human(r["size_bytes"]),
        human_age(r["age_s"]),
    ]


def print_runs(rows: list[dict], folders: tuple[str, ...], console) -> None:
    from macft.runs.listing import DEFAULT_ROOT

    if not rows:
        where = ", ".join(folders) or f"./{DEFAULT_ROOT}"
        console.print(
            escape(f"no runs under {where}; start one with: macft train --model M --data F")
        )
        return
    print_table(console, COLUMNS, [_cells(r) for r in rows])
    stopped = [r["path"] for r in rows if r["state"] in ("crashed", "interrupted", "failed")]
    if stopped:
        console.print(
            escape(f"continue a stopped run with: macft train --resume --out {stopped[0]}")
        )
