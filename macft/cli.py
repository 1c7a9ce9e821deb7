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
@click.option("--force", is_flag=True, help="Start even when the memory plan says it will not fit.")
@click.option(
    "--hosts",
    help="Train on several Macs at once, e.g. mac1.local,mac2.local (batch_size per Mac; "
    "127.0.0.1,127.0.0.1 runs two processes here).",
)
@click.option("--hostfile", help="An mlx.launch hostfile (JSON) instead of --hosts.")
def train(recipe, model, data, out, sets, resume, force, hosts, hostfile):
    """Train LoRA adapters on a base model.

    \b
    macft train --model smollm2-135m --data examples/net.jsonl
    macft train --recipe smollm2-135m-net --set train.iters=200
    macft train --resume --out runs/net
    macft train --recipe r.yaml --hosts mac1.local,mac2.local
    """
    from macft import distributed
    from macft.train import run_train

    if hosts or hostfile:
        from macft.hosts import command_argv, launch

        launch(command_argv(click.get_current_context()), hosts, hostfile)
        return
    world = distributed.init()  # one rank of several when mlx.launch started this process
    shorthands = {"model.path": model, "data.path": data, "out": out}
    with distributed.labelled(world):
        console = Console(quiet=not world.main)
        run_train(recipe, tuple(sets), shorthands, resume, console, force=force, world=world)


@cli.command()
@click.argument("target", required=False)
@click.option("--model", "-m", help="Chat with this model; with a run: the base, if it moved.")
@click.option("--checkpoint", "-c", help="A run's checkpoint: best or step-N (default: final).")
@click.option("--compare", is_flag=True, help="Answer with the base and the fine-tune.")
@click.option("--prompt", "-p", help="Answer this once and exit ('-' reads it from stdin).")
@click.option("--system", "-s", help="System prompt (default: the run's data.system).")
@click.option("--temp", type=click.FloatRange(0, 10), default=0.7, help="Default 0.7; 0 is greedy.")
@click.option("--top-p", type=click.FloatRange(0, 1), default=0.9, help="Default 0.9.")
@click.option("--max-tokens", type=click.IntRange(1), default=512, help="Per answer; default 512.")
@click.option("--seed", type=int, help="Seed each answer's sampling, for reproducible runs.")
def chat(target, model, checkpoint, compare, prompt, system, temp, top_p, max_tokens, seed):
    """Talk to a base model, a fine-tune, or both side by side.

    \b
    macft chat --model smollm2-135m
    macft chat runs/net
    macft chat runs/net --compare
    macft chat runs/net --prompt "show bgp summary in junos?" --temp 0
    """
    from macft.chat_repl import run_chat

    sampling = {"temp": temp, "top_p": top_p, "max_tokens": max_tokens, "seed": seed}
    run_chat(target, model, checkpoint, compare, prompt, system, sampling)


@cli.command()
@click.argument("run")
@click.option("--out", "-o", help="Where the export goes (default RUN/export).")
@click.option(
    "--dtype",
    type=click.Choice(["f16", "bf16", "f32"]),
    help="Float type of the fused weights (default f16; bf16 for bf16 sources, Gemma, --quant bf16).",
)
@click.option(
    "--quantize",
    type=click.Choice(["4", "8"]),
    help="Re-quantize the fused MLX folder to 4 or 8 bits.",
)
@click.option("--gguf", is_flag=True, help="Write one GGUF file and an Ollama Modelfile.")
@click.option(
    "--quant",
    type=click.Choice(["f16", "bf16", "q8_0", "q4_0", "q4_k_m"]),
    help="GGUF type (default f16); q4_k_m is what most Ollama users run.",
)
@click.option(
    "--adapter-only", is_flag=True, help="Export the adapters alone (with --gguf or --peft)."
)
@click.option("--peft", is_flag=True, help="Write a PEFT adapter folder (HF names, lora_alpha).")
@click.option("--checkpoint", "-c", help="best or step-N (default: the final adapters).")
@click.option(
    "--base-weights",
    help="Merge into these weights: a full-precision HF folder, any base model, or 'quantized' "
    "for the run's own quantized base. Default: the run's full-precision source when at hand.",
)
@click.option("--name", help="Ollama model name (default: the run folder's name).")
def fuse(
    run, out, dtype, quantize, gguf, quant, adapter_only, peft, checkpoint, base_weights, name
):
    """Merge a run's adapters into its base: an MLX folder, a GGUF + Modelfile, or PEFT.

    \b
    macft fuse runs/net
    macft fuse runs/net --gguf --quant q4_k_m
    macft fuse runs/net --adapter-only --gguf
    macft fuse runs/net --peft
    """
    from macft.fuse_cmd import run_fuse

    run_fuse(
        run,
        out,
        dtype,
        int(quantize) if quantize else None,
        gguf,
        quant,
        adapter_only,
        peft,
        checkpoint,
        base_weights,
        name,
        Console(soft_wrap=True),  # paths and commands stay whole, ready to copy
    )


