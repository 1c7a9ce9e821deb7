"""Do the GGUF exports keep the fine-tune? Held-out loss and greedy exact match, llama.cpp vs MLX.

    macft train --recipe smollm2-135m-wikisql --set model.compute=float32 --set train.iters=300 --out runs/wikisql
    python bench/bench_export_fidelity.py runs/wikisql
    python bench/bench_export_fidelity.py runs/wikisql --quants q4_k_m --limit 20

For each GGUF type the run is fused (`macft fuse --gguf --quant Q`, into a temp folder) and
run by llama.cpp on the held-out lines (default ../shared/data/wikisql/valid.jsonl): its loss
on each line's last answer tokens (the fidelity check's sample: the question's end and the SQL),
greedy answers scored by exact match against the true SQL, and how often its next token and
its greedy answer are the adapters'. The base and the adapters are scored the same way in MLX; and, for a run
on a GGUF base, the adapters as a GGUF LoRA on that very file (`macft fuse --adapter-only --gguf`).
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

from macft.console import make_console
from macft.export import fidelity
from macft.export.fuse import run_fuse
from macft.export.llamacpp import LlamaCpp
from macft.inference.scoring import exact_match
from macft.runs.folder import RunDir
from macft.runs.model import load_run_model

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikisql" / "valid.jsonl"


def exact(side: fidelity.Side, s: fidelity.Sample) -> float:
    hits = [exact_match(a, c.reference) for a, c in zip(side.answers, s.cases, strict=True)]
    return sum(hits) / max(len(hits), 1)


def row(name: str, side, s, r: dict | None = None) -> list[str]:
    """A table row; r: fidelity.compare's result against the adapters, if any."""
    agree = f"{r['next_token_agreement']:.1%}" if r else "-"
    same = f"{r['greedy_same']}/{r['greedy_compared']}" if r else "-"
    return [name, f"{side.loss:.4f}", f"{exact(side, s):.0%}", agree, same]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--quants", nargs="+", default=["f16", "q8_0", "q4_k_m"])
    ap.add_argument(
        "--no-adapter", dest="adapter", action="store_false",
        help="skip the GGUF LoRA on the run's own base GGUF",
    )  # fmt: skip
    args = ap.parse_args()

    start = time.time()
    cm = load_run_model(args.run)
    s = fidelity.sample(RunDir(args.run), cm.tokenizer, args.limit, args.data)
    adapters = fidelity.mlx_side(cm.model, cm.tokenizer, s, lora=True)
    base = fidelity.mlx_side(cm.model, cm.tokenizer, s, lora=False)
    tokenizer = cm.tokenizer
    del cm
    fidelity.release()
    print(
        f"{s.source}; {len(s.cases)} answers; MLX scored in {time.time() - start:.0f} s",
        flush=True,
    )
    rows = [row("base (MLX)", base, s)]
    rows.append(row("adapters (MLX)", adapters, s, fidelity.compare(adapters, adapters, base)))
    quiet = make_console(quiet=True)
    source = json.loads((Path(args.run) / "base.json").read_text())
    lora_on = [None] if source.get("kind") == "gguf" and args.adapter else []
    for quant in [*args.quants, *lora_on]:
        t = time.time()
        with tempfile.TemporaryDirectory() as tmp:
            if quant is None:  # the adapters as a GGUF LoRA on the base GGUF the run trained on
                run_fuse(args.run, tmp, gguf=True, adapter_only=True, check=None, console=quiet)
                (lora,) = Path(tmp).glob("*-lora.gguf")
                llama = LlamaCpp(Path(source["path"]), lora=lora, n_ctx=1024)
                name = f"{Path(source['path']).name} + GGUF LoRA (llama.cpp)"
            else:
                run_fuse(args.run, tmp, gguf=True, quant=quant, check=None, console=quiet)
                (gguf,) = Path(tmp).glob("*.gguf")
                llama = LlamaCpp(gguf, n_ctx=1024)
                name = f"GGUF {quant} (llama.cpp)"
            side = fidelity.llamacpp_side(llama, tokenizer, s)
            llama.close()
        r = fidelity.compare(side, adapters, base)
        kept = "-" if r["kept"] is None else f"{r['kept']:.0%}"
        rows.append([*row(name, side, s, r), kept])
        print(f"{name}: {time.time() - t:.0f} s", flush=True)
    head = ["model", "loss", "exact SQL", "next token = adapters'", "greedy = adapters'", "kept"]
    widths = [max(len(str(r[i])) if i < len(r) else 0 for r in [head, *rows]) for i in range(6)]
    for r in [head, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=False)))


if __name__ == "__main__":
    main()
