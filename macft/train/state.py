"""A run's counters between steps: position, best validation loss, the sums behind each report.

Saved whole in every checkpoint's state.json (the field names are its keys), so a resumed run
continues the same data order, schedule, early stopping and report sums.
"""

import math
import time
from dataclasses import asdict, dataclass, field, fields

from macft import device
from macft.train.preference import STATS


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    index: int = 0  # next micro-batch in this epoch's batch order
    best_val_loss: float | None = None
    best_step: int | None = None
    evals_since_best: int = 0
    val_loss: float | None = None
    trained_tokens: int = 0
    elapsed_s: float = 0.0
    skipped_steps: int = 0  # steps whose loss or gradients were not finite (train/divergence)
    bad_in_row: int = 0
    # since the last report, kept in checkpoints so reports after a resume match
    pending_loss: float = 0.0
    pending_targets: int = 0
    pending_tokens: int = 0
    pending_time: float = 0.0
    pending_stats: list = field(default_factory=list)  # preference pairs: train/preference.STATS

    @classmethod
    def from_saved(cls, saved: dict) -> "TrainState":
        """The state a checkpoint's state.json holds (keys it lacks keep their start value)."""
        return cls(**{f.name: saved[f.name] for f in fields(cls) if f.name in saved})

    def saved(self, **extra) -> dict:
        return {**asdict(self), **extra}

    def commit(self, step: int, epoch: int, index: int, loss: float, targets: int, tokens: int,
               seconds: float, stats: list | None = None) -> None:  # fmt: skip
        """One optimizer step done: the data position moves on, the report sums grow."""
        if stats is not None:
            old = self.pending_stats or [0.0] * len(stats)
            self.pending_stats = [a + b for a, b in zip(old, stats, strict=True)]
        self.step, self.epoch, self.index = step, epoch, index
        self.trained_tokens += tokens
        self.pending_loss += loss
        self.pending_targets += targets
        self.pending_tokens += tokens
        self.pending_time += seconds

    def is_best(self, val: float) -> bool:
        """Would this validation loss be the best so far? (NaN never is.)"""
        return math.isfinite(val) and (self.best_val_loss is None or val < self.best_val_loss)

    def record_val(self, val: float) -> None:
        """Note a validation loss; call it once the best adapters, if these are, are saved: a
        checkpoint must never name a best step that checkpoints/best does not hold."""
        if self.is_best(val):
            self.best_val_loss, self.best_step, self.evals_since_best = val, self.step, 0
        else:
            self.evals_since_best += 1
        self.val_loss = val

    def should_stop(self, patience: int) -> bool:
        """Early stopping: `patience` evaluations in a row without a better validation loss."""
        return bool(patience) and self.evals_since_best >= patience

    def best(self) -> dict:
        return {"best_val_loss": self.best_val_loss, "best_step": self.best_step}

    def report(self, lr: float, total: int, per_epoch: int, val, final: bool) -> dict:
        """The metrics record for the callback and metrics.jsonl; resets the since-report sums."""
        record = {
            "step": self.step,
            "total_steps": total,
            "epoch": round(self.epoch + self.index / per_epoch, 4),
            "train_loss": self.pending_loss / self.pending_targets
            if self.pending_targets
            else None,
            "learning_rate": lr,
            "tokens_per_s": self.pending_tokens / self.pending_time if self.pending_time else 0.0,
            "trained_tokens": self.trained_tokens,
            "peak_memory_gb": device.peak_memory_gb(),
            **device.memory_gb(),
            "elapsed_s": round(self.elapsed_s, 3),
        }
        if self.pending_stats and self.pending_targets:  # per pair (pending_targets counts them)
            stats = zip(STATS, self.pending_stats, strict=True)
            record.update({k: v / self.pending_targets for k, v in stats})
        if val is not None:
            record["val_loss"] = val
            record["best_val_loss"] = self.best_val_loss
        if self.skipped_steps:
            record["skipped_steps"] = self.skipped_steps
        if final:
            record["final"] = True
        self.pending_loss, self.pending_targets, self.pending_tokens = 0.0, 0, 0
        self.pending_time, self.pending_stats = 0.0, []
        return record


class Clock:
    """Training time across sessions: what the checkpoint held plus this session's."""

    def __init__(self, state: TrainState):
        self.state, self.before, self.start = state, state.elapsed_s, time.perf_counter()

    def tick(self) -> None:
        self.state.elapsed_s = self.before + time.perf_counter() - self.start
