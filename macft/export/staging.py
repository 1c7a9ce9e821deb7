"""Export outputs written under temp names, checked for disk space, and renamed into place together."""

import errno
import os
import re
import shutil
from pathlib import Path

from macft.atomic import check_space, free_space, fsync_dir, human, replace_folder
from macft.errors import ExportError

_TEMP = re.compile(r"^\..+\.tmp-(\d+)(\.[a-z]+)?$")
_OLD = re.compile(r"^\.old-(.+)-(\d+)$")  # moved aside by replace_folder


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
    check_space(
        Path(out), need, "the export", "free some space or give --out on another disk", ExportError
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
        self._clean_leftovers()
        return self

    def _clean_leftovers(self) -> None:
        """What an export that crashed mid-write left: temps go, a folder moved aside comes back."""
        for p in self.out.iterdir():
            if (m := _OLD.match(p.name)) and not _alive(int(m[2])):
                if not (self.out / m[1]).exists():
                    os.replace(p, self.out / m[1])
                else:
                    _remove(p)
            elif (m := _TEMP.match(p.name)) and not _alive(int(m[1])):
                _remove(p)

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
            if tmp.is_dir():
                replace_folder(tmp, final)
            else:
                os.replace(tmp, final)
        fsync_dir(self.out)
        return [final for _, final in self.items]

    def __exit__(self, kind, exc, tb):
        for tmp, _ in self.items:
            _remove(tmp)
        if kind is not None and self.created and not any(self.out.iterdir()):
            self.out.rmdir()
        if isinstance(exc, OSError):  # every write macft makes fails as an OSError
            raise _write_error(self.out, exc) from None
        return False


def _write_error(out: Path, exc: OSError) -> ExportError:
    _, free = free_space(out)
    full = exc.errno == errno.ENOSPC or free < 64e6
    why = f"the disk is full ({human(free)} free)" if full else str(exc)
    return ExportError(
        f"writing the export in {out} failed: {why}; nothing there was replaced or left behind; "
        "free some space (or give --out on another disk) and run again"
    )
