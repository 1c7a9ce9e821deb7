"""`macft serve`: one base, many fine-tunes, an OpenAI-compatible API that picks one per request."""

import click

from macft.cli.options import computes, console
from macft.inference.serve import DEFAULT_MAX_ADAPTERS, parse_max_adapters


@computes
@click.command("serve")
@click.argument("runs", nargs=-1)
@click.option("--model", "-m", help="The base (default: the one the first run trained on).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8080,
    show_default=True,
    help="0: any free port.",
)
@click.option(
    "--api-key", envvar="MACFT_API_KEY", help="Answer only requests with this bearer key."
)
@click.option(
    "--max-adapters",
    default=str(DEFAULT_MAX_ADAPTERS),
    show_default=True,
    metavar="N",
    help="Adapters loaded at once; each loads on its first request, the least recently "
    "used one no request is using makes room (if all are in use, the request waits).",
)
def command(runs, model, host, port, api_key, max_adapters):
    """Serve runs (and their base) behind an OpenAI-compatible API.

    Each run is served under its folder's name, the base under its own; a request's
    "model" picks one, with no reload. A --host beyond this machine needs --api-key.

    \b
    macft serve runs/net runs/sql
    curl localhost:8080/v1/chat/completions -H 'Content-Type: application/json' \\
      -d '{"model": "net", "messages": [{"role": "user", "content": "show routes?"}]}'
    """
    from macft.inference.serve.run import serve

    cap = parse_max_adapters(max_adapters)  # before minutes of loading
    serve(list(runs), model, host, port, api_key, cap, console(stderr=True, highlight=False))
