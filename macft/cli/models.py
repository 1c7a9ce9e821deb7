"""`macft models`: the models macft knows by name (--model ALIAS)."""

import click

from macft.cli.options import console, json_option
from macft.console import Column, print_json, print_table

COLUMNS = [
    Column("alias", no_wrap=True),
    *(
        Column(h, fold=True)
        for h in ("params", "arch", "chat", "MLX 4-bit repo", "original repo", "license")
    ),
]


@click.command("models")
@json_option("Print the models as JSON, for scripts.")
def command(as_json):
    """The models macft knows by name (--model ALIAS)."""
    rows = model_rows()
    if as_json:
        print_json(rows)
    else:
        print_models(rows, console())


def model_rows() -> list[dict]:
    """One row per catalog model: what the table shows and --json prints."""
    from macft.models import catalog

    return [
        {
            "alias": e.alias,
            "params_b": e.params,
            "arch": e.arch,
            "chat_format": e.chat_format,
            "mlx_repo": e.mlx_repo,
            "pypi": e.pypi[0] if e.pypi else None,
            "hf_repo": e.hf_repo,
            "license": e.license,
        }
        for e in catalog.ENTRIES
    ]


def _cells(r: dict) -> list[str]:
    mlx = r["mlx_repo"] or (f"none (PyPI: {r['pypi']})" if r["pypi"] else "none")
    params = f"{r['params_b']:g}B" if r["params_b"] >= 1 else f"{r['params_b'] * 1000:g}M"
    return [r["alias"], params, r["arch"], r["chat_format"], mlx, r["hf_repo"], r["license"]]


def print_models(rows: list[dict], console) -> None:
    print_table(console, COLUMNS, [_cells(r) for r in rows], "macft models (--model ALIAS)")
    console.print(
        "Weights come from the Hugging Face cache, or download on first use (hf download REPO "
        "fetches them ahead). Also: --model ollama:NAME[:TAG], a folder, or a .gguf file."
    )
