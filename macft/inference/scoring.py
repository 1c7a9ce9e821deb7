"""Eval arithmetic: answer scores, perplexity, forgetting and the overfitting signal."""

import math
from collections import Counter

__all__ = [
    "contains",
    "exact_match",
    "forgetting",
    "normalise",
    "overfitting",
    "percent_change",
    "perplexity",
    "token_f1",
]


def normalise(text: str, case_sensitive: bool = False) -> str:
    """Runs of whitespace become one space, the ends are trimmed, and case is folded unless asked."""
    text = " ".join(text.split())
    return text if case_sensitive else text.casefold()


def exact_match(pred: str, ref: str, case_sensitive: bool = False) -> float:
    return float(normalise(pred, case_sensitive) == normalise(ref, case_sensitive))


def contains(pred: str, ref: str, case_sensitive: bool = False) -> float:
    """1 when the (normalised) reference appears anywhere in the answer; an empty one never does."""
    r = normalise(ref, case_sensitive)
    return float(bool(r) and r in normalise(pred, case_sensitive))


def token_f1(pred: str, ref: str, case_sensitive: bool = False) -> float:
    """SQuAD-style F1 over whitespace tokens (bag of tokens), after the same normalisation.

    Punctuation is kept, unlike SQuAD: in SQL or commands a quote or a dot changes the answer.
    """
    p = normalise(pred, case_sensitive).split()
    r = normalise(ref, case_sensitive).split()
    if not p or not r:
        return float(p == r)
    same = sum((Counter(p) & Counter(r)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(r)
    return 2 * precision * recall / (precision + recall)


SCORERS = {"exact": exact_match, "contains": contains, "f1": token_f1}


def perplexity(mean_loss: float | None) -> float | None:
    """exp of the token-weighted mean cross-entropy (nats); inf rather than an overflow error."""
    if mean_loss is None:
        return None
    return math.exp(mean_loss) if mean_loss < 700 else math.inf


def percent_change(before: float, after: float) -> float:
    return 100.0 * (after - before) / before


def forgetting(base_ppl: float, tuned_ppl: float, threshold_pct: float) -> dict:
    """How much the fine-tune's perplexity on general text grew over the base's, and whether to warn."""
    change = percent_change(base_ppl, tuned_ppl)
    return {
        "base_perplexity": base_ppl,
        "fine_tune_perplexity": tuned_ppl,
        "change_pct": change,
        "threshold_pct": threshold_pct,
        "warning": change > threshold_pct,
    }


def _train_loss_near(rows: list[dict], step: int, k: int = 3) -> float | None:
    # Training loss is noisy: the mean of the last k reports at or before the step.
    losses = [
        r["train_loss"] for r in rows if r["step"] <= step and r.get("train_loss") is not None
    ]
    return sum(losses[-k:]) / len(losses[-k:]) if losses else None


def overfitting(metrics: list[dict], window: int = 3) -> dict:
    """From metrics.jsonl: the best validation loss, and whether over the last `window`
    evaluations validation loss rose while training loss fell (the fine-tune memorises)."""
    evals = [r for r in metrics if r.get("val_loss") is not None]
    out = {"evals": len(evals), "best_step": None, "best_val_loss": None, "overfitting": False}
    if not evals:
        out["note"] = "no validation loss in metrics.jsonl"
        return out
    best = min(evals, key=lambda r: r["val_loss"])
    out.update(best_step=best["step"], best_val_loss=best["val_loss"])
    out["last_step"], out["last_val_loss"] = evals[-1]["step"], evals[-1]["val_loss"]
    last = evals[-window:]
    if len(last) < 2:
        out["note"] = "too few evaluations to see a trend"
        return out
    first_step, last_step = last[0]["step"], last[-1]["step"]
    val_rose = last[-1]["val_loss"] > last[0]["val_loss"]
    t0, t1 = _train_loss_near(metrics, first_step), _train_loss_near(metrics, last_step)
    train_fell = t0 is not None and t1 is not None and t1 < t0
    out.update(
        window_steps=[first_step, last_step],
        val_change=last[-1]["val_loss"] - last[0]["val_loss"],
        train_change=None if t0 is None or t1 is None else t1 - t0,
        overfitting=bool(val_rose and train_fell),
    )
    return out
