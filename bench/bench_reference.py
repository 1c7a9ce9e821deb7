"""DPO's reference log-probabilities: cached once per pair, or computed again in every step?

    python bench/bench_reference.py                    # float32 base (OpenBLAS if preloaded)
    python bench/bench_reference.py --steps 4 --compute quantized

SmolLM2-135M, LoRA rank 8 on all linears, wikisql-pref pairs in micro-batches of 4 in the
trainer's order, the trainer's speed stack for this machine. Per micro-batch it prints the
training step (forward + backward, the reference already cached), the reference pass as a
same-step reference would add it to every step (the batch's rows, LoRA off, no gradient) and
as the cache computes it (each pair alone, once per pair, whatever the number of epochs), op
by op and compiled as the trainer runs it (one trace per padded width, paid once).
Wall and CPU seconds (steadier on a shared machine).
"""

import argparse
import time
from pathlib import Path

import mlx.core as mx

from macft.config.schema import LoraConfig, TrainConfig
from macft.cpu.kernels import use_native_kernels
from macft.cpu.process import describe as describe_backend
from macft.cpu.streams import cpu_streams, plan_cpu_streams
from macft.data.batches import batch_order, example_tokens, make_pair_batch
from macft.data.dataset import load_data
from macft.lora.apply import apply_lora, lora_disabled
from macft.models import load_base
from macft.train.preference import Reference, preference_loss, row_logps
from macft.train.speed import Speed, Stepper

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikisql-pref"


class Timer:
    def __enter__(self):
        self.t, self.c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.t, time.process_time() - self.c


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--compute", default="float32", help="model.compute: float32 | quantized")
    p.add_argument("--steps", type=int, default=6, help="micro-batches timed")
    p.add_argument("--batch", type=int, default=4, help="pairs per micro-batch")
    a = p.parse_args()
    use_native_kernels()  # as `macft train` does
    if cpu_streams(a.batch) > 1:
        plan_cpu_streams()  # as `macft train` does, before MLX's first evaluation
    base = load_base("smollm2-135m", compute=a.compute)
    model, pad = base.model, base.tokenizer.pad_token_id
    apply_lora(model, LoraConfig(rank=8, alpha=16, dropout=0.0))
    train, _, _ = load_data(str(DATA), base.tokenizer, 512, 0.0, 0, None, method="dpo")
    order = batch_order(len(train), a.batch, 0, 0, [example_tokens(e) for e in train])
    batches = [[train[i] for i in idx] for idx in order[: a.steps + 1]]
    cfg = TrainConfig(method="dpo", batch_size=a.batch, grad_checkpoint=False)
    speed = Speed.choose(cfg, model)
    model.train()
    print(f"backend: {describe_backend()}, compute {a.compute}, {a.steps} micro-batches of "
          f"{a.batch} pairs, {speed.describe(cfg, 'llama', a.compute)}")  # fmt: skip
    ref = Reference(model, pad, speed.loss_chunk, speed.compiled)  # as the trainer builds it
    plain = Reference(model, pad, speed.loss_chunk)  # op by op

    def forget():
        for b in batches:
            for pair in b:
                pair.ref = None

    with Stepper(model, speed, pad, preference_loss(cfg), prepare=ref.fill_batches) as stepper:
        with Timer() as first:  # the compiled reference's traces, once per width
            ref.fill_batches(batches[1:])
        stepper.grads(batches)  # warm up: every step shape traced once
        forget()
        with Timer() as cached:  # what the cache costs, once per pair
            plain.fill_batches(batches[1:])
        forget()
        with Timer() as compiled:
            ref.fill_batches(batches[1:])
        with Timer() as step:
            stepper.grads(batches[1:])
        with Timer() as same:  # what a same-step reference adds to every step
            for b in batches[1:]:
                with lora_disabled(model):
                    mx.eval(row_logps(model, make_pair_batch(b, pad), speed.loss_chunk)[0])
    n = a.steps
    print(f"{'per micro-batch':44} {'s':>6} {'CPU s':>6}")
    rows = [
        ("training step (reference cached)", step),
        ("reference, same step (batch rows, no grad)", same),
        ("reference, cached (each pair alone, once)", cached),
        ("  the same, compiled (as the trainer runs it)", compiled),
        ("  its first pass, with the traces", first),
    ]
    for name, t in rows:
        print(f"{name:44} {t.wall / n:6.2f} {t.cpu / n:6.2f}")
    print(
        f"same-step reference: +{100 * same.wall / step.wall:.0f}% on every step of every epoch; "
        f"cached: +{100 * cached.wall / step.wall:.0f}% (compiled +{100 * compiled.wall / step.wall:.0f}%) "
        "on a pair's first step only"
    )


if __name__ == "__main__":
    main()
