"""Training progress on screen: a live rich bar on a terminal, one plain line per report elsewhere."""

import time

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from macft.train.loop import TrainingCallback


def _fmt(report: dict) -> str:
    parts = [f"loss {report['train_loss']:.3f}" if report.get("train_loss") is not None else ""]
    if report.get("val_loss") is not None:
        parts.append(f"val {report['val_loss']:.3f}")
    if report.get("reward_accuracy") is not None:  # preference pairs (train.method dpo, orpo)
        parts.append(
            f"reward acc {report['reward_accuracy']:.0%} margin {report['reward_margin']:.3f}"
        )
        parts.append(f"logp {report['chosen_logp']:.1f}/{report['rejected_logp']:.1f}")
    parts.append(f"lr {report.get('learning_rate', 0):.2e}")
    parts.append(f"{report.get('tokens_per_s', 0):,.0f} tok/s")
    parts.append(f"peak {report.get('peak_memory_gb', 0):.2f} GB")
    return "  ".join(p for p in parts if p)


class TrainProgress(TrainingCallback):
    """The loop's callback: step, loss, tokens/s, peak memory and ETA; a context manager."""

    def __init__(self, console: Console):
        self.console = console
        self.live = console.is_terminal
        self.total = 0
        self.task = None
        self.start = time.monotonic()
        self.progress = Progress(
            TextColumn("step {task.completed}/{task.total}"),
            BarColumn(),
            TextColumn("{task.fields[stats]}"),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )

    def __enter__(self):
        if self.live:
            self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self.live:
            self.progress.__exit__(*exc)

    def on_start(self, total_steps: int, start_step: int = 0) -> None:
        self.total = total_steps
        self.start = time.monotonic()
        self.first_step = start_step
        if self.live:
            self.task = self.progress.add_task(
                "train", total=total_steps, completed=start_step, stats=""
            )

    def on_report(self, report: dict) -> None:
        step = report["step"]
        if report.get("expert_warning"):  # an MoE router collapsing onto a few experts
            out = self.progress.console if self.live else self.console
            out.print(f"[yellow]warning:[/] step {step}: {report['expert_warning']}")
        if step == 0:
            msg = f"validation loss before training: {report['val_loss']:.3f}"
            (self.progress.console if self.live else self.console).print(msg)
            return
        stats = _fmt(report)
        if self.live:
            self.progress.update(self.task, completed=step, stats=stats)
            if report.get("val_loss") is not None:
                self.progress.console.print(f"step {step}: val loss {report['val_loss']:.3f}")
            return
        done = step - self.first_step
        elapsed = time.monotonic() - self.start
        eta = elapsed / done * (self.total - step) if done > 0 else 0.0
        self.console.print(f"step {step}/{self.total}  {stats}  ETA {eta:,.0f}s", highlight=False)
