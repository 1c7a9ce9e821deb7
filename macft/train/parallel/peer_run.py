"""The run folder as ranks other than 0 see it: RunDir's methods, none of which touches the disk."""

import contextlib
from pathlib import Path

from macft.errors import RunError


class PeerRun:
    """The run folder as a rank other than 0 sees it: every write is rank 0's job, so this
    writes nothing, reads nothing and holds no checkpoint; the trainer's sync() hands it rank
    0's state. It has each method of RunDir (a test holds them equal), so a call that RunDir
    lacks fails on every rank alike."""

    def __init__(self, path):
        self.path = Path(path)

    # creating and opening
    def holds_run(self) -> bool:
        return False

    def check_free(self) -> None:
        pass

    def create(self, recipe: dict, source: dict | None = None, data_digest=None) -> None:
        pass

    def open(self) -> dict:
        return {}

    def open_for_resume(
        self, recipe: dict | None = None, write: bool = True, data_digest=None, force=False
    ) -> dict:
        return {}

    def save_recipe(self, recipe: dict, data_digest=None) -> None:
        pass

    def recipe(self) -> dict:
        return {}

    def lock(self):
        return contextlib.nullcontext(self)

    def is_locked(self) -> bool:
        return False

    # state and metrics
    @property
    def state(self) -> dict:
        return {}

    def update_state(self, **fields) -> dict:
        return {}

    def mark_failed(self, error: str, **fields) -> None:
        pass

    def append_metrics(self, record: dict) -> None:
        pass

    def read_metrics(self) -> list[dict]:
        return []

    def trim_metrics(self, max_step: int) -> None:
        pass

    # adapters and checkpoints
    def write_adapters(self, weights: dict, config: dict | None, folder=None) -> None:
        pass

    def save_checkpoint(self, step, adapters, optimizer_state, state_dict, adapter_config=None):
        return None

    def check_space(self, nbytes: int, what: str) -> None:
        pass

    def list_checkpoints(self) -> list:
        return []

    def latest_checkpoint(self):
        return None

    @staticmethod
    def load_checkpoint(folder):
        raise RunError(f"{folder}: only rank 0 reads checkpoints; the others get its state")

    @property
    def best(self):
        return None

    def save_best(self, adapters: dict, adapter_config: dict | None, info: dict):
        return None
