"""`macft serve` from start to Ctrl-C: load, say what is served and where, answer, stop."""

import signal
from datetime import datetime

from rich.console import Console
from rich.markup import escape

from macft import device
from macft.cpu.process import describe as describe_backend
from macft.inference.serve.catalog import open_catalog
from macft.inference.serve.server import check_host, make_server


def serve(
    runs: list[str], model, host: str, port: int, api_key, max_adapters: int, info: Console
) -> None:
    def log(line: str) -> None:
        info.print(f"[dim]{datetime.now():%H:%M:%S}[/] {escape(line)}")

    check_host(host, api_key)  # before minutes of loading
    device.reset_peak_memory()
    with info.status(f"loading {escape(', '.join(runs) or str(model))} ..."):
        catalog, notes = open_catalog(runs, model, max_adapters)
    server = make_server(catalog, host, port, api_key, log)
    for note in notes:
        info.print(f"[yellow]note:[/] {escape(note)}")
    info.print(
        f"[bold]macft serve[/] base {escape(catalog.base_path)}   backend: {describe_backend()}   "
        f"peak memory {device.peak_memory_gb():.2f} GB"
    )
    for s in catalog.names():
        what = "the base" if s.path is None else escape(s.source)
        info.print(f"  [bold]{escape(s.name)}[/]  {what}")
    if len(catalog.names()) - 1 > catalog.max_adapters:
        info.print(
            f"at most {catalog.max_adapters} adapters loaded at once (--max-adapters); "
            "the least recently used makes room"
        )
    key = "  (bearer key required)" if api_key else ""
    info.print(f"OpenAI-compatible API at [bold]{server.url}/v1[/]{key}; Ctrl-C stops")
    # A parent that ignored SIGINT (C's system()) would leave Ctrl-C without effect.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        info.print("stopping ...")
    finally:
        server.close()
    info.print("stopped.")
