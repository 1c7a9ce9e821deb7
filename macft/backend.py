"""What this machine offers MLX: Metal or CPU, usable memory, a fast BLAS, peak-memory figures."""

import os
import platform
import sys
from pathlib import Path

import mlx.core as mx

# Debian/Ubuntu OpenBLAS. MLX's CPU wheel ships a reference BLAS (about 3 GFLOP/s here);
# preloading OpenBLAS makes the same float32 matmul about 70x faster.
OPENBLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3",
)
NO_FAST_BLAS_ENV = "MACFT_NO_OPENBLAS"


def metal_available() -> bool:
    try:
        return bool(mx.metal.is_available())
    except Exception:
        return False


def usable_memory_bytes() -> int:
    """Metal's recommended working set on a Mac; available RAM elsewhere."""
    if metal_available():
        info = mx.metal.device_info() if hasattr(mx.metal, "device_info") else mx.device_info()
        return int(info.get("max_recommended_working_set_size", info.get("memory_size", 0)))
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def peak_memory_gb() -> float:
    return mx.get_peak_memory() / 1e9


def reset_peak_memory() -> None:
    mx.reset_peak_memory()


def set_wired_limit() -> None:
    """On Metal, wire the working set so weights are not paged out mid-step. No-op on CPU."""
    if metal_available():
        info = mx.metal.device_info() if hasattr(mx.metal, "device_info") else mx.device_info()
        mx.set_wired_limit(int(info["max_recommended_working_set_size"]))


def openblas_path() -> str | None:
    return next((p for p in OPENBLAS_CANDIDATES if Path(p).exists()), None)


def fast_blas_active() -> bool:
    return "openblas" in os.environ.get("LD_PRELOAD", "")


def reexec_with_fast_blas() -> None:
    """On Linux, restart this process once with OpenBLAS preloaded, unless opted out.

    LD_PRELOAD only takes effect at process start, so the CLI calls this before any work.
    """
    if platform.system() != "Linux" or fast_blas_active() or os.environ.get(NO_FAST_BLAS_ENV):
        return
    lib = openblas_path()
    if lib is None:
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = ":".join(p for p in (lib, env.get("LD_PRELOAD")) if p)
    env[NO_FAST_BLAS_ENV] = "1"  # never loop, even if the preload is dropped
    os.execve(sys.executable, [sys.executable, "-m", "macft", *sys.argv[1:]], env)


def describe() -> str:
    if metal_available():
        return "Metal GPU"
    blas = (
        "OpenBLAS"
        if fast_blas_active()
        else "reference BLAS (apt-get install libopenblas0-pthread for ~70x faster matmuls)"
    )
    return f"CPU, {blas}"
