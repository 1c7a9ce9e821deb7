"""What a server serves: one base loaded once (as training loaded it) and each run's adapters
resident on it, by name; runs added and removed while serving."""

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from macft.errors import MacftError, ModelError, RunError
from macft.lora.multi import AdapterBank
from macft.runs.folder import RunDir
from macft.runs.model import RunAdapters, load_run_base, read_adapters


class NameTaken(MacftError):
    """A model of that name is served already."""


@dataclass
class Served:
    name: str  # what requests put in "model"
    slot: int  # the adapter bank's slot (0: the base)
    system: str | None  # the run's system prompt, used when a request gives none
    source: str  # the run folder, or the base's path
    created: int  # when it was loaded (unix seconds), as /v1/models reports it


def _same_base(a: str, b: str) -> bool:
    def key(p: str) -> str:
        path = Path(p).expanduser()
        return str(path.resolve()) if path.exists() else p.strip().lower()

    return key(a) == key(b)


def check_base(path: str, ra: RunAdapters, base_path: str) -> None:
    """Adapters trained on another base: a clear error naming the run."""
    if not _same_base(ra.base_path, base_path):
        raise ModelError(
            f"{path} was trained on {ra.base_path}, not on {base_path} (the base being "
            "served); one server serves runs of one base: serve it apart, or give --model "
            "if both name the same model"
        )


def run_name(path: str) -> str:
    return Path(path).expanduser().resolve().name


def base_name(path: str) -> str:
    return Path(path).name or path


def _read(path: str, model: str | None) -> RunAdapters:
    run = RunDir(Path(path).expanduser())
    if not run.path.is_dir() or not (run.holds_run() or run.config_path.is_file()):
        raise RunError(
            f"{path} is not a run folder (no recipe.yaml, adapters or adapter_config.json); "
            "serve takes run folders or mlx-lm adapter folders (the base is --model)"
        )
    ra = read_adapters(run, model, None)
    if not ra.base_path:
        raise RunError(
            f"{path}: no recipe.yaml says which base these adapters belong to; "
            f"name it: macft serve {path} --model PATH"
        )
    return ra


class Catalog:
    """Names -> served models, all on one base; the bank holds the adapters."""

    def __init__(self, base, base_path: str, explicit_base: bool):
        self.base, self.base_path = base, base_path
        self.explicit_base = explicit_base  # --model: runs' recipes need not name this base
        self.model, self.tokenizer = base.model, base.tokenizer
        self.bank = AdapterBank(base.model)
        name = self.base_name = base_name(base_path)
        self.models: dict[str, Served] = {name: Served(name, 0, None, base_path, int(time.time()))}
        self.lock = threading.Lock()  # add/remove against lookups from request threads
        # The Rust tokenizer may refuse two threads at once ("Already borrowed"): request
        # threads encode and the worker decodes under this lock.
        self.tokenizer_lock = threading.Lock()
        cfg = base.config
        self.context = cfg.get("max_position_embeddings") or cfg.get("n_ctx")

    def get(self, name: str) -> Served | None:
        with self.lock:
            return self.models.get(name)

    def names(self) -> list[Served]:
        with self.lock:
            return list(self.models.values())

    def add_run(self, path: str, ra: RunAdapters | None = None, name: str | None = None) -> Served:
        """Make a run's adapters resident under its folder's name (call on the MLX thread)."""
        ra = ra or _read(path, self.base_path if self.explicit_base else None)
        if not self.explicit_base:
            check_base(path, ra, self.base_path)
        name = name or run_name(path)
        with self.lock:
            if name in self.models:
                raise NameTaken(
                    f"a model named {name!r} is already served; remove it first or rename the "
                    f"folder {path}"
                )
        slot = self.bank.add(name, ra.weights, ra.scale, str(path))
        served = Served(name, slot, ra.system, str(ra.run.path), int(time.time()))
        with self.lock:
            self.models[name] = served
        return served

    def remove(self, name: str) -> None:
        """Unload a run's adapters (call on the MLX thread); the base stays."""
        with self.lock:
            if name not in self.models:
                raise MacftError(f"no model named {name!r} is served")
            if name == self.base_name:
                raise MacftError(f"{name} is the base; it stays while the server runs")
            del self.models[name]
        self.bank.remove(name)


def open_catalog(runs: list[str], model: str | None) -> tuple[Catalog, list[str]]:
    """Read every run's adapters (so a bad one fails before the base loads), load the base
    once as the first run's training did, and make every run resident. Returns notes."""
    if not runs and model is None:
        raise MacftError(
            "nothing to serve; give run folders (macft serve runs/a runs/b) or --model"
        )
    read = [(path, _read(path, model)) for path in runs]
    base_path = model or read[0][1].base_path
    first = read[0][1] if read else None
    if model is None:
        for path, ra in read[1:]:
            check_base(path, ra, base_path)  # before the base loads: fail fast
    names = [run_name(path) for path in runs]
    twice = sorted({n for n in names if names.count(n) > 1 or n == base_name(base_path)})
    if twice:
        raise MacftError(
            f"two models would be served as {', '.join(twice)}; each run is served under its "
            "folder's name, so give folders with different names"
        )
    base = load_run_base(base_path, first.model_cfg if first else {}, first and first.origin)
    # Read every weight now, not on the first request, so start-up reports the memory.
    mx.eval(base.model.parameters())
    base.model.eval()
    catalog = Catalog(base, base_path, explicit_base=model is not None)
    for path, ra in read:
        catalog.add_run(path, ra)
    return catalog, [ra.note for _, ra in read if ra.note]
