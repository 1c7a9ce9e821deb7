"""Training curves from metrics.jsonl as PNG bytes (matplotlib's Agg canvas, no display needed)."""

import io

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

COLORS = {"train": "#1f77b4", "val": "#d62728", "other": "#2ca02c", "best": "#ff7f0e"}


def _series(metrics: list[dict], key: str) -> tuple[list, list]:
    pts = [(r["step"], r[key]) for r in metrics if r.get(key) is not None and "step" in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)  # Figure() alone has no canvas; Agg renders without a display
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _figure(title: str, ylabel: str):
    fig = Figure(figsize=(5.3, 3.1), layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=11)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def loss_png(metrics: list[dict], best_step: int | None = None) -> bytes | None:
    ts, tl = _series(metrics, "train_loss")
    vs, vl = _series(metrics, "val_loss")
    if not ts and not vs:
        return None
    fig, ax = _figure("loss", "cross-entropy (nats / token)")
    if ts:
        ax.plot(ts, tl, color=COLORS["train"], lw=1.4, label="training")
    if vs:
        ax.plot(vs, vl, color=COLORS["val"], lw=1.8, marker="o", ms=4, label="validation")
    if best_step is not None and best_step in vs:
        ax.axvline(best_step, color=COLORS["best"], ls="--", lw=1, label=f"best (step {best_step})")
    ax.legend(fontsize=9)
    return _png(fig)


def single_png(
    metrics: list[dict], key: str, title: str, ylabel: str, from_zero: bool = True
) -> bytes | None:
    steps, values = _series(metrics, key)
    if key in ("tokens_per_s", "learning_rate"):  # the step-0 report (eval only) took no step
        pts = [(s, v) for s, v in zip(steps, values, strict=True) if s > 0]
        steps, values = [p[0] for p in pts], [p[1] for p in pts]
    if not steps:
        return None
    fig, ax = _figure(title, ylabel)
    ax.plot(steps, values, color=COLORS["other"], lw=1.6, marker="." if len(steps) < 40 else None)
    if from_zero:
        ax.set_ylim(bottom=0)
    return _png(fig)


def curve_pngs(metrics: list[dict], best_step: int | None = None) -> list[tuple[str, bytes]]:
    """(caption, PNG bytes) for every curve that has data."""
    figs = [
        ("training and validation loss", loss_png(metrics, best_step)),
        ("learning rate", single_png(metrics, "learning_rate", "learning rate", "lr")),
        ("throughput", single_png(metrics, "tokens_per_s", "throughput", "tokens / s")),
        ("peak memory", single_png(metrics, "peak_memory_gb", "peak memory", "GB")),
        # preference pairs (train.method dpo, orpo)
        ("reward accuracy", single_png(metrics, "reward_accuracy", "reward accuracy", "share")),
        (
            "reward margin",
            single_png(metrics, "reward_margin", "reward margin", "chosen - rejected", False),
        ),
    ]
    return [(caption, png) for caption, png in figs if png is not None]
