"""`macft fuse`: a run's adapters merged into its base, as an MLX or HF folder, a GGUF or PEFT."""

import click

from macft.cli.options import computes, console
from macft.export import CHECK_EXAMPLES
from macft.export.gguf import QTYPES


@computes
@click.command("fuse")
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
    type=click.Choice(QTYPES),
    help="GGUF type (default f16); q4_k_m is what most Ollama users run.",
)
@click.option(
    "--adapter-only", is_flag=True, help="Export the adapters alone (with --gguf or --peft)."
)
@click.option("--peft", is_flag=True, help="Write a PEFT adapter folder (HF names, lora_alpha).")
@click.option(
    "--hf",
    is_flag=True,
    help="Write the fused model as a Hugging Face folder (transformers, vLLM).",
)
@click.option("--checkpoint", "-c", help="best or step-N (default: the final adapters).")
@click.option(
    "--base-weights",
    help="Merge into these weights: a full-precision HF folder, any base model, or 'quantized' "
    "for the run's own quantized base. Default: the run's full-precision source when at hand.",
)
@click.option("--name", help="Ollama model name (default: the run folder's name).")
@click.option(
    "--force", is_flag=True, help="Replace files in --out that macft did not write there."
)
@click.option(
    "--check",
    type=click.IntRange(min=1),
    default=CHECK_EXAMPLES,
    show_default=True,
    metavar="N",
    help="After writing, compare each export with the adapters on N held-out examples.",
)
@click.option("--no-check", is_flag=True, help="Skip the comparison.")
@click.option(
    "--check-data",
    type=click.Path(dir_okay=True),
    help="Compare on these examples (.jsonl or a folder) instead of the run's held-out data.",
)
def command(
    run, out, dtype, quantize, gguf, quant, adapter_only, peft, checkpoint, base_weights, name,
    force, hf, check, no_check, check_data,
):  # fmt: skip
    """Merge a run's adapters into its base: an MLX folder, a GGUF + Modelfile, or PEFT.

    \b
    macft fuse runs/net
    macft fuse runs/net --gguf --quant q4_k_m
    macft fuse runs/net --adapter-only --gguf
    macft fuse runs/net --peft
    macft fuse runs/net --hf

    Each export is then compared with the adapters on a few held-out examples (GGUF files in
    llama.cpp): next-token agreement, held-out loss, greedy answers; a warning says when an
    export lost the fine-tune. Written to export/fidelity.json.
    """
    from macft.export.fuse import run_fuse

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
        console(soft_wrap=True),  # paths and commands stay whole, ready to copy
        force,
        hf=hf,
        check=None if no_check else check,
        check_data=check_data,
    )
