"""The run folder on disk: recipe, adapters, checkpoints, metrics and state, all written atomically."""

import contextlib
import errno
import functools
import json
import os
import re
import shutil
from pathlib import Path

import mlx.core as mx
import yaml

from macft.atomic import (
    OLD_RE,
    TEMP_DIR_RE,
    TEMP_RE,
    atomic_save_safetensors,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    check_space,
    fsync_fd,
    json_text,
    tensor_bytes,
    why_failed,
    write_folder,
)
from macft.config.recipes import read_recipe_file
from macft.errors import RunError
from macft.runs import resume

CHECKPOINT_RE = re.compile(r"^step-(\d+)$")
TRASH_RE = re.compile(r"^\.trash-step-\d+$")  # a checkpoint being pruned
# The files a run folder holds (their temp names are the only leftovers cleaned there) and the
# folders swapped in whole under checkpoints/.
RUN_FILES = ("recipe.yaml", "base.json", "state.json", "metrics.jsonl", "adapters.safetensors",
             "adapter_config.json")  # fmt: skip
SWAPPED = re.compile(r"^(step-\d+|best)$")
# Kept aside while training: when the disk fills up, deleting it makes room to record why.
RESERVE, RESERVE_BYTES = ".reserve", 256 << 10


def _writes(what: str):
    """A RunDir method that writes `what`: any OSError (a full disk, an I/O error) becomes a
    RunError that says what failed and how to go on; earlier files stay as they were."""

    def wrap(method):
        @functools.wraps(method)
        def write(self, *args, **kwargs):
            try:
                return method(self, *args, **kwargs)
            except OSError as e:
                raise RunError(
                    f"{self.path}: writing {what} failed: {why_failed(self.path, e)}; what was "
                    "written before is intact: fix that, then continue with: macft train "
                    f"--resume --out {self.path}"
                ) from None

        return write

    return wrap


