"""Data-parallel training with mx.distributed: ranks, shards, gradient sums, rank-0 writes, watchdog."""

import contextlib
import hashlib
import json
import os
import signal
import sys
import time

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_map_with_path, tree_unflatten

from macft.data.encode import Pair
from macft.errors import DataError, MacftError, RunError
from macft.train.parallel.peer_run import PeerRun
from macft.train.parallel.watchdog import Watchdog

# Set by mlx.launch (ring, JACCL) or mpirun: this process is one rank of a group.
LAUNCH_ENV = ("MLX_RANK", "MLX_HOSTFILE", "MLX_JACCL_COORDINATOR", "OMPI_COMM_WORLD_SIZE")
TIMEOUT_ENV = "MACFT_PEER_TIMEOUT"
DEFAULT_TIMEOUT = 600.0  # seconds without an answer from the other ranks
SETUP_FACTOR = 3  # loading a model can take much longer on one Mac than another (a download)
STEP_FACTOR = 5  # a step may wait this many times the slowest step seen for a slower Mac
CHUNK_BYTES = 64 << 20  # gradients are summed in pieces of this size: fewer round trips


class PeerLost(RunError):
    """Another rank stopped or became unreachable in the middle of a collective."""


class World:
    """This process's place among the training processes; one process alone has size 1.

    Every method that talks to the other ranks (from_main, agree, sync, sum_step, sum_eval)
    must be called by all ranks in the same order, or they wait for each other forever."""

    def __init__(self, group=None, rank: int = 0, size: int = 1):
        self.group = group
        self.rank = group.rank() if group is not None else rank
        self.size = group.size() if group is not None else size
        self.main = self.rank == 0
        self.slowest_step = 0.0  # seconds between two gradient sums: sets the step timeout
        self._last_sum = None
        self._on_timeout: list = []
        self._watchdog = Watchdog(self.hung, self._on_timeout) if self.size > 1 else None

    def __repr__(self) -> str:
        return f"World(rank={self.rank}, size={self.size})"

    # --- who does what --------------------------------------------------------------------
    def shard(self, indices: list) -> list:
        """This rank's examples of a global batch: every size-th one (lengths stay balanced)."""
        return list(indices[self.rank :: self.size])

    def run_view(self, run):
        """The run folder for this rank: rank 0 owns it; the others never touch the disk."""
        return run if self.main else PeerRun(run.path)

    def on_timeout(self, callback) -> None:
        """callback(message) runs (best effort) before a rank that waited too long exits."""
        self._on_timeout.append(callback)

    # --- collectives ----------------------------------------------------------------------
    def from_main(self, fn):
        """fn() on rank 0, its JSON-able result on every rank (the others do not call fn)."""
        if self.size == 1:
            return fn()
        data = json.dumps(fn(), default=str).encode() if self.main else b""
        n = self._sum([mx.array([len(data)], dtype=mx.int64)], "setup")[0].item()
        buf = np.frombuffer(data, dtype=np.uint8) if self.main else np.zeros(n, np.uint8)
        return json.loads(bytes(np.array(self._sum([mx.array(buf)], "setup")[0])))

    def agree(self, what: str, value: str) -> None:
        """Every rank must hold the same value (data, model): name the ranks that differ."""
        if self.size == 1:
            return
        table = np.zeros((self.size, 16), np.uint8)
        table[self.rank] = np.frombuffer(hashlib.sha256(value.encode()).digest()[:16], np.uint8)
        table = np.array(self._sum([mx.array(table)], "setup")[0])
        odd = [r for r in range(1, self.size) if not np.array_equal(table[r], table[0])]
        if odd:
            ranks = ", ".join(map(str, odd))
            raise DataError(
                f"rank {ranks} loaded other {what} than rank 0: put the same data file, model "
                "and macft version at the same paths on every machine"
            )

    def sync(self, model, optimizer, state: dict) -> dict:
        """Start every rank from rank 0's adapters, optimizer state and counters (its checkpoint
        on --resume): the other machines need no copy of the run folder. Returns the counters."""
        if self.size == 1:
            return state
        state = self.from_main(lambda: state)
        params = self._broadcast(dict(tree_flatten(model.trainable_parameters())))
        model.update(tree_unflatten(list(params.items())))
        opt = self._broadcast(dict(tree_flatten(optimizer.state)))
        optimizer.state = tree_map_with_path(lambda path, _: opt[path], optimizer.state)
        mx.eval(model.trainable_parameters(), optimizer.state)
        return state

    def sum_step(self, loss, grads, n_targets: int, n_inputs: int, params, step: int):
        """accumulate()'s sums over all ranks: the same as one process on the global batch.

        A rank whose share held no target tokens sends zeros (`params` gives the shapes)."""
        if self.size == 1:
            return loss, grads, n_targets, n_inputs
        if grads is None:
            grads = tree_map(mx.zeros_like, params)
        flat = tree_flatten(grads)
        counts = mx.array([n_targets, n_inputs], dtype=mx.int64)
        shape = loss.shape  # a vector for preference pairs: the loss and its stats
        loss = loss.astype(mx.float32).reshape(-1)
        summed = self._sum([loss, *(v for _, v in flat), counts], f"step {step}")
        grads = tree_unflatten([(k, v) for (k, _), v in zip(flat, summed[1:-1], strict=True)])
        n_targets, n_inputs = summed[-1].tolist()
        now = time.perf_counter()
        if self._last_sum is not None:
            self.slowest_step = max(self.slowest_step, now - self._last_sum)
        self._last_sum = now
        return summed[0].reshape(shape), grads, n_targets, n_inputs

    def sum_eval(self, total: float, tokens: int) -> tuple[float, int]:
        """A validation loss sum and token count over all ranks (each evaluated its share)."""
        if self.size == 1:
            return total, tokens
        s = self._sum([mx.array([total], mx.float32), mx.array([tokens], mx.int64)], "validation")
        return s[0].item(), s[1].item()

    def _broadcast(self, arrays: dict) -> dict:
        # A sum where only rank 0 adds anything is a broadcast: x + 0 is exactly x.
        keys = list(arrays)
        send = [arrays[k] if self.main else mx.zeros_like(arrays[k]) for k in keys]
        return dict(zip(keys, self._sum(send, "setup"), strict=True))

    def _sum(self, arrays: list, what: str) -> list:
        """all_sum of each array, same-dtype arrays packed together in pieces of CHUNK_BYTES.

        Each piece is evaluated on its own: after a lost peer MLX's ring backend fails the
        collective in flight, but one queued behind it waits forever (its socket threads have
        ended), so no collective may start after a failed one."""
        out: list = [None] * len(arrays)
        with self._waiting(what):
            for part in self._pieces(arrays):
                flat = mx.concatenate([arrays[i].reshape(-1) for i in part])
                summed = mx.distributed.all_sum(flat, group=self.group)
                try:
                    mx.eval(summed)
                except RuntimeError as e:  # the ring backend: "connection to a peer was lost"
                    raise PeerLost(self._lost(what, str(e))) from None
                offset = 0
                for i in part:
                    n = arrays[i].size
                    out[i] = summed[offset : offset + n].reshape(arrays[i].shape)
                    offset += n
        return out

    @staticmethod
    def _pieces(arrays: list) -> list:
        """Indices of the arrays summed together: same dtype, up to CHUNK_BYTES a piece."""
        groups: dict = {}
        for i, a in enumerate(arrays):
            groups.setdefault(a.dtype, []).append(i)
        pieces = []
        for idx in groups.values():
            start = 0
            while start < len(idx):
                end, nbytes = start, 0
                while end < len(idx) and (end == start or nbytes < CHUNK_BYTES):
                    nbytes += arrays[idx[end]].nbytes
                    end += 1
                pieces.append(idx[start:end])
                start = end
        return pieces

    def _others(self) -> str:
        return f"rank {1 - self.rank}" if self.size == 2 else "another rank"

    def _lost(self, what: str, why: str) -> str:
        message = f"lost {self._others()} {_during(what)} ({why.strip()}); its own message says why"
        if self.main and what != "setup":
            message += "; the last whole step is saved: continue with --resume"
        return message

    def _waiting(self, what: str):
        if self._watchdog is None:
            return contextlib.nullcontext()
        floor = peer_timeout()
        if what in ("setup", "validation"):
            limit = SETUP_FACTOR * floor
        else:
            limit = max(floor, STEP_FACTOR * self.slowest_step)
        return self._watchdog.waiting(what, limit)

    def hung(self, what: str, limit: float) -> str:
        return (
            f"rank {self.rank} stopped: no answer from {self._others()} for {limit:.0f} s "
            f"{_during(what)}; it hangs, or its machine left the network. Raise {TIMEOUT_ENV} "
            "(seconds) for slow machines; continue from the last checkpoint with --resume"
        )


