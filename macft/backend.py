"""What this machine offers MLX: Metal or CPU, usable memory, a fast BLAS, peak-memory figures."""

import contextlib
import ctypes
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

import mlx.core as mx

from macft.atomic import atomic_write_bytes

# Debian/Ubuntu OpenBLAS. MLX's CPU wheel ships a reference BLAS (about 3 GFLOP/s here);
# preloading OpenBLAS makes the same float32 matmul about 70x faster.
OPENBLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3",
)
NO_FAST_BLAS_ENV = "MACFT_NO_OPENBLAS"
NO_NATIVE_KERNELS_ENV = "MACFT_NO_NATIVE_KERNELS"
NO_CPU_STREAMS_ENV = "MACFT_NO_CPU_STREAMS"
NATIVE_FLAGS = ("-mavx2", "-mfma", "-mf16c")  # what these CPU flags let the compiler use
NATIVE_CPU_FLAGS = {"avx2", "fma", "f16c"}


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


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "macft"


_NATIVE_TEMP = f"macft-native-{os.getuid()}"


def native_kernels() -> bool:
    """Whether MLX's CPU kernels are built for this CPU's AVX2 and FMA (see use_native_kernels)."""
    folder = str(_cache_dir() / "native-gxx")
    return folder in os.environ.get("PATH", "").split(os.pathsep)


def use_native_kernels() -> bool:
    """On an x86 CPU with AVX2 and FMA, have MLX build its compiled CPU kernels for them.

    mx.compile writes C++ for each fused kernel and builds it with the `g++` on PATH, for
    baseline x86-64: each exp calls libm's fma and little is vectorised. A `g++` first on PATH
    that adds -mavx2 -mfma makes the compiled training step ~20% faster on a 2-core EPYC.
    MLX keeps built kernels by name in $TMPDIR/mlx and never rebuilds one it finds there, so
    these get a temp folder of their own: a kernel built without the flags is never reused.
    Opt out with MACFT_NO_NATIVE_KERNELS=1.
    """
    if (
        platform.system() != "Linux"
        or platform.machine() != "x86_64"
        or os.environ.get(NO_NATIVE_KERNELS_ENV)
        or not NATIVE_CPU_FLAGS <= _cpu_flags()
    ):
        return False
    folder = _cache_dir() / "native-gxx"
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != str(folder)]
    gxx = shutil.which("g++", path=os.pathsep.join(path))
    if gxx is None:
        return False  # MLX then runs the step's ops one by one, as without compile
    temp = Path(tempfile.gettempdir())
    kernels = temp if temp.name == _NATIVE_TEMP else temp / _NATIVE_TEMP
    script, text = folder / "g++", f'#!/bin/sh\nexec "{gxx}" {" ".join(NATIVE_FLAGS)} "$@"\n'
    try:
        if not (script.is_file() and script.read_text() == text):
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(script, text.encode(), mode=0o755)
        kernels.mkdir(mode=0o700, exist_ok=True)
    except OSError:
        return False
    os.environ["TMPDIR"] = str(kernels)
    tempfile.tempdir = None  # Python's own temp files follow
    os.environ["PATH"] = os.pathsep.join([str(folder), *path])
    return True


def cpu_streams(examples: int) -> int:
    """Over how many CPU streams a training micro-batch is split: one per core, or 1 (no split).

    MLX runs everything but the BLAS matmuls one op at a time on one thread; on a CPU that is
    a third of a training step. Two halves of a batch on two streams keep both cores busy
    (OpenBLAS then gets one thread per stream). Only when every core gets an example, else
    one stream with a threaded BLAS does better. Opt out with MACFT_NO_CPU_STREAMS=1.
    """
    if metal_available() or os.environ.get(NO_CPU_STREAMS_ENV):
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return cores if 2 <= (cores or 1) <= examples else 1


def plan_cpu_streams() -> None:
    """Have MLX order its work breadth-first, so the streams' ops alternate.

    MLX builds each evaluation's op list breadth-first but at most 20 wide; the split batch's
    ~800 gradients are wider, so one half's ops came in long runs while the other stream sat
    idle (SmolLM2, 2 cores: 101 tokens/s at width 200, 151 unbounded). MLX reads the setting
    at its first evaluation, so this runs before a model loads.
    """
    os.environ.setdefault("MLX_BFS_MAX_WIDTH", "1000000")


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


def describe() -> str:
    if metal_available():
        return "Metal GPU"
    blas = (
        "OpenBLAS"
        if fast_blas_active()
        else "reference BLAS (apt-get install libopenblas0-pthread for ~70x faster matmuls)"
    )
    kernels = ", kernels for AVX2/FMA" if native_kernels() else ""
    return f"CPU, {blas}{kernels}"
