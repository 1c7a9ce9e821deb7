"""The macft command line: thin click commands; the one place a MacftError becomes a clean error."""

import sys

import click
from rich.console import Console

from macft import __version__, backend
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
def cli():
    """Fine-tune open LLMs with LoRA on a 4-bit base, on your Mac."""


@cli.command()
@click.option("--recipe", "-r", help="A recipe file, or the name of a shipped recipe.")
@click.option("--model", "-m", help="Base model: HF/MLX folder, GGUF file or alias (model.path).")
@click.option("--data", "-d", help="A .jsonl file or a folder with train.jsonl (data.path).")
@click.option("--out", "-o", help="Run folder (default runs/<data name>).")
@click.option(
    "--set",
    "sets",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override any recipe key, e.g. train.iters=200.",
)
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
def train(recipe, model, data, out, sets, resume):
    """Train LoRA adapters on a base model.

    \b
    macft train --model smollm2-135m --data examples/net.jsonl
    macft train --recipe smollm2-135m-net --set train.iters=200
    macft train --resume --out runs/net
    """
    from macft.train import run_train

    shorthands = {"model.path": model, "data.path": data, "out": out}
    run_train(recipe, tuple(sets), shorthands, resume, Console())


def main():
    backend.reexec_with_fast_blas()
    cli(prog_name="macft")
