"""`macft train`: LoRA adapters on a base model, from a recipe, flags and --set overrides."""

import click

from macft.cli.options import computes, console, json_option, set_option
from macft.config.schema import reference_help


@computes
@click.command(
    "train", epilog="\b\nRecipe keys (--set KEY=VALUE), with their defaults:\n" + reference_help()
)
@click.option("--recipe", "-r", help="A recipe file, or the name of a shipped recipe.")
@click.option("--model", "-m", help="Base model: HF/MLX folder, GGUF file or alias (model.path).")
@click.option("--data", "-d", help="A .jsonl file or a folder with train.jsonl (data.path).")
@click.option("--out", "-o", help="Run folder (default runs/<data name>).")
@set_option("Override any recipe key, e.g. train.iters=200 (the keys are listed below).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option(
    "--force",
    is_flag=True,
    help="Start even when the memory plan says it will not fit; with --resume, continue even "
    "with changed data or settings that change the data order or the result.",
)
@click.option(
    "--hosts",
    help="Train on several Macs at once, e.g. mac1.local,mac2.local (batch_size per Mac; "
    "127.0.0.1,127.0.0.1 runs two processes here).",
)
@click.option("--hostfile", help="An mlx.launch hostfile (JSON) instead of --hosts.")
@json_option("Print the final summary as JSON on stdout; the log goes to stderr.")
def command(recipe, model, data, out, sets, resume, force, hosts, hostfile, as_json):
    """Train LoRA adapters on a base model.

    \b
    macft train --model smollm2-135m --data examples/net.jsonl
    macft train --recipe smollm2-135m-net --set train.iters=200
    macft train --resume --out runs/net
    macft train --recipe r.yaml --hosts mac1.local,mac2.local
    """
    from macft.console import print_json
    from macft.train.parallel import world as parallel
    from macft.train.session import run_train

    if hosts or hostfile:
        from macft.train.parallel.hosts import command_argv, launch

        launch(command_argv(click.get_current_context()), hosts, hostfile)
        return
    world = parallel.init()  # one rank of several when mlx.launch started this process
    shorthands = {"model.path": model, "data.path": data, "out": out}
    with parallel.labelled(world):
        log = console(stderr=as_json, quiet=not world.main)
        summary = run_train(recipe, tuple(sets), shorthands, resume, log, force=force, world=world)
    if as_json and world.main:
        print_json(summary)
