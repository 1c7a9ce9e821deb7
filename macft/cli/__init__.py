"""The macft command line: a click group, one thin module per command.

The one place a MacftError becomes `Error: ...` and exit 1, and where the group and every
command get --no-color. Commands import their machinery when they run, so `macft runs
--json` loads no MLX. Commands that compute are marked `computes`: only for them does main()
set up the process (OpenBLAS, CPU kernels).
"""

import sys

import click

from macft import __version__
from macft.cli import chat, eval, fuse, models, plan, recipes, report, runs, serve, train
from macft.cli.options import no_color_option
from macft.errors import MacftError


class MacftGroup(click.Group):
    """Turn user mistakes into `Error: ...` and exit 1, with no traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except MacftError as e:
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt:
            click.echo("\nstopped.", err=True)
            sys.exit(130)


@click.group(cls=MacftGroup)
@click.version_option(__version__, prog_name="macft")
@no_color_option
def cli():
    """Fine-tune open LLMs with LoRA on a 4-bit base, on your Mac."""


for module in (train, chat, serve, fuse, eval, report, runs, models, recipes, plan):
    cli.add_command(no_color_option(module.command))


def command_name(argv: list[str]) -> str | None:
    """The subcommand in argv: the first word that is not an option."""
    return next((a for a in argv if not a.startswith("-")), None)


def main():
    command = cli.commands.get(command_name(sys.argv[1:]) or "")
    if getattr(command, "computes", False):
        from macft.cpu.process import prepare

        prepare()
    cli(prog_name="macft")
