"""`macft report`: one HTML page with a run's curves, eval tables and sample answers."""

import click


@click.command("report")
@click.argument("run")
@click.option("--out", "-o", help="Where to write the page (default RUN/report.html).")
def command(run, out):
    """Write RUN/report.html: loss curves, eval tables and sample answers on one page."""
    from macft.report.page import write_report

    path = write_report(run, out)
    click.echo(f"report: {path}")
