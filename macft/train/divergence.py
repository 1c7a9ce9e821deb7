"""Steps whose loss or gradients are not finite: skipped and counted; a run that keeps
diverging is stopped before anything it writes holds NaN.

An inf gradient passes clipping as NaN (inf x 0) and AdamW would then write NaN into every
adapter, so the check runs on the summed gradients, before the update.
"""

import mlx.core as mx
from mlx.utils import tree_flatten

from macft.errors import RunError

MAX_IN_ROW = 5  # non-finite steps in a row that stop the run: it is diverging, not unlucky


class Diverged(RunError):
    """Training went on producing NaN or infinite losses or gradients."""


def finite(loss, grads) -> bool:
    """Are the step's loss and every gradient finite? One sum per tensor, one evaluation.

    A NaN or an infinity anywhere makes the total NaN or infinite; finite gradients would
    need sums past 3e38 to overflow (SmolLM2's 420 LoRA tensors: ~10 ms on 2 CPU cores)."""
    total = loss.astype(mx.float32).sum()
    for _, g in tree_flatten(grads or {}):
        total = total + g.astype(mx.float32).sum()
    return bool(mx.isfinite(total).item())


def count(state, ok: bool) -> None:
    """Note a step kept or skipped (state.skipped_steps, state.bad_in_row)."""
    if ok:
        state.bad_in_row = 0
    else:
        state.skipped_steps += 1
        state.bad_in_row += 1


def check(state, step: int, cfg, run_path) -> None:
    """Stop a run whose last MAX_IN_ROW steps were all skipped: it is diverging."""
    if state.bad_in_row >= MAX_IN_ROW:
        raise Diverged(
            f"training diverged at step {step}: the loss or gradients were NaN or infinite in "
            f"{state.bad_in_row} steps in a row (those steps were skipped; the adapters and "
            "checkpoints hold the last finite weights); lower train.learning_rate (now "
            f"{cfg.learning_rate:g}) or set train.max_grad_norm (now {cfg.max_grad_norm:g}), "
            f"then continue with: macft train --resume --out {run_path} "
            "--set train.learning_rate=... --force"
        )
