"""Export outputs written under temp names, checked for disk space, and renamed into place together."""

import errno
import os
import re
import shutil
from pathlib import Path

from macft.atomic import free_space, fsync_dir
from macft.errors import ExportError

_TEMP = re.compile(r"^\..+\.tmp-(\d+)(\.[a-z]+)?$")


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def check_free_space(out: Path, need: int) -> None:
    """Refuse before writing anything when `need` bytes (with margin) will not fit."""
    _, free = free_space(Path(out))
    if free < need:
        raise ExportError(
            f"not enough disk space for the export in {out}: it needs about {human(need)}, "
            f"{human(free)} is free; free some space or give --out on another disk"
        )


class Staging:
    """Files and folders built under temp names in `out`; commit() renames them all into place.

    Used as a context manager: an error (disk full included) removes every temp and leaves the
    previous export exactly as it was.
    """

    def __init__(self, out: Path):
        self.out = Path(out)
        self.items: list[tuple[Path, Path]] = []
        self.created = False

    def __enter__(self):
        if self.out.exists() and not self.out.is_dir():
            raise ExportError(f"{self.out} is a file, not a folder; give another --out")
        self.created = not self.out.exists()
        self.out.mkdir(parents=True, exist_ok=True)
        for p in self.out.iterdir():  # leftovers of an export that crashed mid-write
            m = _TEMP.match(p.name)
            if m and not _alive(int(m[1])):
                _remove(p)
        return self

    def _tmp(self, name: str, suffix: str = "") -> Path:
        tmp = self.out / f".{name}.tmp-{os.getpid()}{suffix}"
        _remove(tmp)
        self.items.append((tmp, self.out / name))
        return tmp

    def file(self, name: str) -> Path:
        """A temp path for the file `name` (suffix kept: some writers check it)."""
        return self._tmp(name, Path(name).suffix)

    def folder(self, name: str, create: bool = True) -> Path:
        tmp = self._tmp(name)
        if create:
            tmp.mkdir()
        return tmp

    def commit(self) -> list[Path]:
        for tmp, final in self.items:
            if tmp.is_dir() and final.exists():
                # A folder cannot be renamed over a non-empty one: move the old aside first.
                old = final.with_name(f".{final.name}.old-{os.getpid()}")
                _remove(old)
                os.replace(final, old)
                os.replace(tmp, final)
                _remove(old)
            else:
                os.replace(tmp, final)
        fsync_dir(self.out)
        return [final for _, final in self.items]

    def __exit__(self, kind, exc, tb):
        for tmp, _ in self.items:
            _remove(tmp)
        if kind is not None and self.created and not any(self.out.iterdir()):
            self.out.rmdir()
        if _is_write_failure(exc):
            raise _write_error(self.out, exc) from None
        return False


def _is_write_failure(exc) -> bool:
    # MLX reports a failed write as RuntimeError("[write] Unable to write ..."), without errno.
    if isinstance(exc, OSError):
        return True
    return isinstance(exc, RuntimeError) and "write" in str(exc).lower()


def _write_error(out: Path, exc: Exception) -> ExportError:
    _, free = free_space(out)
    full = getattr(exc, "errno", None) == errno.ENOSPC or free < 64e6
    why = f"the disk is full ({human(free)} free)" if full else str(exc)
    return ExportError(
        f"writing the export in {out} failed: {why}; nothing there was replaced or left behind; "
        "free some space (or give --out on another disk) and run again"
    )