def _during(what: str) -> str:
    return "while starting" if what == "setup" else f"during {what}"


SOLO = World()


def peer_timeout() -> float:
    text = os.environ.get(TIMEOUT_ENV, "")
    try:
        return float(text) if text else DEFAULT_TIMEOUT
    except ValueError:
        raise RunError(f"{TIMEOUT_ENV}={text!r}: not a number of seconds") from None


def launched() -> bool:
    return any(os.environ.get(k) is not None for k in LAUNCH_ENV)


def init() -> World:
    """The world this process was launched into (by mlx.launch or mpirun), else one process."""
    if not launched():
        return SOLO
    # The size is unknown until every rank has connected; a missing one is waited for forever.
    rank = int(os.environ.get("MLX_RANK") or os.environ.get("OMPI_COMM_WORLD_RANK") or 0)
    dog = Watchdog(World(rank=rank, size=0).hung)
    with dog.waiting("setup", SETUP_FACTOR * peer_timeout()):
        group = mx.distributed.init()
    if group.size() == 1:
        return SOLO
    # mlx.launch stops the other ranks with SIGTERM when one fails: treat it as Ctrl-C so rank
    # 0 saves a checkpoint (the trainer holds Ctrl-C while a step is committed).
    signal.signal(signal.SIGTERM, lambda *_: os.kill(os.getpid(), signal.SIGINT))
    return World(group)


