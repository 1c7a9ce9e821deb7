"""The run folder on disk: recipe, adapters, checkpoints, metrics and state, all written atomically."""

import contextlib
import json
import os
import re
import shutil
from pathlib import Path

import mlx.core as mx
import yaml

from macft.atomic import (
    atomic_save_safetensors,
    atomic_write_json,
    atomic_write_text,
    check_space,
    tensor_bytes,
    write_folder,
)
from macft.errors import RunError

CHECKPOINT_RE = re.compile(r"^step-(\d+)$")
OLD_RE = re.compile(r"^\.old-(.+)-\d+$")  # a folder moved aside by write_folder
# Sections that must not change under a resumed run: the checkpoint's adapters depend on them.
FIXED_SECTIONS = ("model", "lora")


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
        if self.path.exists() and not self.path.is_dir():
            raise RunError(f"{self.path} is a file, not a run folder; pick another --out")
        if self.holds_run():
            raise RunError(
                f"{self.path} already holds a run; continue it with --resume, or pick another --out"
            )

    def create(self, recipe: dict, source: dict | None = None) -> None:
        """Start a new run folder holding the resolved recipe; refuses a folder with a run."""
        self.check_free()
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.recipe_path, yaml.safe_dump(recipe, sort_keys=False))
        if source is not None:
            atomic_write_json(self.base_path, source)
        atomic_write_json(self.state_path, {"status": "created", "step": 0, "best_val_loss": None})

    def open(self) -> dict:
        """An existing run, for resuming; returns its state."""
        if not self.path.is_dir() or not self.holds_run():
            raise RunError(
                f"{self.path}: no run to resume there; start one with macft train --out {self.path}"
            )
        return self.state

    def open_for_resume(self, recipe: dict | None = None, write: bool = True) -> dict:
        """Like open(); with a recipe, refuse changed model/lora settings and record the rest.

        write=False only checks (and that no other macft trains here): the caller saves the
        recipe with save_recipe() once it holds the lock, so a later failure changes nothing."""
        state = self.open()
        with self.lock():  # busy now, or a damaged checkpoint: say so before anything loads
            if (ckpt := self.latest_checkpoint()) is not None:
                self.load_checkpoint(ckpt)
        if recipe is not None:
            saved = self.recipe() if self.recipe_path.exists() else {}
            changed = [
                f"{sec}.{k}"
                for sec in FIXED_SECTIONS
                for k in sorted(set(saved.get(sec, {})) | set(recipe.get(sec, {})))
                if saved.get(sec, {}).get(k) != recipe.get(sec, {}).get(k)
            ]
            if saved and changed:
                raise RunError(
                    f"{self.path}: cannot resume with changed {', '.join(changed)}; "
                    "keep the run's recipe.yaml settings, or start a new run with another --out"
                )
            if write:
                self.save_recipe(recipe)
        return state

    def save_recipe(self, recipe: dict) -> None:
        text = yaml.safe_dump(recipe, sort_keys=False)
        if not self.recipe_path.is_file() or self.recipe_path.read_text(encoding="utf-8") != text:
            atomic_write_text(self.recipe_path, text)

    def recipe(self) -> dict:
        return yaml.safe_load(self.recipe_path.read_text(encoding="utf-8")) or {}

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
        with open(self.path / ".lock", "a") as f:  # "a": taking the lock never touches the file
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise RunError(
                    f"{self.path} is busy: another macft is training there; wait for it, "
                    "or pick another --out"
                ) from None
            self._clean_temp()
            self._lock_depth = 1
            try:
                yield self
            finally:
                self._lock_depth = 0
                fcntl.flock(f, fcntl.LOCK_UN)

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
        # Leftovers of a crash mid-write; the good files they were meant to replace are intact.
        for folder in (self.path, self.checkpoints):
            if folder.is_dir():
                for p in folder.iterdir():
                    m = OLD_RE.match(p.name)
                    if m and p.is_dir() and not (folder / m[1]).exists():
                        # Killed between moving the old folder aside and renaming the new one in.
                        os.replace(p, folder / m[1])
                        continue
                    if p.name.startswith((".tmp-", ".old-", ".trash-")) or ".tmp-" in p.name:
                        if p.is_dir():
                            shutil.rmtree(p, ignore_errors=True)
                        else:
                            p.unlink(missing_ok=True)

    # --- state and metrics ----------------------------------------------------------------
    @property
    def state(self) -> dict:
        try:
            return json.loads(self.state_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}

    def update_state(self, **fields) -> dict:
        state = {**self.state, **fields}
        atomic_write_json(self.state_path, state)
        return state

    def append_metrics(self, record: dict) -> None:
        """One whole JSON line per write, flushed to disk; a line torn by a kill is ended first."""
        line = (json.dumps(record) + "\n").encode("utf-8")
        fd = os.open(self.metrics_path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                line = b"\n" + line  # the torn line stays unparseable and is skipped on read
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)

    def read_metrics(self) -> list[dict]:
        if not self.metrics_path.exists():
            return []
        out = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a torn last line from a hard crash
        return out

    def trim_metrics(self, max_step: int) -> None:
        """Drop records past a checkpoint's step, so a resumed run does not repeat them."""
        if not self.metrics_path.exists():
            return
        keep = [r for r in self.read_metrics() if r.get("step", 0) <= max_step]
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in keep))

    # --- adapters and checkpoints ---------------------------------------------------------
    def write_adapters(self, weights: dict, config: dict | None, folder: Path | None = None):
        """adapters.safetensors + adapter_config.json, the pair mlx_lm.load(adapter_path=) reads."""
        if folder is None:
            self.check_space(tensor_bytes(weights), "adapters.safetensors")
        folder = Path(folder) if folder is not None else self.path
        atomic_save_safetensors(folder / "adapters.safetensors", weights)
        if config is not None:
            atomic_write_json(folder / "adapter_config.json", config)

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
        self.check_space(tensor_bytes(adapters, optimizer_state), f"checkpoints/{dest.name}")
        self.checkpoints.mkdir(parents=True, exist_ok=True)

        def files(tmp: Path) -> None:
            self.write_adapters(adapters, adapter_config, tmp)
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
        except (OSError, ValueError, RuntimeError) as e:
            raise RunError(
                f"{folder}: checkpoint unreadable ({e}); delete it to use an older one"
            ) from None
        return adapters, opt_state, state

    @property
    def best(self) -> Path | None:
        """checkpoints/best: the adapters with the lowest validation loss so far."""
        p = self.checkpoints / "best"
        return p if (p / "adapters.safetensors").exists() else None

    def save_best(self, adapters: dict, adapter_config: dict | None, info: dict) -> Path:
        dest = self.checkpoints / "best"
        self.check_space(tensor_bytes(adapters), "checkpoints/best")
        self.checkpoints.mkdir(parents=True, exist_ok=True)

        def files(tmp: Path) -> None:
            self.write_adapters(adapters, adapter_config, tmp)
            atomic_write_json(tmp / "state.json", info)

        write_folder(dest, files)
        return dest
