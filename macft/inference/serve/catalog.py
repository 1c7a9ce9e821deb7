"""What a server serves: one base loaded once (as training loaded it) and runs by name, their
adapters loaded on the base on first request, at most max_adapters at once (the least recently
used one no running request needs makes room); runs added and removed while serving."""

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from macft.errors import MacftError, ModelError, RunError
from macft.inference.serve import DEFAULT_MAX_ADAPTERS
from macft.lora.multi import AdapterBank
from macft.runs.folder import RunDir
from macft.runs.model import RunAdapters, load_run_base, read_adapters


class NameTaken(MacftError):
    """A model of that name is served already."""


@dataclass
class Served:
    name: str  # what requests put in "model"
    system: str | None  # the run's system prompt, used when a request gives none
    source: str  # the run folder, or the base's path
    created: int  # when it was registered (unix seconds), as /v1/models reports it
    path: str | None = None  # where its adapters are read from on load; None: the base


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

    def __init__(
        self, base, base_path: str, explicit_base: bool, max_adapters: int = DEFAULT_MAX_ADAPTERS
    ):
        self.base, self.base_path = base, base_path
        self.explicit_base = explicit_base  # --model: runs' recipes need not name this base
        self.model, self.tokenizer = base.model, base.tokenizer
        self.bank = AdapterBank(base.model)
        name = self.base_name = base_name(base_path)
        self.models: dict[str, Served] = {name: Served(name, None, base_path, int(time.time()))}
        self.max_adapters = max_adapters
        # name -> bank slot of the adapters loaded now, least recently used first
        self.resident: OrderedDict[str, int] = OrderedDict()
        self.lock = threading.Lock()  # add/remove/load against lookups from request threads
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

    def resident_names(self) -> list[str]:
        with self.lock:
            return list(self.resident)

    def _read(self, path: str) -> RunAdapters:
        return _read(path, self.base_path if self.explicit_base else None)

    def add_run(self, path: str, ra: RunAdapters | None = None, name: str | None = None) -> Served:
        """Serve a run under its folder's name: its adapters are checked against the base now
        and loaded on its first request (call on the MLX thread)."""
        ra = ra or self._read(path)
        if not self.explicit_base:
            check_base(path, ra, self.base_path)
        name = name or run_name(path)
        with self.lock:
            if name in self.models:
                raise NameTaken(
                    f"a model named {name!r} is already served; remove it first or rename the "
                    f"folder {path}"
                )
        self.bank.check(ra.weights, str(path))
        served = Served(name, ra.system, str(ra.run.path), int(time.time()), str(path))
        with self.lock:
            self.models[name] = served
        return served

    def slot(self, name: str, in_use: set[str], log) -> int | None:
        """The bank slot of `name`'s adapters, loaded now if they are not (call on the MLX
        thread). At the cap the least recently used adapter not in `in_use` (the running
        requests' models) is evicted first; None when every resident one is in use."""
        if name == self.base_name:
            return 0
        with self.lock:
            if name in self.resident:
                self.resident.move_to_end(name)
                return self.resident[name]
            served = self.models.get(name)
        if served is None:
            raise MacftError(f"model {name!r} is no longer served")
        if len(self.resident) >= self.max_adapters:
            victim = next((n for n in self.resident if n not in in_use), None)
            if victim is None:
                return None  # the request waits for a running one to end
            self._unload(victim)
            log(f"evicted {victim} (least recently used) to load {name}")
        # Read again from disk: an evicted adapter holds no memory at all.
        ra = self._read(served.path)
        slot = self.bank.add(name, ra.weights, ra.scale, served.path)
        with self.lock:
            self.resident[name] = slot
        log(f"loaded {name} ({len(self.resident)} of at most {self.max_adapters} resident)")
        return slot

    def _unload(self, name: str) -> None:
        with self.lock:
            del self.resident[name]
        self.bank.remove(name)

    def remove(self, name: str) -> None:
        """Unload a run's adapters (call on the MLX thread); the base stays."""
        with self.lock:
            if name not in self.models:
                raise MacftError(f"no model named {name!r} is served")
            if name == self.base_name:
                raise MacftError(f"{name} is the base; it stays while the server runs")
            del self.models[name]
            loaded = name in self.resident
        if loaded:
            self._unload(name)


def open_catalog(
    runs: list[str], model: str | None, max_adapters: int = DEFAULT_MAX_ADAPTERS
) -> tuple[Catalog, list[str]]:
    """Read every run's adapters (so a bad one fails before the base loads), load the base
    once as the first run's training did, and check every run against it (each is loaded on
    its first request). Returns notes."""
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
    catalog = Catalog(base, base_path, explicit_base=model is not None, max_adapters=max_adapters)
    for path, ra in read:
        catalog.add_run(path, ra)
    return catalog, [ra.note for _, ra in read if ra.note]
