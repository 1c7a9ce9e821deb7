"""What several commands share: the `computes` mark, --set, --json, --no-color and the console."""

import click

from macft.console import make_console

NO_COLOR = "macft.no_color"  # the key --no-color sets in the context's meta, shared by all


def computes(command: click.Command) -> click.Command:
    """Mark a command that computes with MLX: main() prepares the process for it."""
    command.computes = True
    return command


def set_option(help: str = "Override a recipe key, e.g. train.iters=200."):
    return click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help=help)


def json_option(help: str):
    return click.option("--json", "as_json", is_flag=True, help=help)


def _remember_no_color(ctx: click.Context, param, value: bool) -> None:
    if value:
        ctx.meta[NO_COLOR] = True


def no_color_option(command):
    """--no-color, for the group (macft --no-color CMD) and each command (macft CMD --no-color)."""
    return click.option(
        "--no-color",
        is_flag=True,
        expose_value=False,
        callback=_remember_no_color,
        help="No colours (as NO_COLOR=1 does).",
    )(command)


def console(**options):
    """The running command's console (make_console's options), with its --no-color."""
    no_color = click.get_current_context().meta.get(NO_COLOR, False)
    return make_console(no_color=no_color, **options)