class RunDir:
    """One run folder: recipe.yaml, state.json, metrics.jsonl, adapters, checkpoints/."""

    def __init__(self, path, keep_last: int = 3):
        self.path = Path(path)
        self.keep_last = keep_last
        self._lock_depth = 0  # lock() nests within one RunDir
        self.recipe_path = self.path / "recipe.yaml"
        self.state_path = self.path / "state.json"
        self.metrics_path = self.path / "metrics.jsonl"
        self.adapters_path = self.path / "adapters.safetensors"
        self.config_path = self.path / "adapter_config.json"
        self.base_path = self.path / "base.json"  # where the base model came from, how loaded
        self.checkpoints = self.path / "checkpoints"

    # --- creating and opening -------------------------------------------------------------
    def holds_run(self) -> bool:
        markers = (self.recipe_path, self.state_path, self.adapters_path, self.checkpoints)
        return any(p.exists() for p in markers)

    def check_free(self) -> None:
        """A new run needs a folder of its own: not a file, not a run, not the user's files."""
        if self.path.exists() and not self.path.is_dir():
            raise RunError(f"{self.path} is a file, not a run folder; pick another --out")
        if self.holds_run():
            raise RunError(
                f"{self.path} already holds a run; continue it with --resume, or pick another --out"
            )
        here = Path.cwd().resolve()
        if self.path.resolve() in (here, *here.parents):
            raise RunError(
                f"{self.path} is the working folder (or holds it); a run gets a folder of its "
                "own: pick another --out, e.g. runs/NAME"
            )
        theirs = []
        if self.path.is_dir():
            theirs = sorted(p.name for p in self.path.iterdir() if not _macft_own(p.name))
        if theirs:
            shown = ", ".join(theirs[:5]) + (", ..." if len(theirs) > 5 else "")
            raise RunError(
                f"{self.path} already holds other files ({shown}); a run gets a folder of its "
                "own: pick a new or empty folder for --out"
            )

    @_writes("the new run")
    def create(self, recipe: dict, source: dict | None = None, data_digest=None) -> None:
        """Start a new run folder holding the resolved recipe; refuses a folder with a run."""
        self.check_free()
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.recipe_path, yaml.safe_dump(recipe, sort_keys=False))
        if source is not None:
            atomic_write_json(self.base_path, source)
        state = {"status": "created", "step": 0, "best_val_loss": None}
        atomic_write_json(self.state_path, {**state, "data_digest": data_digest})

    def open(self) -> dict:
        """An existing run, for resuming; returns its state."""
        if not self.path.is_dir() or not self.holds_run():
            raise RunError(
                f"{self.path}: no run to resume there; start one with macft train --out {self.path}"
            )
        return self.state

    def open_for_resume(
        self, recipe: dict | None = None, write: bool = True, data_digest=None, force=False
    ) -> dict:
        """Like open(); with a recipe, refuse what a resume may not change (runs/resume.py) and
        record the rest.

        write=False only checks (and that no other macft trains here): the caller saves the
        recipe with save_recipe() once it holds the lock, so a later failure changes nothing."""
        state = self.open()
        with self.lock():  # busy now, or a damaged checkpoint: say so before anything loads
            if (ckpt := self.latest_checkpoint()) is not None:
                self.load_checkpoint(ckpt)
        if recipe is not None:
            saved = self.recipe() if self.recipe_path.exists() else {}
            resume.check(self.path, saved, recipe, state.get("data_digest"), data_digest, force)
            if write:
                self.save_recipe(recipe, data_digest)
        return state

    @_writes("recipe.yaml")
    def save_recipe(self, recipe: dict, data_digest=None) -> None:
        """The recipe a resume runs with (and the digest of its data, when given)."""
        text = yaml.safe_dump(recipe, sort_keys=False)
        if not self.recipe_path.is_file() or self.recipe_path.read_text(encoding="utf-8") != text:
            atomic_write_text(self.recipe_path, text)
        if data_digest is not None and self.state.get("data_digest") != data_digest:
            self.update_state(data_digest=data_digest)

    def recipe(self) -> dict:
        return read_recipe_file(self.recipe_path)

    @contextlib.contextmanager
    def lock(self):
        """Hold an exclusive lock on the run so two trainings never write the same folder."""
        import fcntl

        if self._lock_depth:  # already held by this RunDir: nest
            self._lock_depth += 1
            try:
                yield self
            finally:
                self._lock_depth -= 1
            return
        self.path.mkdir(parents=True, exist_ok=True)
        # O_APPEND: taking the lock never changes the file; O_NOFOLLOW: nor a file it links to
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(self.path / ".lock", flags, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise RunError(
                    f"{self.path} is busy: another macft is training there; wait for it, "
                    "or pick another --out"
                ) from None
            self._clean_temp()
            self._reserve()
            self._lock_depth = 1
            try:
                yield self
            finally:
                self._lock_depth = 0
                self._release_reserve()
        finally:
            os.close(fd)  # and with it the lock

    def _reserve(self) -> None:
        # Best effort: a disk already too full for it gets no reserve.
        with contextlib.suppress(OSError):
            path = self.path / RESERVE
            if not path.is_file() or path.stat().st_size < RESERVE_BYTES:
                atomic_write_bytes(path, bytes(RESERVE_BYTES))  # zeros, really allocated

    def _release_reserve(self) -> None:
        with contextlib.suppress(OSError):
            (self.path / RESERVE).unlink(missing_ok=True)

    def is_locked(self) -> bool:
        """True while some process (this one included) holds the run's lock."""
        import fcntl

        try:
            fd = os.open(self.path / ".lock", os.O_RDONLY)
        except OSError:
            return False  # no lock file: nobody ever trained here
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True
        finally:
            os.close(fd)  # closing drops a lock taken by this probe
        return False

    def _clean_temp(self) -> None:
        """Leftovers of a crash mid-write (the good files they were to replace are intact): only
        names macft writes, so a folder of the user's own loses nothing."""
        for p in self.path.iterdir():
            m = TEMP_RE.match(p.name)
            if m and m["name"] in (*RUN_FILES, RESERVE) and not p.is_dir():
                p.unlink(missing_ok=True)
        if not self.checkpoints.is_dir():
            return
        for p in self.checkpoints.iterdir():
            m = OLD_RE.match(p.name) or TEMP_DIR_RE.match(p.name) or TEMP_RE.match(p.name)
            if not (m and SWAPPED.match(m["name"])) and not TRASH_RE.match(p.name):
                continue
            if p.is_dir() and OLD_RE.match(p.name) and not (self.checkpoints / m["name"]).exists():
                # Killed between moving the old folder aside and renaming the new one in.
                os.replace(p, self.checkpoints / m["name"])
            elif p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)

    # --- state and metrics ----------------------------------------------------------------
    @property
    def state(self) -> dict:
        try:
            state = json.loads(self.state_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (ValueError, RecursionError) as e:  # damaged by something else than macft
            raise RunError(
                f"{self.state_path}: damaged ({type(e).__name__}); delete it: the run's "
                "checkpoints still resume it"
            ) from None
        if not isinstance(state, dict):
            raise RunError(f"{self.state_path}: damaged (not an object); delete it")
        return state

    @_writes("state.json")
    def update_state(self, **fields) -> dict:
        state = {**self.state, **fields}
        atomic_write_json(self.state_path, state)
        return state

    def mark_failed(self, error: str, **fields) -> None:
        """state.json says failed and why, if at all possible: on a full disk, the reserve kept
        aside while training is given up to make room for it."""
        for _ in range(2):
            try:
                self.update_state(status="failed", error=error, **fields)
                return
            except RunError:
                self._release_reserve()

    @_writes("metrics.jsonl")
    def append_metrics(self, record: dict) -> None:
        """One whole JSON line per write, flushed to disk; a line torn by a kill is ended first."""
        line = (json_text(record) + "\n").encode("utf-8")
        fd = os.open(self.metrics_path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                line = b"\n" + line  # the torn line stays unparseable and is skipped on read
            if os.write(fd, line) < len(line):
                raise OSError(errno.ENOSPC, "the line was cut short")
            fsync_fd(fd)
        finally:
            os.close(fd)

    def read_metrics(self) -> list[dict]:
        if not self.metrics_path.exists():
            return []
        out = []
        for line in self.metrics_path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):
                continue  # a torn last line from a hard crash (or a line someone broke)
            if isinstance(record, dict):
                out.append(record)
        return out

    @_writes("metrics.jsonl")
    def trim_metrics(self, max_step: int) -> None:
        """Drop records past a checkpoint's step, so a resumed run does not repeat them."""
        if not self.metrics_path.exists():
            return
        keep = [r for r in self.read_metrics() if r.get("step", 0) <= max_step]
        atomic_write_text(self.metrics_path, "".join(json_text(r) + "\n" for r in keep))

    # --- adapters and checkpoints ---------------------------------------------------------
    @_writes("adapters.safetensors")
    def write_adapters(self, weights: dict, config: dict | None, folder: Path | None = None):
        """adapters.safetensors + adapter_config.json, the pair mlx_lm.load(adapter_path=) reads."""
        if folder is None:
            _refuse_non_finite(self.path / "adapters.safetensors", weights)
            self.check_space(tensor_bytes(weights), "adapters.safetensors")
        _adapter_files(Path(folder) if folder is not None else self.path, weights, config)

    @_writes("a checkpoint")
    def save_checkpoint(
        self,
        step: int,
        adapters: dict,
        optimizer_state: dict,
        state_dict: dict,
        adapter_config: dict | None = None,
    ) -> Path:
        """checkpoints/step-NNNNNN/ with adapters, optimizer state and trainer state; keep last K."""
        dest = self.checkpoints / f"step-{step:06d}"
        _refuse_non_finite(dest, adapters, optimizer_state)
        self.check_space(tensor_bytes(adapters, optimizer_state), f"checkpoints/{dest.name}")
        self.checkpoints.mkdir(parents=True, exist_ok=True)

        def files(tmp: Path) -> None:
            _adapter_files(tmp, adapters, adapter_config)
            atomic_save_safetensors(tmp / "optimizer.safetensors", optimizer_state)
            atomic_write_json(tmp / "state.json", {**state_dict, "step": step})

        write_folder(dest, files)
        self._prune()
        return dest

    def check_space(self, nbytes: int, what: str) -> None:
        check_space(
            self.path,
            nbytes,
            what,
            "free space there (macft runs lists runs and their sizes), or keep fewer checkpoints "
            f"with --set train.save_every=0; then continue with: macft train --resume --out {self.path}",
        )

    def list_checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first (a folder only gets its name when complete)."""
        if not self.checkpoints.is_dir():
            return []
        found = []
        for p in self.checkpoints.iterdir():
            m = CHECKPOINT_RE.match(p.name)
            if m and p.is_dir() and (p / "state.json").exists():
                found.append((int(m.group(1)), p))
        return [p for _, p in sorted(found)]

    def latest_checkpoint(self) -> Path | None:
        found = self.list_checkpoints()
        return found[-1] if found else None

    def _prune(self) -> None:
        if self.keep_last <= 0:
            return
        for old in self.list_checkpoints()[: -self.keep_last]:
            # Rename first so a crash mid-delete never leaves a half checkpoint under a good name.
            trash = old.with_name(f".trash-{old.name}")
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(old, trash)
            shutil.rmtree(trash, ignore_errors=True)

    @staticmethod
    def load_checkpoint(folder: Path) -> tuple[dict, dict, dict]:
        """(adapters, optimizer state, trainer state) of a checkpoint folder."""
        folder = Path(folder)
        try:
            adapters = mx.load(str(folder / "adapters.safetensors"))
            opt_state = mx.load(str(folder / "optimizer.safetensors"))
            state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError, RuntimeError, RecursionError) as e:
            raise RunError(
                f"{folder}: checkpoint unreadable ({type(e).__name__}: {str(e)[:200]}); "
                "delete it to use an older one"
            ) from None
        return adapters, opt_state, state

    @property
    def best(self) -> Path | None:
        """checkpoints/best: the adapters with the lowest validation loss so far."""
        p = self.checkpoints / "best"
        return p if (p / "adapters.safetensors").exists() else None

    @_writes("checkpoints/best")
    def save_best(self, adapters: dict, adapter_config: dict | None, info: dict) -> Path:
        dest = self.checkpoints / "best"
        _refuse_non_finite(dest, adapters)
        self.check_space(tensor_bytes(adapters), "checkpoints/best")
        self.checkpoints.mkdir(parents=True, exist_ok=True)

        def files(tmp: Path) -> None:
            _adapter_files(tmp, adapters, adapter_config)
            atomic_write_json(tmp / "state.json", info)

        write_folder(dest, files)
        return dest


def _macft_own(name: str) -> bool:
    """What macft leaves in a folder before it holds a run: its lock, its reserve, temp files."""
    m = TEMP_RE.match(name)
    return name in (".lock", RESERVE) or bool(m and m["name"] in (*RUN_FILES, RESERVE))


def _adapter_files(folder: Path, weights: dict, config: dict | None) -> None:
    atomic_save_safetensors(folder / "adapters.safetensors", weights)
    if config is not None:
        atomic_write_json(folder / "adapter_config.json", config)


def _refuse_non_finite(dest: Path, *trees: dict) -> None:
    """Never write NaN or infinite weights: they would replace the last good ones."""
    arrays = [(k, v) for t in trees for k, v in t.items() if mx.issubdtype(v.dtype, mx.floating)]
    if not arrays:
        return
    ok = mx.stack([mx.isfinite(v).all() for _, v in arrays]).tolist()
    bad = [k for (k, _), good in zip(arrays, ok, strict=True) if not good]
    if bad:
        raise RunError(
            f"{dest}: not written: {len(bad)} tensors hold NaN or infinite values (e.g. "
            f"{bad[0]}); the training diverged: the last checkpoint is kept; lower "
            "train.learning_rate and resume with --force"
        )
