"""Every run folder under some folders, with its state, steps, validation loss, size and age."""

import os
import time
from pathlib import Path

from macft.errors import RunError
from macft.runs.folder import RunDir

DEFAULT_ROOT = "runs"
MAX_DEPTH = 4  # how deep under a folder to look for run folders
SKIP = {"checkpoints", "eval", "export", "__pycache__", "node_modules"}


def find_runs(folders: tuple[str, ...]) -> list[Path]:
    """Run folders given, or found under the given folders (default ./runs), sorted by path."""
    roots = [Path(f).expanduser() for f in folders] or [Path(DEFAULT_ROOT)]
    found: list[Path] = []
    for root in roots:
        if not root.exists():
            if folders:
                raise RunError(f"{root} does not exist; give a run folder or a folder of runs")
            continue
        if not root.is_dir():
            raise RunError(f"{root} is a file; give a run folder or a folder of runs")
        found += _walk(root, 0)
    return sorted(dict.fromkeys(found))


def _walk(folder: Path, depth: int) -> list[Path]:
    if RunDir(folder).holds_run():
        return [folder]  # a run's own subfolders are its checkpoints, not runs
    if depth >= MAX_DEPTH:
        return []
    try:
        children = sorted(p for p in folder.iterdir() if p.is_dir())
    except OSError:
        return []
    out = []
    for child in children:
        if not child.name.startswith(".") and child.name not in SKIP:
            out += _walk(child, depth + 1)
    return out


def folder_bytes(folder: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass  # removed while we looked (a checkpoint pruned by a running trainer)
    return total


def run_info(path: Path, now: float | None = None) -> dict:
    """One run's row: state (crashed when it says running but nobody holds its lock) and figures."""
    run = RunDir(path)
    try:
        state = run.state
    except RunError:
        state = {"status": "unreadable"}
    metrics = run.read_metrics()
    status = state.get("status") or ("finished" if run.adapters_path.exists() else "created")
    if status in ("running", "created"):
        status = "running" if run.is_locked() else "crashed"
    total = state.get("total_steps")
    if total is None and run.recipe_path.is_file():
        try:
            total = (run.recipe().get("train") or {}).get("iters")
        except Exception:  # a damaged recipe.yaml: the other figures still help
            total = None
    step = max([state.get("step") or 0] + [r.get("step", 0) for r in metrics])
    vals = [(r["val_loss"], r["step"]) for r in metrics if r.get("val_loss") is not None]
    trained = [v for v in vals if v[1] > 0]  # step 0 is the untrained model
    best = min(trained, key=lambda v: v[0]) if trained else (None, None)
    stamps = [p.stat().st_mtime for p in (run.state_path, run.metrics_path) if p.exists()]
    updated = max(stamps) if stamps else path.stat().st_mtime
    return {
        "path": str(path),
        "state": status,
        "step": step,
        "total_steps": total,
        "best_val_loss": best[0],
        "best_step": best[1],
        "last_val_loss": vals[-1][0] if vals else None,
        "size_bytes": folder_bytes(path),
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(updated)),
        "age_s": round((now or time.time()) - updated, 1),
        "error": state.get("error"),
    }


def human_age(seconds: float) -> str:
    for unit, scale in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= scale:
            return f"{int(seconds // scale)}{unit} ago"
    return f"{int(max(seconds, 0))}s ago"
