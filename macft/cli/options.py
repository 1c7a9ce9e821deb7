"""What several commands share: the `computes` mark and the --set option."""

import click


def computes(command: click.Command) -> click.Command:
    """Mark a command that computes with MLX: main() prepares the process for it."""
    command.computes = True
    return command


def set_option(help: str = "Override a recipe key, e.g. train.iters=200."):
    return click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help=help)
