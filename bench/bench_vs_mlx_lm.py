"""macft train vs mlx_lm lora on the same LoRA job: tokens/s, peak memory, validation loss.

    python bench/bench_vs_mlx_lm.py                      # both settings, default iterations
    python bench/bench_vs_mlx_lm.py --setting float32 --iters 30
    python bench/bench_vs_mlx_lm.py --setting 4bit --iters 3 --only macft --set train.pack=false

The job: SmolLM2-135M-Instruct (the PyPI GGUF), ../shared/data/wikisql ({"text"}), LoRA rank 8,
alpha 16 (scale 2.0), dropout 0 on all 7 linears of all 30 layers, Adam lr 2e-4 constant,
batch 4, the same number of iterations for both. Each tool runs in its own process, one after
the other. Validation loss is measured afterwards by this script, with one evaluator for both:
each tool's adapters on the float32 base, whole valid.jsonl.

Settings: "float32" = the base dequantized to float32; "4bit" = the GGUF's 4-bit weights (Q4_1,
8-bit embedding) kept quantized (model.compute=quantized; scales float32 for both tools).
OpenBLAS is preloaded for both tools in both. mlx_lm computes the 4-bit setting with MLX's CPU
quantized matmul (~75 s/step), so it runs few iterations (--iters-4bit).
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "wikisql"
OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"
LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]  # fmt: skip
RANK, ALPHA, LR, BATCH = 8, 16, 2e-4, 4

# mlx_lm's own trainer, unchanged; atexit prints MLX's peak-memory counter (it reports none).
MLX_LM_RUNNER = (
    "import atexit, sys, mlx.core as mx\n"
    "atexit.register(lambda: print(f'MLX_PEAK_BYTES {mx.get_peak_memory()}', flush=True))\n"
    "sys.argv = ['mlx_lm.lora', '-c', sys.argv[1]]\n"
    "from mlx_lm.lora import main\n"
    "main()\n"
)


def run_child(cmd: list[str], env: dict, log: Path) -> tuple[str, float, float, float]:
    """(output, wall s, max RSS GB, CPU s) of one child process (wait4 gives its own rusage).

    CPU seconds are less sensitive than wall time to other work on a shared machine.
    """
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    out = re.sub(r"\x1b\[[0-9;]*m", "", log.read_text())  # rich's colours
    if proc.returncode != 0:
        sys.exit(f"{cmd[:4]} failed ({proc.returncode}); log {log}:\n{out[-3000:]}")
    return out, wall, usage.ru_maxrss * 1024 / 1e9, usage.ru_utime + usage.ru_stime  # KiB


def child_env() -> dict:
    """OpenBLAS preloaded for both tools in both settings (MLX's CPU float matmuls use it)."""
    env = dict(os.environ, MACFT_NO_OPENBLAS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("LD_PRELOAD", None)
    if Path(OPENBLAS).exists():
        env["LD_PRELOAD"] = OPENBLAS
    return env


def mlx_folder(setting: str, work: Path, scales: str) -> Path:
    """SmolLM2 as an MLX folder mlx_lm reads: float32, or the GGUF's 4/8-bit weights."""
    import mlx.core as mx

    from macft.export.mlx_folder import save_mlx_folder
    from macft.models import load_base
    from macft.models.quant import cast_floats

    scales = "bfloat16" if setting == "mac" else scales  # a Mac computes in 16 bits
    name = "float32" if setting == "float32" else f"4bit-{scales}"
    out = work / f"smollm2-{name}"
    if (out / "config.json").exists():
        return out
    base = load_base("smollm2-135m", compute="float32" if setting == "float32" else "quantized")
    if setting != "float32" and scales in ("float16", "bfloat16"):
        dtype = getattr(mx, scales)  # float16 as the GGUF stores them; bfloat16 as macft's Mac path
        cast_floats(base.model, dtype, lambda name: True)
        base.config["torch_dtype"] = scales
    save_mlx_folder(base, out)
    return out


def run_mlx_lm(setting: str, folder: Path, iters: int, work: Path) -> dict:
    adapters = work / f"mlx_lm-{setting}"
    shutil.rmtree(adapters, ignore_errors=True)
    cfg = {
        "model": str(folder),
        "train": True,
        "data": str(DATA),
        "fine_tune_type": "lora",
        "optimizer": "adam",
        "num_layers": -1,
        "batch_size": BATCH,
        "iters": iters,
        "val_batches": 1,  # its own val loss is not the figure we compare (see evaluate)
        "learning_rate": LR,
        "steps_per_report": iters,  # one report: tokens/s over all steps, evals excluded
        "steps_per_eval": 10**9,
        "save_every": 10**9,
        "adapter_path": str(adapters),
        "max_seq_length": 2048,
        "grad_checkpoint": False,
        "seed": 0,
        "lora_parameters": {"keys": LINEARS, "rank": RANK, "scale": ALPHA / RANK, "dropout": 0.0},
    }
    cfg_path = work / f"mlx_lm-{setting}.yaml"
    cfg_path.write_text(json.dumps(cfg))  # JSON is YAML
    cmd = [sys.executable, "-c", MLX_LM_RUNNER, str(cfg_path)]
    out, wall, rss, cpu = run_child(cmd, child_env(), work / f"mlx_lm-{setting}.log")
    # the report line: "  <it>    <loss> ▼    <tokens/s>    <trained>k"
    row = re.findall(rf"^\s*{iters}\s+([\d.]+) \S\s+([\d,]+)\s+([\d.]+)k", out, re.M)
    loss, tps, trained_k = row[-1]
    return {
        "tool": "mlx_lm lora",
        "tokens_per_s": float(tps.replace(",", "")),
        "trained_tokens": round(float(trained_k) * 1000),
        "train_loss": float(loss),
        "peak_gb": int(re.findall(r"MLX_PEAK_BYTES (\d+)", out)[-1]) / 1e9,
        "max_rss_gb": rss,
        "wall_s": wall,
        "cpu_s": cpu,
        "adapters": adapters,
    }


def run_macft(setting: str, iters: int, work: Path, extra: list[str], ckpt: bool) -> dict:
    label = "macft-ckpt" if ckpt else "macft"
    out_dir = work / f"{label}-{setting}"
    shutil.rmtree(out_dir, ignore_errors=True)  # this benchmark's own folder, from a past run
    sets = {
        "lora.rank": RANK, "lora.alpha": ALPHA, "lora.dropout": 0.0, "lora.targets": "all-linear",
        "lora.layers": "all", "data.max_seq_length": 2048, "train.iters": iters,
        "train.batch_size": BATCH, "train.grad_accumulation": 1, "train.learning_rate": LR,
        "train.warmup": 0, "train.schedule": "constant", "train.max_grad_norm": 0,
        "train.eval_every": 0, "train.eval_batches": 1, "train.save_every": 0,
        "train.grad_checkpoint": ckpt, "train.report_every": iters,
        "model.compute": "float32" if setting == "float32" else "quantized",
    }  # fmt: skip
    cmd = [sys.executable, "-m", "macft", "train", "--model", "smollm2-135m", "--data", str(DATA)]
    cmd += ["--out", str(out_dir)]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    for item in extra:
        cmd += ["--set", item]
    env = {**child_env(), **({"MACFT_MAC_PATH": "1"} if setting == "mac" else {})}
    text, wall, rss, cpu = run_child(cmd, env, work / f"{label}-{setting}.log")
    rows = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if r["step"] == iters][-1]
    return {
        "tool": "macft train" + (" +ckpt" if ckpt else ""),
        "tokens_per_s": last["tokens_per_s"],
        "trained_tokens": last["trained_tokens"],
        "train_loss": last["train_loss"],
        "peak_gb": last["peak_memory_gb"],
        "max_rss_gb": rss,
        "wall_s": wall,
        "cpu_s": cpu,
        "adapters": out_dir,
        "log": text,
    }


def val_losses(folder: Path, adapter_dirs: list[Path | None]) -> list[float]:
    """Token-weighted validation loss of each adapter set on the same base and valid.jsonl."""
    from mlx_lm import load

    from macft.data.dataset import load_data
    from macft.train.evaluate import evaluate

    out = []
    for adapters in adapter_dirs:
        model, tok = load(str(folder), adapter_path=str(adapters) if adapters else None)
        _, valid, _ = load_data(str(DATA), tok, 2048, 0.1, 0, None)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        out.append(evaluate(model, valid, BATCH, pad))
    return out


def table(setting: str, iters: int, rows: list[dict]) -> str:
    cols = ["tool", "tokens/s", "trained tok", "MLX peak GB", "max RSS GB", "val loss", "wall s",
            "CPU s"]  # fmt: skip
    lines = [f"\n== {setting}: {iters} iterations of batch {BATCH} ==", " | ".join(cols)]
    for r in rows:
        lines.append(
            f"{r['tool']} | {r['tokens_per_s']:.3g} | {r['trained_tokens']} | {r['peak_gb']:.3f} | "
            f"{r['max_rss_gb']:.3f} | {r.get('val_loss', float('nan')):.4f} | {r['wall_s']:.0f} | {r['cpu_s']:.0f}"
        )
    base = rows[0] if rows and rows[0]["tool"].startswith("mlx_lm") else None
    for m in rows[1:] if base else []:
        b = base
        lines.append(
            f"{m['tool']} / mlx_lm: tokens/s x{m['tokens_per_s'] / b['tokens_per_s']:.2f}, "
            f"MLX peak x{m['peak_gb'] / b['peak_gb']:.2f}, max RSS x{m['max_rss_gb'] / b['max_rss_gb']:.2f}, "
            f"val loss {m.get('val_loss', 0) - b.get('val_loss', 0):+.4f}"
        )
    return "\n".join(lines)


def main() -> None:
    global BATCH  # --batch sets the job's batch for every tool and the evaluator
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--setting", choices=["float32", "4bit", "mac", "both"], default="both",
                   help="mac: macft's Mac path (MACFT_MAC_PATH=1, bfloat16) vs mlx_lm on a "
                   "bfloat16 4-bit folder: both on MLX's quantized kernels")  # fmt: skip
    p.add_argument("--batch", type=int, default=BATCH, help="examples per step (default 4)")
    p.add_argument("--iters", type=int, help="iterations for every setting chosen")
    p.add_argument("--iters-float32", type=int, default=30)
    p.add_argument("--iters-4bit", type=int, default=3, help="~75 s/step for mlx_lm here")
    p.add_argument("--only", choices=["mlx_lm", "macft"], help="run one tool")
    p.add_argument("--mlx-lm-scales", choices=["float16", "float32"], default="float32",
                   help="4bit: scales of mlx_lm's folder; float32 = what macft computes with "
                   "(MLX's CPU kernel is much slower with float16)")  # fmt: skip
    p.add_argument("--set", dest="sets", action="append", default=[], help="extra macft --set")
    p.add_argument("--no-ckpt", dest="ckpt", action="store_false",
                   help="skip the extra macft run with gradient checkpointing")  # fmt: skip
    p.add_argument("--work", type=Path, help="keep folders and logs here (default: a temp dir)")
    p.add_argument("--json", type=Path, help="append the results as JSON lines here")
    a = p.parse_args()
    BATCH = a.batch
    if not DATA.is_dir():
        sys.exit(f"{DATA} is missing: the benchmark needs ../shared/data/wikisql")
    work = a.work or Path(tempfile.mkdtemp(prefix="macft-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    settings = ["float32", "4bit"] if a.setting == "both" else [a.setting]
    float_folder = mlx_folder("float32", work, a.mlx_lm_scales)  # the common evaluator's base
    report = []
    for setting in settings:
        iters = a.iters or (a.iters_float32 if setting == "float32" else a.iters_4bit)
        folder = mlx_folder(setting, work, a.mlx_lm_scales)
        rows = []
        tools = ["mlx_lm", "macft"] + (["macft-ckpt"] if a.ckpt else [])
        for tool in tools:
            if a.only in (None, tool.split("-")[0]):
                print(f"[{setting}] {tool}: {iters} iterations ...", flush=True)
                if tool == "mlx_lm":
                    rows.append(run_mlx_lm(setting, folder, iters, work))
                else:
                    rows.append(run_macft(setting, iters, work, a.sets, tool == "macft-ckpt"))
        vals = val_losses(float_folder, [r["adapters"] for r in rows])
        for r, v in zip(rows, vals, strict=True):
            r["val_loss"] = v
        report.append(table(setting, iters, rows))
        print(report[-1], flush=True)
        if a.json:
            with open(a.json, "a") as f:
                for r in rows:
                    keep = {k: v for k, v in r.items() if k not in ("adapters", "log")}
                    f.write(
                        json.dumps({"setting": setting, "iters": iters, "sets": a.sets, **keep})
                        + "\n"
                    )
    print("\n".join(report))
    print(f"\nlogs and folders: {work}")


if __name__ == "__main__":
    main()
