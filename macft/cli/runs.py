"""`macft runs`: the run folders with their state, steps, validation loss, size and age."""

import json

import click

COLORS = {
    "running": "cyan",
    "finished": "green",
    "interrupted": "yellow",
    "crashed": "red",
    "failed": "red",
}


@click.command("runs")
@click.argument("folders", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON, for scripts.")
def command(folders, as_json):
    """List runs: state, steps, best validation loss, size, last update.

    \b
    macft runs                 # the runs under ./runs
    macft runs runs/net other/ --json
    """
    from rich.console import Console

    list_runs(folders, as_json, Console())


def _loss(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def list_runs(folders: tuple[str, ...], as_json: bool, console) -> list[dict]:
    from rich.markup import escape
    from rich.table import Table

    from macft.atomic import human
    from macft.runs.listing import DEFAULT_ROOT, find_runs, human_age, run_info

    rows = [run_info(p) for p in find_runs(folders)]
    if as_json:
        console.out(json.dumps(rows, indent=2), highlight=False)
        return rows
    if not rows:
        where = ", ".join(folders) or f"./{DEFAULT_ROOT}"
        console.print(
            escape(f"no runs under {where}; start one with: macft train --model M --data F")
        )
        return rows
    table = Table(show_header=True)
    for col, justify in (
        ("run", "left"),
        ("state", "left"),
        ("step", "right"),
        ("best val (step)", "right"),
        ("last val", "right"),
        ("size", "right"),
        ("updated", "right"),
    ):
        table.add_column(col, justify=justify)
    for r in rows:
        best = _loss(r["best_val_loss"])
        if r["best_step"] is not None:
            best += f" ({r['best_step']})"
        table.add_row(
            escape(r["path"]),
            f"[{COLORS.get(r['state'], 'white')}]{r['state']}[/]",
            f"{r['step']}/{r['total_steps'] if r['total_steps'] is not None else '?'}",
            best,
            _loss(r["last_val_loss"]),
            human(r["size_bytes"]),
            human_age(r["age_s"]),
        )
    console.print(table)
    stopped = [r["path"] for r in rows if r["state"] in ("crashed", "interrupted", "failed")]
    if stopped:
        console.print(
            escape(f"continue a stopped run with: macft train --resume --out {stopped[0]}")
        )
    return rows