@cli.command("eval")
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
def eval_cmd(
    run, data, metric, limit, split_on, case_sensitive, forget_threshold, checkpoint, model
):
    """Did the fine-tune help, and what did it forget? Base vs fine-tune on held-out data.

    \b
    macft eval runs/net --data net_test.jsonl
    macft eval runs/wikisql --data test.jsonl --metric exact --limit 100
    """
    from macft.eval_run import run_eval

    run_eval(
        run, data, metric, limit, split_on, case_sensitive, forget_threshold, checkpoint, model
    )


@cli.command()
@click.argument("run")
@click.option("--out", "-o", help="Where to write the page (default RUN/report.html).")
def report(run, out):
    """Write RUN/report.html: loss curves, eval tables and sample answers on one page."""
    from macft.report import write_report

    path = write_report(run, out)
    click.echo(f"report: {path}")


@cli.command()
@click.argument("folders", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON, for scripts.")
def runs(folders, as_json):
    """List runs: state, steps, best validation loss, size, last update.

    \b
    macft runs                 # the runs under ./runs
    macft runs runs/net other/ --json
    """
    from macft.runs_cmd import list_runs

    list_runs(folders, as_json, Console())


@cli.command()
def models():
    """The models macft knows by name (--model ALIAS)."""
    from macft.info_cmds import print_models

    print_models(Console())


@cli.group(invoke_without_command=True)
@click.pass_context
def recipes(ctx):
    """List the shipped recipes; `macft recipes show NAME` prints one."""
    if ctx.invoked_subcommand is None:
        from macft.info_cmds import print_recipes

        print_recipes(Console())


@recipes.command("show")
@click.argument("name")
def recipes_show(name):
    """Print a shipped recipe (or a recipe file)."""
    from macft.info_cmds import show_recipe

    click.echo(show_recipe(name), nl=False)


@cli.command()
@click.option(
    "--model", "-m", help="Base model: alias, folder or GGUF (weights not needed for aliases)."
)
@click.option("--data", "-d", help="Training data whose lengths decide the sequence length.")
@click.option("--recipe", "-r", help="A recipe file, or the name of a shipped recipe.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a recipe key.")
@click.option(
    "--memory", help="Plan for a Mac with this much memory, e.g. 24GB (default: this machine)."
)
@click.option(
    "--fit", is_flag=True, help="Apply the changes that make it fit and print the recipe."
)
@click.option("--hosts", help="Plan for training on these Macs (macft train --hosts).")
@click.option("--machines", type=click.IntRange(1), help="Plan for training on N Macs.")
def plan(model, data, recipe, sets, memory, fit, hosts, machines):
    """Predict peak memory of a training run, and what to change when it does not fit.

    \b
    macft plan --model llama-3.1-8b --data net.jsonl --memory 24GB
    macft plan --recipe qwen3-8b-24gb --data net.jsonl --fit
    """
    from macft.hosts import machine_count
    from macft.info_cmds import run_plan

    n = machine_count(hosts, machines)
    run_plan(model, data, recipe, sets, memory, fit, Console(width=120), machines=n)


def main():
    backend.reexec_with_fast_blas()
    backend.use_native_kernels()
    cli(prog_name="macft")
