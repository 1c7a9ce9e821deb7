"""Crash-safe writes (temp name, fsync, rename), folders swapped in whole, and the disk-space check.

Shared by every stage that writes: the run folder, exports, chat's /save, the kernel wrapper.
"""

import errno
import json
import os
import shutil
import time
from pathlib import Path

import mlx.core as mx

from macft.errors import RunError

# Room kept free beyond a write's own bytes: headers, state.json, metrics lines.
SPACE_MARGIN = 1 << 20
# Test hook (tests/test_kill.py): seconds to pause in each write-then-rename window, so that a
# SIGKILL can land there. Unset in normal use.
PAUSE_ENV = "MACFT_TEST_WRITE_PAUSE"


def _pause() -> None:
    seconds = os.environ.get(PAUSE_ENV)
    if seconds:
        time.sleep(float(seconds))


def fsync_dir(path: Path) -> None:
    # Makes a rename durable; not every platform allows opening a directory, so best effort.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_via_temp(path: Path, write, suffix: str = "") -> None:
    """write(tmp) must leave a temp file beside `path` complete and fsynced; then it replaces
    `path` in one rename. On any error the temp file goes and `path` stays as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{suffix}")
    try:
        write(tmp)
        _pause()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def atomic_write_bytes(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write to a temp file in the same folder, fsync, then rename over `path` (with `mode`)."""

    def write(tmp: Path) -> None:
        tmp.write_bytes(data)
        if mode is not None:
            tmp.chmod(mode)
        _fsync_file(tmp)

    write_via_temp(path, write)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def save_safetensors(path: Path, weights: dict, metadata: dict | None = None) -> None:
    """mx.save_safetensors with a failed write raised as OSError, as every other write fails.

    The weights are evaluated first, so what MLX raises after that is the write itself.
    """
    mx.eval(weights)
    try:
        mx.save_safetensors(str(path), weights, metadata=metadata or {"format": "mlx"})
    except RuntimeError as e:  # MLX's writer has no errno: "[write] Unable to write ..."
        raise OSError(errno.EIO, f"cannot write {path}: {e}") from None


def atomic_save_safetensors(path: Path, weights: dict, metadata: dict | None = None) -> None:
    def write(tmp: Path) -> None:
        save_safetensors(tmp, weights, metadata)
        _fsync_file(tmp)

    # mx.save_safetensors wants the .safetensors extension on the temp name too
    write_via_temp(path, write, ".safetensors")


def tensor_bytes(*trees: dict) -> int:
    """Bytes a safetensors file of these flat {name: array} dicts needs, headers included."""
    return sum(v.nbytes + 64 + len(k) for t in trees for k, v in t.items())


def mount_point(path: Path) -> Path:
    """The file system a path lives on (its nearest existing ancestor's mount point)."""
    p = Path(path).resolve()  # a symlinked folder lives on its target's file system
    while not p.exists() and p != p.parent:
        p = p.parent
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return p


def free_space(path: Path) -> tuple[Path, int]:
    """(file system, free bytes) where `path` is or would be written."""
    fs = mount_point(path)
    return fs, shutil.disk_usage(fs).free


def human(n: float) -> str:
    """Bytes for people: 512 B, 1.2 MB, 3.4 GB (powers of 1000)."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def check_space(path: Path, nbytes: int, what: str, fix: str, error=RunError) -> None:
    """Refuse before writing `nbytes` (plus a margin) under `path` when the disk cannot hold it."""
    fs, free = free_space(path)
    need = int(nbytes * 1.05) + SPACE_MARGIN
    if free < need:
        raise error(
            f"{path}: need {human(need)} free on {fs} for {what}, have {human(free)}; {fix}"
        )


def replace_folder(tmp: Path, dest: Path) -> None:
    """Rename the complete folder `tmp` to `dest`, over an old `dest` if there is one.

    A folder cannot be renamed over a non-empty one, so the old one is moved aside first;
    if the process dies in that moment, RunDir.lock() (run folders) or Staging (exports)
    puts it back.
    """
    fsync_dir(tmp)
    if dest.exists():
        old = dest.with_name(f".old-{dest.name}-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dest, old)
        _pause()  # the one moment dest is missing
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)
    fsync_dir(dest.parent)


def write_folder(dest: Path, files) -> None:
    """Build a folder under a temp name with files(tmp), then swap it into place."""
    tmp = dest.with_name(f".tmp-{dest.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        files(tmp)
        replace_folder(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
