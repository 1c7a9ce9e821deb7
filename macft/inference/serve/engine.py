"""The generation worker: one thread owns MLX and runs every request in one continuous batch.

Requests for different adapters (and the base) decode together: before each forward pass the
worker tells the adapter bank which slot each row of the batch asks for. A request whose
adapter is not loaded has the catalog load it (evicting one no running row uses); when every
loaded one is in use it waits until a row ends. Prefill, caches, sampling and the EOS check are
mlx-lm's continuous batching; this module adds the adapters, text stops, cancellation (a
client gone frees its row) and one log line per request.
"""

import functools
import queue
import threading
import time
from dataclasses import dataclass, field

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import apply_top_p, make_sampler

from macft.models.mlx_lm_compat import start_generation


@functools.lru_cache(maxsize=64)
def _shared_sampler(temp: float, top_p: float):
    # One function per setting: mlx-lm samples rows that share a sampler in one call.
    return make_sampler(temp=temp, top_p=top_p)


def job_sampler(temp: float, top_p: float, seed: int | None):
    """mlx-lm's sampler; with a seed, one PRNG key per request, so the same seed gives the same
    answer whatever else shares the batch (a global seed would be consumed by every row)."""
    if seed is None or temp == 0:
        return _shared_sampler(temp, top_p if temp > 0 else 0.0)
    key = mx.random.key(seed)

    def sample(logprobs: mx.array) -> mx.array:
        nonlocal key
        if 0 < top_p < 1:
            logprobs = apply_top_p(logprobs, top_p)
        key, sub = mx.random.split(key)
        return mx.random.categorical(logprobs * (1 / temp), key=sub)

    return sample


@dataclass
class Job:
    """One request: what to generate, and the events its HTTP thread reads."""

    name: str  # the model name asked for: its adapters (or the base)
    prompt: list[int]
    max_tokens: int
    temp: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    events: queue.Queue = field(
        default_factory=queue.Queue
    )  # ("text", s) / ("end", reason) / ("error", s)
    cancelled: bool = False  # set by the HTTP thread when its client went away (or it ended)
    done: bool = False  # its end was sent
    tokens: list[int] = field(default_factory=list)  # the answer's token ids (no EOS)
    # the worker's state
    slot: int = 0  # the adapter bank's slot (0: the base), once its adapters are loaded
    _text: str = ""  # all text generated so far
    _sent: int = 0  # how much of it the client has
    _detok: object = None
    _start: float = 0.0

    def cancel(self) -> None:
        self.cancelled = True


