"""`macft eval`: base vs fine-tune on held-out data: loss, answers, forgetting, overfitting."""

import click

from macft.cli.options import computes, console, json_option


@computes
@click.command("eval")
@click.argument("run")
@click.option("--data", "-d", required=True, help="Held-out .jsonl file (same formats as train).")
@click.option(
    "--metric",
    default="loss",
    show_default=True,
    help="loss, or answers scored by exact, contains, f1 or all (comma-separated).",
)
@click.option("--limit", type=click.IntRange(1), help="Only the first N examples.")
@click.option(
    "--split-on",
    default="A: ",
    show_default=True,
    help="Text data: the reference answer is what follows the last occurrence of this.",
)
@click.option("--case-sensitive", is_flag=True, help="Exact/contains/F1 respect case.")
@click.option(
    "--forget-threshold",
    type=click.FloatRange(0),
    default=10.0,
    show_default=True,
    help="Warn when general-text perplexity grows more than this many percent.",
)
@click.option("--checkpoint", "-c", help="best or step-N (default: the final adapters).")
@click.option("--model", "-m", help="The base model, if it moved since training.")
@json_option("Print the summary as JSON on stdout; the table and notes go to stderr.")
def command(
    run, data, metric, limit, split_on, case_sensitive, forget_threshold, checkpoint, model, as_json
):
    """Did the fine-tune help, and what did it forget? Base vs fine-tune on held-out data.

    \b
    macft eval runs/net --data net_test.jsonl
    macft eval runs/wikisql --data test.jsonl --metric exact --limit 100
    """
    from macft.console import print_json
    from macft.inference.evaluation import run_eval

    args = run, data, metric, limit, split_on, case_sensitive, forget_threshold, checkpoint, model
    summary = run_eval(*args, console=console(stderr=as_json))
    if as_json:
        print_json(summary)
