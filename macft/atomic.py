"""Crash-safe writes (temp name, fsync, rename) and the disk-space check before big writes."""

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


def _tmp_name(path: Path, suffix: str = "") -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}{suffix}")


def _write_then_rename(path: Path, tmp: Path, write) -> None:
    """write(tmp) must leave tmp complete and fsynced; then it replaces `path` in one rename."""
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
    path = Path(path)

    def write(tmp: Path) -> None:
        tmp.write_bytes(data)
        if mode is not None:
            tmp.chmod(mode)
        _fsync_file(tmp)

    _write_then_rename(path, _tmp_name(path), write)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def atomic_save_safetensors(path: Path, weights: dict, metadata: dict | None = None) -> None:
    path = Path(path)

    def write(tmp: Path) -> None:
        mx.save_safetensors(str(tmp), weights, metadata=metadata or {"format": "mlx"})
        _fsync_file(tmp)

    # mx.save_safetensors wants the .safetensors extension on the temp name too
    _write_then_rename(path, _tmp_name(path, ".safetensors"), write)


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


def check_space(path: Path, nbytes: int, what: str, fix: str) -> None:
    """Refuse before writing `nbytes` (plus a margin) under `path` when the disk cannot hold it."""
    fs, free = free_space(path)
    need = int(nbytes * 1.05) + SPACE_MARGIN
    if free < need:
        mb = 1024 * 1024
        raise RunError(
            f"{path}: need {need / mb:.1f} MB free on {fs} for {what}, have {free / mb:.1f} MB; "
            f"{fix}"
        )


def write_folder(dest: Path, files) -> None:
    """Build a folder under a temp name, then rename it into place (replacing an old one)."""
    tmp = dest.with_name(f".tmp-{dest.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        files(tmp)
        fsync_dir(tmp)
        if dest.exists():
            # A folder cannot be renamed over a non-empty one: move the old aside first.
            old = dest.with_name(f".old-{dest.name}-{os.getpid()}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dest, old)
            _pause()  # the one moment dest is missing: RunDir.lock() puts `old` back
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(dest.parent)
