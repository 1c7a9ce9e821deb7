"""OpenBLAS for MLX's CPU build: preloaded by restarting the process, and its thread count."""

import contextlib
import ctypes
import os
import platform
import sys
from pathlib import Path

from macft.relaunch import macft_command

# Debian/Ubuntu OpenBLAS. MLX's CPU wheel ships a reference BLAS (about 3 GFLOP/s here);
# preloading OpenBLAS makes the same float32 matmul about 70x faster.
OPENBLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3",
)
NO_FAST_BLAS_ENV = "MACFT_NO_OPENBLAS"


def openblas_path() -> str | None:
    return next((p for p in OPENBLAS_CANDIDATES if Path(p).exists()), None)


def fast_blas_active() -> bool:
    return "openblas" in os.environ.get("LD_PRELOAD", "")


def reexec_with_fast_blas() -> None:
    """On Linux, restart this process once with OpenBLAS preloaded, unless opted out.

    LD_PRELOAD only takes effect at process start, so a command calls this before any work.
    """
    if platform.system() != "Linux" or fast_blas_active() or os.environ.get(NO_FAST_BLAS_ENV):
        return
    lib = openblas_path()
    if lib is None:
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = ":".join(p for p in (lib, env.get("LD_PRELOAD")) if p)
    env[NO_FAST_BLAS_ENV] = "1"  # never loop, even if the preload is dropped
    # not `python -m macft`: that would import modules from the working folder first
    os.execve(sys.executable, macft_command(*sys.argv[1:]), env)


@contextlib.contextmanager
def blas_threads(n: int | None):
    """OpenBLAS on n threads for the duration (None: as it is); a no-op without OpenBLAS."""
    lib = ctypes.CDLL(None)
    get = getattr(lib, "openblas_get_num_threads", None)
    set_ = getattr(lib, "openblas_set_num_threads", None)
    if n is None or get is None or set_ is None:
        yield
        return
    before = get()
    set_(n)
    try:
        yield
    finally:
        set_(before)
