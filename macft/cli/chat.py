"""`macft chat`: talk to a base model, a fine-tune, or both side by side."""

import click

from macft.cli.options import computes, console


@computes
@click.command("chat")
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
def command(target, model, checkpoint, compare, prompt, system, temp, top_p, max_tokens, seed):
    """Talk to a base model, a fine-tune, or both side by side.

    \b
    macft chat --model smollm2-135m
    macft chat runs/net
    macft chat runs/net --compare
    macft chat runs/net --prompt "show bgp summary in junos?" --temp 0
    """
    from macft.inference.repl import run_chat

    sampling = {"temp": temp, "top_p": top_p, "max_tokens": max_tokens, "seed": seed}
    out, err = console(highlight=False), console(stderr=True, highlight=False)
    run_chat(target, model, checkpoint, compare, prompt, system, sampling, out, err)
