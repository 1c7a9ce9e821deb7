"""One CPU stream per core: how many a training micro-batch is split over, and MLX's op order."""

import os

from macft import device

NO_CPU_STREAMS_ENV = "MACFT_NO_CPU_STREAMS"


def cpu_streams(examples: int) -> int:
    """Over how many CPU streams a training micro-batch is split: one per core, or 1 (no split).

    MLX runs everything but the BLAS matmuls one op at a time on one thread; on a CPU that is
    a third of a training step. Two halves of a batch on two streams keep both cores busy
    (OpenBLAS then gets one thread per stream). Only when every core gets an example, else
    one stream with a threaded BLAS does better. Opt out with MACFT_NO_CPU_STREAMS=1.
    """
    if device.mac_path() or os.environ.get(NO_CPU_STREAMS_ENV):
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return cores if 2 <= (cores or 1) <= examples else 1


def stream_count(cfg, world_size: int = 1, quantized: bool = False) -> int:
    """cpu_streams for a run with these settings; 1: not split.

    Not with checkpointing: the breadth-first order the streams need (plan_cpu_streams)
    runs the recomputed layers early, and the peak doubled (SmolLM2, batch 4: 0.76 -> 1.50 GB).
    Not on a quantized base: each part would dequantize every matrix for itself (peak +16%).
    """
    if cfg.grad_checkpoint or world_size > 1 or quantized:
        return 1
    return cpu_streams(cfg.batch_size)


def plan_cpu_streams() -> None:
    """Have MLX order its work breadth-first, so the streams' ops alternate.

    MLX builds each evaluation's op list breadth-first but at most 20 wide; the split batch's
    ~800 gradients are wider, so one half's ops came in long runs while the other stream sat
    idle (SmolLM2, 2 cores: 101 tokens/s at width 200, 151 unbounded). MLX reads the setting
    at its first evaluation, so this runs before a model loads.
    """
    os.environ.setdefault("MLX_BFS_MAX_WIDTH", "1000000")
