"""A GGUF (and a GGUF LoRA) run by llama.cpp itself, through the xllamacpp bindings from PyPI.

The fidelity check asks llama.cpp, not macft's own reading of the file, what an exported GGUF
says: the log-probability of each answer token given the ones before it, and its greedy
answers. xllamacpp is an optional extra (`pip install 'macft[llamacpp]'`).
"""

import contextlib
import math
import os
import tempfile
from pathlib import Path

from macft.errors import ExportError

INSTALL = "pip install 'macft[llamacpp]'"
FORCE = 1000.0  # a logit bias no other token can beat: llama.cpp takes the answer's token


def available() -> bool:
    try:
        import xllamacpp  # noqa: F401
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def _quiet():
    """llama.cpp logs every request to the process's stderr: keep it in a file, shown on error."""
    log = tempfile.TemporaryFile()
    saved = os.dup(2)
    os.dup2(log.fileno(), 2)
    try:
        yield log
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        log.close()


def _tail(log) -> str:
    log.seek(0)
    lines = log.read().decode("utf-8", "replace").strip().splitlines()
    return lines[-1] if lines else "no message"


def _logprob(value) -> float:
    """JSON has no -inf or NaN: llama.cpp sends null for log(0) (a token the export gives no
    probability at all) and for NaN logits. Either way the export lost that token."""
    return -math.inf if value is None else float(value)


class LlamaCpp:
    """One GGUF in llama.cpp (optionally with a GGUF LoRA), token ids in and out, greedy."""

    def __init__(self, gguf: Path, lora: Path | None = None, n_ctx: int = 2048):
        try:
            import xllamacpp as xl
        except ImportError:
            raise ExportError(
                f"checking a GGUF needs llama.cpp's Python bindings: {INSTALL} "
                "(or skip the check: --no-check)"
            ) from None
        params = xl.CommonParams()
        params.model.path = str(gguf)
        params.n_ctx = n_ctx
        params.n_parallel = 1  # one slot: each request reuses the last one's cached prompt
        params.warmup = False
        # llama.cpp's threads spin while they wait: all cores would fight MLX's own threads
        threads = max(1, (os.cpu_count() or 2) // 2)
        params.cpuparams.n_threads = params.cpuparams_batch.n_threads = threads
        if lora is not None:
            params.lora_adapters = [xl.CommonAdapterLoraInfo(str(lora), 1.0)]
        with _quiet() as log:
            try:
                self.server = xl.Server(params)
            except Exception as e:  # the bindings raise plain exceptions
                raise ExportError(f"{gguf}: llama.cpp cannot load it: {e} ({_tail(log)})") from None

    def _complete(self, request: dict) -> list[dict]:
        with _quiet() as log:
            r = self.server.handle_completions({"temperature": 0, "cache_prompt": True, **request})
            if "choices" not in r:
                raise ExportError(
                    f"llama.cpp refused a request: {r.get('error', r)} ({_tail(log)})"
                )
        return (r["choices"][0].get("logprobs") or {}).get("content") or []

    def score(self, ids: list[int], first: int) -> tuple[list[float], list[int]]:
        """For each token from `first` on: its log-probability given the tokens before it, and
        llama.cpp's own top token there (both before any sampling)."""
        logps, tops = [], []
        for t in range(first, len(ids)):
            (step,) = self._complete(
                {
                    "prompt": ids[:t],
                    "n_predict": 1,
                    "n_probs": 1,
                    "post_sampling_probs": False,
                    "logit_bias": [[ids[t], FORCE]],
                }
            )
            logps.append(_logprob(step["logprob"]))
            tops.append(int(step["top_logprobs"][0]["id"]))
        return logps, tops

    def greedy(self, prompt: list[int], n: int) -> list[int]:
        """Up to n greedy tokens after prompt; llama.cpp stops at an end-of-turn token."""
        steps = self._complete({"prompt": prompt, "n_predict": n, "top_k": 1, "n_probs": 1})
        return [int(s["id"]) for s in steps]

    def close(self) -> None:
        with _quiet():
            self.server = None
