"""Where macft's speed comes from: one training micro-step under each option, on its own.

    python bench/bench_step.py                          # float32 base (OpenBLAS if preloaded)
    python bench/bench_step.py --compute quantized --steps 2
    python bench/bench_step.py --only packed+chunk256,padded+full

SmolLM2-135M, LoRA rank 8 on all linears, wikisql batches of 4 in the trainer's order.
Each option runs the same batches: forward + backward (the optimizer update is the same for
all and left out). Compiled options first see every batch once (one trace per shape).
Prints non-padding input tokens/s, CPU seconds per step (steadier than wall time on a shared
machine) and MLX's peak memory per option.
"""

import argparse
import time
from pathlib import Path

import mlx.core as mx

from macft import device
from macft.config.schema import LoraConfig
from macft.cpu.kernels import use_native_kernels
from macft.cpu.process import describe as describe_backend
from macft.cpu.streams import cpu_streams, plan_cpu_streams
from macft.data.batches import batch_order
from macft.data.dataset import load_data
from macft.lora.apply import apply_lora
from macft.models import load_base
from macft.train.speed import Speed, Stepper

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikisql"
# name -> (pack, loss_chunk, grad_checkpoint, dequantize per matmul, lean ops on a CPU, compile);
# a name ending in +streams also splits each batch over one CPU stream per core.
OPTIONS = {
    "padded+full": (False, 0, False, False, False, False),  # mlx_lm's work, without its compile
    "padded+full+compiled": (False, 0, False, False, False, True),  # mlx_lm's work
    "padded+chunk64": (False, 64, False, False, False, False),
    "packed+full": (True, 0, False, False, False, False),
    "packed+chunk256": (True, 256, False, False, False, False),
    "packed+chunk64": (True, 64, False, False, False, False),
    "packed+chunk64+lean": (True, 64, False, False, True, False),
    "packed+chunk64+lean+compiled": (True, 64, False, False, True, True),
    "packed+chunk64+lean+compiled+streams": (True, 64, False, False, True, True),  # CPU default
    "packed+chunk64+ckpt": (True, 64, True, False, True, False),
    "packed+chunk64+ckpt+compiled": (True, 64, True, False, True, True),
    "packed+chunk64+lean+floatmm+compiled": (True, 64, False, True, True, True),  # 4-bit base
}
QUANTIZED = [
    "padded+full",
    "packed+chunk64+lean+compiled",
    "padded+full+floatmm",
    "packed+chunk64+lean+floatmm",
    "packed+chunk64+lean+floatmm+compiled",
]
OPTIONS["padded+full+floatmm"] = (False, 0, False, True, False, False)
OPTIONS["packed+chunk64+lean+floatmm"] = (True, 64, False, True, True, False)


def speed_of(name: str, n_streams: int) -> Speed:
    """The option as the trainer's speed stack takes it."""
    pack, chunk, ckpt, fmm, lean, compiled = OPTIONS[name]
    streams = n_streams if name.endswith("+streams") else 1
    return Speed(pack, chunk, ckpt, compiled, lean, fmm, streams)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--compute", default="float32", help="model.compute: float32 | quantized")
    p.add_argument("--steps", type=int, default=6, help="micro-batches timed per option")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--only", help="comma-separated option names")
    a = p.parse_args()
    use_native_kernels()  # as `macft train` does: the compiled options' kernels
    names = a.only.split(",") if a.only else list(OPTIONS)[:-3]
    if a.compute == "quantized" and not a.only:
        names = QUANTIZED
    n_streams = cpu_streams(a.batch)
    if n_streams > 1 and any(n.endswith("+streams") for n in names):
        plan_cpu_streams()  # as `macft train` does, before MLX's first evaluation
    base = load_base("smollm2-135m", compute=a.compute)
    apply_lora(base.model, LoraConfig(rank=8, alpha=16, dropout=0.0))
    train, _, _ = load_data(str(DATA), base.tokenizer, 2048, 0.1, 0, None)
    lengths = [len(e.ids) for e in train]
    order = batch_order(len(train), a.batch, 0, 0, lengths)[: a.steps + 1]
    batches = [[train[i] for i in idx] for idx in order]
    pad = base.tokenizer.pad_token_id
    model = base.model
    model.train()
    print(
        f"backend: {describe_backend()}, compute {a.compute}, {a.steps} micro-batches of {a.batch}"
    )
    print(f"{'option':34} {'tokens/s':>9} {'s/step':>7} {'CPU s/step':>10} {'MLX peak GB':>12}")
    for name in names:
        speed = speed_of(name, n_streams)
        with Stepper(model, speed, pad) as stepper:
            # Warm up; a compiled step traces each new shape once (a trainer does it once per
            # shape per run), so it sees all the timed shapes first.
            stepper.grads(batches if speed.compiled else batches[:1])
            mx.clear_cache()
            device.reset_peak_memory()
            t0, c0 = time.perf_counter(), time.process_time()
            _, _, _, tokens = stepper.grads(batches[1:])
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        print(
            f"{name:34} {tokens / dt:9.0f} {dt / a.steps:7.2f} {cpu / a.steps:10.2f} "
            f"{device.peak_memory_gb():12.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
