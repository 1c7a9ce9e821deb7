"""End a process whose wait for other processes lasts too long: a frozen or vanished peer never
answers, and MLX's ring backend would wait for it forever."""

import contextlib
import os
import sys
import threading
import time

EXIT_HUNG = 3


class Watchdog:
    """`with dog.waiting(what, seconds):` around a blocking call. When the time runs out,
    each callback gets message(what, seconds) (best effort), it is printed, and the process
    exits with EXIT_HUNG: the blocked call cannot be interrupted from Python."""

    def __init__(self, message, callbacks=()):
        self.message = message
        self.callbacks = callbacks  # a list the owner may still append to
        self._cv = threading.Condition()
        self._deadline = None
        self._what, self._limit = "", 0.0
        threading.Thread(target=self._run, daemon=True, name="macft-watchdog").start()

    @contextlib.contextmanager
    def waiting(self, what: str, limit: float):
        with self._cv:
            self._deadline = time.monotonic() + limit
            self._what, self._limit = what, limit
            self._cv.notify()
        try:
            yield
        finally:
            with self._cv:
                self._deadline = None

    def _run(self) -> None:
        with self._cv:
            while self._deadline is None or time.monotonic() < self._deadline:
                left = None if self._deadline is None else self._deadline - time.monotonic()
                self._cv.wait(left)
            text = self.message(self._what, self._limit)
        for callback in list(self.callbacks):
            with contextlib.suppress(Exception):
                callback(text)
        sys.stderr.write(f"Error: {text}\n")
        sys.stderr.flush()
        os._exit(EXIT_HUNG)
