"""What every command prints through: its consoles, its tables and its --json documents.

In a terminal, rich draws as it likes: colours, live bars, boxed tables that fit the width.
Anywhere else (a pipe, a log file, `nohup`, a job scheduler, TERM=dumb) a line is never
wrapped or cut: each message is one line whatever its length, and a table is plain aligned
rows, each holding its whole values, so `grep` finds them. NO_COLOR and --no-color take the
colours away.
"""

import json
import os
import sys
from dataclasses import dataclass

from rich.console import Console
from rich.table import Table
from rich.text import Text

from macft.atomic import strict


def make_console(
    stderr: bool = False,
    quiet: bool = False,
    no_color: bool = False,
    highlight: bool = True,
    soft_wrap: bool = False,
) -> Console:
    """The one place a console is built: stdout's, or stderr's when stderr is True.

    soft_wrap: leave long lines whole in a terminal too (the terminal folds them), so paths and
    commands copy whole; without a terminal they always stay whole."""
    # A dumb terminal cannot redraw a bar or draw a box: it is written to as a file is.
    dumb = os.environ.get("TERM", "").lower() in ("dumb", "unknown")
    console = Console(
        stderr=stderr,
        quiet=quiet,
        no_color=no_color or None,  # None: rich reads NO_COLOR itself
        highlight=highlight,
        force_terminal=False if dumb else None,
    )
    # Without a terminal, rich would wrap at 80 columns: lines would break mid-word in logs.
    console.soft_wrap = soft_wrap or not console.is_terminal
    return console


@dataclass(frozen=True)
class Column:
    """A table column: its header, and how its values sit in a terminal."""

    header: str
    right: bool = False  # numbers line up on the right
    fold: bool = False  # a narrow terminal folds long values onto more lines (else: cut with ...)
    no_wrap: bool = False


def _plain(cell) -> str:
    return cell.plain if isinstance(cell, Text) else str(cell)


def plain_rows(columns: list[Column], rows: list[list]) -> list[str]:
    """The header and the rows as aligned lines of whole values, two spaces between columns."""
    lines = [[c.header for c in columns]] + [[_plain(cell) for cell in row] for row in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(columns))]
    out = []
    for line in lines:
        cells = [
            v.rjust(w) if c.right else v.ljust(w)
            for v, w, c in zip(line, widths, columns, strict=True)
        ]
        out.append("  ".join(cells).rstrip())
    return out


def print_table(console: Console, columns: list[Column], rows: list[list], title: str = "") -> None:
    """rich's table in a terminal; elsewhere the title, then plain_rows.

    Cells are plain strings (numbers are made strings, never read as markup), or rich Text for a
    styled cell."""
    if not console.is_terminal:
        for line in ([title] if title else []) + plain_rows(columns, rows):
            console.out(line, highlight=False)
        return
    table = Table(title=Text(title) if title else None)
    for c in columns:
        overflow = "fold" if c.fold else "ellipsis"
        table.add_column(
            c.header, justify="right" if c.right else "left", overflow=overflow, no_wrap=c.no_wrap
        )
    for row in rows:
        # A plain string is shown as it is: a path or a name never reads as rich markup.
        table.add_row(*(cell if isinstance(cell, Text) else Text(str(cell)) for cell in row))
    console.print(table)


def print_json(data) -> None:
    """One JSON document on stdout: all a --json command writes there."""
    sys.stdout.write(json.dumps(strict(data), indent=2, ensure_ascii=False) + "\n")
    sys.stdout.flush()
