"""How fast macft.kquant encodes: MB/s of float32 input for one 4096x4096 matrix per K-quant type.

    python bench/bench_kquant.py                 # Q4_K, Q5_K, Q6_K, and gguf-py's Q8_0 for scale
    python bench/bench_kquant.py --rows 1024 --repeat 3 --threads 1

Prints wall and CPU seconds (CPU time is steadier on a shared machine), MB/s of float32 input per
wall second and per CPU second, and the wall time an 8B model's ~7e9 weights would take.
"""

import argparse
import time
from functools import partial

import gguf
import numpy as np

from macft.export.gguf.kquant import quantize_q4_k, quantize_q5_k, quantize_q6_k

ENCODERS = {"Q4_K": quantize_q4_k, "Q5_K": quantize_q5_k, "Q6_K": quantize_q6_k}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=2, help="best of this many runs")
    ap.add_argument("--threads", type=int, default=None, help="default: kquant's (up to 8 cores)")
    args = ap.parse_args()
    x = (np.random.default_rng(0).standard_t(3, (args.rows, args.cols)) * 0.02).astype(np.float32)
    mb = x.nbytes / 1e6
    print(f"{args.rows}x{args.cols} float32 ({mb:.0f} MB), best of {args.repeat}")
    encoders = {k: partial(fn, threads=args.threads) for k, fn in ENCODERS.items()}
    encoders["Q8_0 (gguf-py)"] = partial(gguf.quants.quantize, qtype=gguf.GGMLQuantizationType.Q8_0)
    for name, fn in encoders.items():
        best_wall = best_cpu = float("inf")
        for _ in range(args.repeat):
            w0, c0 = time.perf_counter(), time.process_time()
            fn(x)
            best_wall = min(best_wall, time.perf_counter() - w0)
            best_cpu = min(best_cpu, time.process_time() - c0)
        print(
            f"{name:15s} wall {best_wall:5.2f} s ({mb / best_wall:6.1f} MB/s)"
            f"  cpu {best_cpu:5.2f} s ({mb / best_cpu:6.1f} MB/s)"
            f"  7e9 weights: ~{7e9 / x.size * best_wall / 60:.0f} min"
        )


if __name__ == "__main__":
    main()