def fingerprint(*parts) -> str:
    """A digest of the examples (ids and masks) and any JSON-able parts, to compare ranks."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, list | tuple) and part and isinstance(part[0], Pair):
            part = [e for p in part for e in (p.chosen, p.rejected)]
        if isinstance(part, list | tuple) and part and hasattr(part[0], "ids"):
            for e in part:
                h.update(np.asarray(e.ids, np.int64).tobytes())
                h.update(np.asarray(e.mask, np.bool_).tobytes())
                h.update(b"|")
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"#")
    return h.hexdigest()


def weights_digest(model, per_tensor: int = 4096) -> str:
    """A digest of the frozen base weights: up to `per_tensor` evenly spaced values of each
    tensor (two copies of one config with other weights differ in all of them). The LoRA
    weights are left out: every rank starts from rank 0's."""
    trainable = {k for k, _ in tree_flatten(model.trainable_parameters())}
    h = hashlib.sha256()
    for name, value in sorted(tree_flatten(model.parameters()), key=lambda kv: kv[0]):
        if name in trainable:
            continue
        flat = value.reshape(-1)
        h.update(name.encode() + b"\0")
        sample = flat[:: max(1, flat.size // per_tensor)]
        h.update(np.array(sample.view(mx.uint8)).tobytes())  # bytes: bfloat16 has no numpy type
    return h.hexdigest()


def mark_failed(run, message: str) -> None:
    """Best effort, from the watchdog: record why the run stopped, if the run folder exists."""
    if run.state:  # a run folder that exists (rank 0's; a PeerRun's is always empty)
        run.mark_failed(message)


@contextlib.contextmanager
def labelled(world: World):
    """Errors name the rank that raised them: several ranks print into one terminal."""
    if world.size == 1:
        yield
        return
    try:
        yield
    except MacftError as e:
        e.args = (f"rank {world.rank} stopped: {e}",)
        raise
    except Exception as e:  # a bug: its traceback follows
        print(f"rank {world.rank} stopped: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        raise
