"""How long a run is and its learning rate at each step; per-step seeds for dropout."""

import math

import numpy as np

from macft.config.schema import DEFAULT_EPOCHS
from macft.data.batches import batches_per_epoch


def total_steps(cfg, n_train: int) -> int:
    if cfg.iters is not None:
        return cfg.iters
    epochs = cfg.epochs if cfg.epochs is not None else DEFAULT_EPOCHS
    per_epoch = batches_per_epoch(n_train, cfg.batch_size)
    return max(1, math.ceil(epochs * per_epoch / cfg.grad_accumulation))


def lr_at(step: int, cfg, total: int) -> float:
    """Learning rate of optimizer step `step` (1-based): linear warmup from 0, then cosine decay
    reaching min_lr_ratio * lr exactly at the last step (or constant)."""
    lr = cfg.learning_rate
    warmup = min(cfg.warmup, total)
    if step <= warmup:
        return lr * step / warmup
    if cfg.schedule == "constant" or total <= warmup:
        return lr
    progress = (step - warmup) / (total - warmup)
    low = lr * cfg.min_lr_ratio
    return low + (lr - low) * 0.5 * (1 + math.cos(math.pi * progress))


def micro_seed(seed: int, step: int, micro: int, rank: int = 0) -> int:
    # Dropout masks depend on (seed, step, micro-batch) only, so a resumed run draws the same;
    # each data-parallel rank draws its own.
    key = [seed, step, micro] + ([rank] if rank else [])
    return int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0])
