"""A run's counters between steps: position, best validation loss, the sums behind each report."""

from macft import backend


def stream_count(cfg, world_size: int = 1, quantized: bool = False) -> int:
    """Over how many CPU streams each micro-batch is split (backend.cpu_streams); 1: not split.

    Not with checkpointing: the breadth-first order the streams need (backend.plan_cpu_streams)
    runs the recomputed layers early, and the peak doubled (SmolLM2, batch 4: 0.76 -> 1.50 GB).
    Not on a quantized base: each part would dequantize every matrix for itself (peak +16%).
    """
    if cfg.grad_checkpoint or world_size > 1 or quantized:
        return 1
    return backend.cpu_streams(cfg.batch_size)


def fresh_state() -> dict:
    return {
        "step": 0,
        "epoch": 0,
        "index": 0,  # next micro-batch in this epoch's batch order
        "best_val_loss": None,
        "best_step": None,
        "evals_since_best": 0,
        "val_loss": None,
        "trained_tokens": 0,
        "elapsed_s": 0.0,
        # since the last report, kept in checkpoints so reports after a resume match
        "pending_loss": 0.0,
        "pending_targets": 0,
        "pending_tokens": 0,
        "pending_time": 0.0,
    }


def record_val(st: dict, val: float) -> bool:
    """Note a validation loss; True if it is the best so far (the caller saves those adapters)."""
    st["val_loss"] = val
    if st["best_val_loss"] is None or val < st["best_val_loss"]:
        st.update(best_val_loss=val, best_step=st["step"], evals_since_best=0)
        return True
    st["evals_since_best"] += 1
    return False


def should_stop(st: dict, patience: int) -> bool:
    """Early stopping: `patience` evaluations in a row without a better validation loss."""
    return bool(patience) and st["evals_since_best"] >= patience


def best_of(st: dict) -> dict:
    return {"best_val_loss": st["best_val_loss"], "best_step": st["best_step"]}


def report_record(st: dict, lr: float, total: int, per_epoch: int, val, final: bool) -> dict:
    """The metrics record for on_report and metrics.jsonl; resets the since-last-report sums."""
    report = {
        "step": st["step"],
        "total_steps": total,
        "epoch": round(st["epoch"] + st["index"] / per_epoch, 4),
        "train_loss": st["pending_loss"] / st["pending_targets"] if st["pending_targets"] else None,
        "learning_rate": lr,
        "tokens_per_s": st["pending_tokens"] / st["pending_time"] if st["pending_time"] else 0.0,
        "trained_tokens": st["trained_tokens"],
        "peak_memory_gb": backend.peak_memory_gb(),
        "elapsed_s": round(st["elapsed_s"], 3),
    }
    if val is not None:
        report["val_loss"] = val
        report["best_val_loss"] = st["best_val_loss"]
    if final:
        report["final"] = True
    st.update(pending_loss=0.0, pending_targets=0, pending_tokens=0, pending_time=0.0)
    return report
