"""Export outputs written under temp names, checked for disk space, and renamed into place together.

An export folder is macft's: its own RUN/export, or a --out where macft-export.json lists what
macft wrote. Anything else already there is the user's, and is replaced only with --force.
"""

import contextlib
import fcntl
import json
import os
import shutil
from pathlib import Path

from macft.atomic import (
    OLD_RE,
    TEMP_RE,
    atomic_write_json,
    check_space,
    create_exclusive,
    fsync_dir,
    fsync_tree,
    replace_folder,
    temp_name,
    why_failed,
)
from macft.errors import ExportError

MANIFEST = "macft-export.json"  # what macft wrote in an export folder


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def _written(out: Path) -> list[str]:
    try:
        files = json.loads((out / MANIFEST).read_text(encoding="utf-8")).get("files", [])
    except (OSError, ValueError, RecursionError, AttributeError):
        return []
    return [f for f in files if isinstance(f, str)]


def check_replaceable(out: Path, names: list[str], own: bool, force: bool) -> None:
    """Refuse, before any work, to replace in `out` what macft did not write there."""
    if own or force or not out.is_dir():
        return
    theirs = [n for n in names if (out / n).exists() and n not in _written(out)]
    if theirs:
        raise ExportError(
            f"{out / theirs[0]} is already there and macft did not write it; give another "
            f"--out, or add --force to replace {', '.join(theirs)}"
        )


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
        self._lock = None

    def __enter__(self):
        if self.out.exists() and not self.out.is_dir():
            raise ExportError(f"{self.out} is a file, not a folder; give another --out")
        self.created = not self.out.exists()
        self.out.mkdir(parents=True, exist_ok=True)
        self._lock = os.open(self.out, os.O_RDONLY)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock)
            raise ExportError(
                f"{self.out} is busy: another macft fuse is writing there; wait for it"
            ) from None
        self._clean_leftovers()
        return self

    def _clean_leftovers(self) -> None:
        """What an export that crashed mid-write left (no other export runs here: the lock):
        temps go, a folder moved aside comes back, whatever process id its name holds."""
        for p in self.out.iterdir():
            if (m := OLD_RE.match(p.name)) and p.is_dir():
                if not (self.out / m["name"]).exists():
                    os.replace(p, self.out / m["name"])
                else:
                    _remove(p)
            elif TEMP_RE.match(p.name):
                _remove(p)

    def _tmp(self, name: str, suffix: str = "") -> Path:
        tmp = temp_name(self.out / name, suffix)
        self.items.append((tmp, self.out / name))
        return tmp

    def file(self, name: str) -> Path:
        """A temp path for the file `name` (suffix kept: some writers check it); made here,
        empty, so no link planted under its name is written through."""
        tmp = self._tmp(name, Path(name).suffix)
        os.close(create_exclusive(tmp))
        return tmp

    def folder(self, name: str, create: bool = True) -> Path:
        tmp = self._tmp(name)
        if create:
            tmp.mkdir()
        return tmp

    def commit(self) -> list[Path]:
        for tmp, _ in self.items:
            fsync_tree(tmp)  # on disk before any rename: a power cut leaves old or new
        for tmp, final in self.items:
            if tmp.is_dir():
                replace_folder(tmp, final)
            else:
                os.replace(tmp, final)
        fsync_dir(self.out)
        names = sorted({*_written(self.out), *(final.name for _, final in self.items)})
        # bookkeeping: without it, the next export here needs --force to replace these
        with contextlib.suppress(OSError):
            atomic_write_json(self.out / MANIFEST, {"files": names})
        return [final for _, final in self.items]

    def __exit__(self, kind, exc, tb):
        for tmp, _ in self.items:
            _remove(tmp)
        if self._lock is not None:
            os.close(self._lock)
        if kind is not None and self.created and not any(self.out.iterdir()):
            self.out.rmdir()
        if isinstance(exc, OSError):  # every write macft makes fails as an OSError
            raise _write_error(self.out, exc) from None
        return False


def _write_error(out: Path, exc: OSError) -> ExportError:
    return ExportError(
        f"writing the export in {out} failed: {why_failed(out, exc)}; nothing there was "
        "replaced or left behind; free some space (or give --out on another disk) and run again"
    )