class Engine:
    """Owns the model; `submit` queues a Job, the worker batches and answers it."""

    def __init__(self, catalog, log=print, max_batch: int = 16):
        self.catalog = catalog
        self.model, self.tokenizer, self.bank = catalog.model, catalog.tokenizer, catalog.bank
        self.tokenizer_lock, self.log = catalog.tokenizer_lock, log
        self.max_batch = max_batch
        self._queue: queue.Queue[Job] = queue.Queue()
        self._jobs: dict[int, Job] = {}  # uid -> job, for the rows of the running batch
        self._waiting: list[Job] = []  # taken from the queue, not yet a row (in order)
        self._batch = None
        self._uid = 0
        self.widest = 0  # the most rows one step has run (the batching at work)
        self._stop = threading.Event()
        self._calls: queue.Queue = queue.Queue()  # functions to run on the worker (adapters)
        self._thread = threading.Thread(target=self._run, name="macft-generate", daemon=True)

    def start(self) -> "Engine":
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    @property
    def busy(self) -> int:
        return len(self._jobs)

    @property
    def waiting(self) -> int:
        return len(self._waiting) + self._queue.qsize()

    def submit(self, job: Job) -> Job:
        self._queue.put(job)
        return job

    def call(self, fn):
        """Run fn() on the worker between steps (MLX's state is the worker's); its result or error."""
        done: queue.Queue = queue.Queue()
        self._calls.put((fn, done))
        ok, value = done.get()
        if not ok:
            raise value
        return value

    def evict(self, name: str, why: str) -> None:
        """Fail every request for model `name`, running or queued (on the worker: see call)."""
        while not self._queue.empty():
            self._waiting.append(self._queue.get_nowait())
        for job in self._waiting:
            if job.name == name:
                job.done = True
                job.events.put(("error", why))
        self._waiting = [j for j in self._waiting if j.name != name]
        doomed = [u for u, j in self._jobs.items() if j.name == name]
        for u in doomed:
            self._jobs[u].done = True
            self._jobs[u].events.put(("error", why))
        self._drop(doomed)

    # --- the worker ---------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        finally:
            # MLX's streams are per thread: a thread that leaves its own behind makes the
            # process abort at exit ("terminate called without an active exception").
            mx.synchronize()
            mx.clear_streams()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._calls_pending()
                if not self._jobs and not self._waiting:
                    try:
                        self._waiting.append(self._queue.get(timeout=0.05))
                    except queue.Empty:
                        continue
                while not self._queue.empty():
                    self._waiting.append(self._queue.get_nowait())
                self._admit_waiting()
                self._drop([u for u, j in self._jobs.items() if j.cancelled])
                if self._jobs:
                    self._step()
            except Exception as e:  # a failed step fails its requests, never the server
                for job in self._jobs.values():
                    job.events.put(("error", f"generation failed: {e}"))
                self._jobs, self._batch = {}, None

    def _calls_pending(self) -> None:
        while not self._calls.empty():
            fn, done = self._calls.get_nowait()
            try:
                done.put((True, fn()))
            except Exception as e:
                done.put((False, e))

    def _admit_waiting(self) -> None:
        """Make rows of the waiting requests that fit the batch and whose adapters are loaded
        or can be; the others wait, in order, for a row to end."""
        in_use = {j.name for j in self._jobs.values()}  # adapters no eviction may take
        still = []
        for job in self._waiting:
            if job.cancelled:
                continue
            if len(self._jobs) >= self.max_batch:
                still.append(job)
                continue
            try:
                slot = self.catalog.slot(job.name, in_use, self.log)
            except Exception as e:  # e.g. the run's folder is gone: this request fails
                job.done = True
                job.events.put(("error", f"cannot load {job.name}: {e}"))
                continue
            if slot is None:
                still.append(job)
                continue
            job.slot = slot
            self._admit(job)
            in_use.add(job.name)
        self._waiting = still

    def _admit(self, job: Job) -> None:
        uid, self._uid = self._uid, self._uid + 1
        job._detok, job._start = self.tokenizer.detokenizer, time.perf_counter()
        sampler = job_sampler(job.temp, job.top_p, job.seed)
        self.bank.rows.set([job.slot])  # the prefill and first token: this row alone
        try:
            row = start_generation(
                self.model,
                uid,
                job.prompt,
                sampler,
                self.tokenizer.eos_token_ids,
                job.max_tokens,
                make_prompt_cache(self.model),
            )
        except Exception as e:  # this request fails; the running batch goes on
            job.events.put(("error", f"generation failed: {e}"))
            return
        if self._batch is None or not self._jobs:
            self._batch = row
        else:
            self._batch.extend(row)
        self._jobs[uid] = job

    def _drop(self, uids: list[int]) -> None:
        if not uids:
            return
        gone = set(uids)
        self._batch.filter([i for i, u in enumerate(self._batch.uids) if u not in gone])
        for u in gone:
            job = self._jobs.pop(u)
            if not job.done:
                self._log_line(job, "cancelled: the client left")

    def _step(self) -> None:
        self.bank.rows.set([self._jobs[u].slot for u in self._batch.uids])
        self.widest = max(self.widest, len(self._batch.uids))
        stopped = []
        for r in self._batch.next():
            job = self._jobs[r.uid]
            eos = r.finish_reason == "stop"  # mlx-lm's stop: an EOS token, never shown
            with self.tokenizer_lock:
                if not eos:
                    job.tokens.append(r.token)
                    job._detok.add_token(r.token)
                if r.finish_reason is not None:
                    job._detok.finalize()
                job._text += job._detok.last_segment
            reason = self._emit(job, r.finish_reason)
            if reason is not None:
                self._finish(job, reason)
                if r.finish_reason is None:
                    stopped.append(r.uid)  # a stop string: mlx-lm would go on
                else:
                    self._jobs.pop(r.uid)  # mlx-lm has dropped the row itself
        self._drop(stopped)

    def _emit(self, job: Job, finish: str | None) -> str | None:
        """Send the text no stop string can still claim; the finish reason once it ends."""
        end = len(job._text)
        for s in job.stop:
            at = job._text.find(s, max(0, job._sent - len(s) + 1))
            if at != -1 and at < end:
                end, finish = at, "stop"
        if end == len(job._text) and finish is None and job.stop:
            # Hold back a tail that may be the start of a stop string.
            end = max(job._sent, end - max(len(s) for s in job.stop) + 1)
        if end > job._sent:
            job.events.put(("text", job._text[job._sent : end]))
            job._sent = end
        return finish

    def _finish(self, job: Job, reason: str) -> None:
        job.done = True
        job.events.put(("end", reason))
        self._log_line(job, reason)

    def _log_line(self, job: Job, how: str) -> None:
        seconds = time.perf_counter() - job._start
        tps = len(job.tokens) / seconds if seconds > 0 else 0.0
        self.log(
            f"{job.name}: {len(job.prompt)} tokens in, {len(job.tokens)} out, "
            f"{tps:.1f} tokens/s, {how}"
        )
