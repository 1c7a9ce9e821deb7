"""Crash-safe writes (temp name, fsync, rename), folders swapped in whole, and the disk-space check.

Shared by every stage that writes: the run folder, exports, chat's /save, the kernel wrapper.
Temp files are created here, exclusively and never through a symlink, under names no one can
guess (a shared folder may hold a link planted under a predictable one); JSON is strict (no
NaN or Infinity tokens, which strict readers reject).
"""

import errno
import fcntl
import json
import math
import os
import re
import secrets
import shutil
import stat
import time
from pathlib import Path

from macft.errors import RunError

# Room kept free beyond a write's own bytes: headers, state.json, metrics lines.
SPACE_MARGIN = 1 << 20
# Test hook (tests/test_kill.py): seconds to pause in each write-then-rename window, so that a
# SIGKILL can land there. Unset in normal use.
PAUSE_ENV = "MACFT_TEST_WRITE_PAUSE"


# What the writers here leave when killed: `.NAME.tmp-PID-RANDOM[.ext]` (a file, or an export's
# folder), `.tmp-NAME-PID-RANDOM` (a folder being built), `.old-NAME-PID-RANDOM` (a folder moved
# aside). Runs written before the random part existed lack it.
TEMP_RE = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)(?:-[0-9a-f]{8})?(?P<ext>\.[a-z]+)?$")
TEMP_DIR_RE = re.compile(r"^\.tmp-(?P<name>.+?)-(?P<pid>\d+)(?:-[0-9a-f]{8})?$")
OLD_RE = re.compile(r"^\.old-(?P<name>.+?)-(?P<pid>\d+)(?:-[0-9a-f]{8})?$")


def _token() -> str:
    return f"{os.getpid()}-{secrets.token_hex(4)}"


def temp_name(path: Path, suffix: str = "") -> Path:
    """A fresh temp name beside `path` for a file (or an export's folder): TEMP_RE."""
    return path.with_name(f".{path.name}.tmp-{_token()}{suffix}")


def create_exclusive(path: Path) -> int:
    """Create `path` as a new regular file: fails if anything (a symlink too) is there."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    return os.open(path, flags, 0o666)


def _same_file(path: Path, fd: int) -> None:
    """`path` is still the regular file `fd` created: not swapped for a link while written."""
    st, own = os.lstat(path), os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != (own.st_dev, own.st_ino):
        raise OSError(errno.EEXIST, f"{path} was replaced by something else while written")


def fsync_fd(fd: int) -> None:
    """fsync; on macOS F_FULLFSYNC, since fsync there leaves the data in the drive's cache."""
    full = getattr(fcntl, "F_FULLFSYNC", None)
    if full is not None:
        try:
            fcntl.fcntl(fd, full)
            return
        except OSError:  # a file system without it (some network shares): plain fsync
            pass
    os.fsync(fd)


def strict(obj):
    """`obj` with every NaN or infinite float as None: what json_text writes."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: strict(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [strict(v) for v in obj]
    return obj


def json_text(obj, indent: int | None = None) -> str:
    """Strict JSON: NaN and infinities become null (json.dumps would write bare NaN tokens)."""
    return json.dumps(strict(obj), indent=indent, allow_nan=False)


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
        fsync_fd(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """Every file under `path` (or `path` itself) on disk, then the folders that name them."""
    path = Path(path)
    if path.is_symlink():
        return  # nothing macft writes is a link
    if not path.is_dir():
        fd = os.open(path, os.O_RDONLY)
        try:
            fsync_fd(fd)
        finally:
            os.close(fd)
        return
    for child in path.iterdir():
        fsync_tree(child)
    fsync_dir(path)


def write_via_temp(path: Path, write, suffix: str = "", mode: int | None = None) -> None:
    """write(tmp) fills a new temp file beside `path`, made here (see create_exclusive); it is
    fsynced and renamed over `path`. On any error the temp file goes and `path` stays as it was."""
    path = Path(path)
    tmp = temp_name(path, suffix)
    fd = create_exclusive(tmp)
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        write(tmp)
        _same_file(tmp, fd)
        fsync_fd(fd)
        _pause()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write to a temp file in the same folder, fsync, then rename over `path` (with `mode`)."""
    write_via_temp(path, lambda tmp: tmp.write_bytes(data), mode=mode)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json_text(obj, indent=2) + "\n")


def save_safetensors(path: Path, weights: dict, metadata: dict | None = None) -> None:
    """mx.save_safetensors with a failed write raised as OSError, as every other write fails.

    The weights are evaluated first, so what MLX raises after that is the write itself.
    """
    import mlx.core as mx  # here, not on top: console.py uses strict() and stays free of MLX

    mx.eval(weights)
    try:
        mx.save_safetensors(str(path), weights, metadata=metadata or {"format": "mlx"})
    except RuntimeError as e:  # MLX's writer has no errno: "[write] Unable to write ..."
        raise OSError(_write_errno(Path(path)), f"cannot write {path}: {e}") from None


def _write_errno(path: Path) -> int:
    """Why a write that reported no errno failed: the file-size limit, a full disk, or EIO."""
    import resource

    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    try:
        size = path.stat().st_size
    except OSError:
        size = 0
    if soft != resource.RLIM_INFINITY and size >= soft - (1 << 16):
        return errno.EFBIG
    try:
        return errno.ENOSPC if free_space(path)[1] < SPACE_MARGIN else errno.EIO
    except OSError:
        return errno.EIO


def atomic_save_safetensors(path: Path, weights: dict, metadata: dict | None = None) -> None:
    # mx.save_safetensors wants the .safetensors extension on the temp name too
    write_via_temp(path, lambda tmp: save_safetensors(tmp, weights, metadata), ".safetensors")


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


def why_failed(path: Path, exc: OSError) -> str:
    """What a failed write means, for an error line: a full disk says how full it is.

    MLX's safetensors writer fails with no errno (EIO here): a nearly full disk explains it."""
    if exc.errno == errno.EFBIG:
        return "a file grew past the size this process may write (ulimit -f)"
    try:
        fs, free = free_space(path)
    except OSError:
        fs, free = None, None
    if exc.errno in (errno.ENOSPC, errno.EDQUOT) or (free is not None and free < SPACE_MARGIN):
        return f"the disk is full ({human(free)} free on {fs})" if fs else "the disk is full"
    return exc.strerror or str(exc)


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
    fsync_tree(tmp)
    if dest.exists():
        old = dest.with_name(f".old-{dest.name}-{_token()}")
        os.replace(dest, old)
        _pause()  # the one moment dest is missing
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)
    fsync_dir(dest.parent)


def write_folder(dest: Path, files) -> None:
    """Build a folder under a temp name with files(tmp), then swap it into place."""
    tmp = dest.with_name(f".tmp-{dest.name}-{_token()}")  # TEMP_DIR_RE
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.mkdir()
        files(tmp)
        replace_folder(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
