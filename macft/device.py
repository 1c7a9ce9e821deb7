"""The machine MLX runs on: which path macft takes (a Mac's or a CPU's), usable and peak memory.

Every decision that differs between a Mac and a CPU-only machine asks `mac_path()`, and
nothing else: that is where the two paths part. MACFT_MAC_PATH=1 makes any machine decide as a
Mac does (so the Mac's path runs, slowly, and is tested on a CPU), and MACFT_WORKING_SET=16GB
stands in for Metal's working set. Calls that need Metal itself (wiring memory, device facts)
ask `metal_available()`.
"""

import os
from pathlib import Path

import mlx.core as mx

from macft.errors import MacftError

MAC_PATH_ENV = "MACFT_MAC_PATH"
WORKING_SET_ENV = "MACFT_WORKING_SET"


def metal_available() -> bool:
    try:
        return bool(mx.metal.is_available())
    except Exception:
        return False


def mac_path() -> bool:
    """True when macft decides as on a Mac: QLoRA on the 4-bit base, MLX's own kernels."""
    return metal_available() or os.environ.get(MAC_PATH_ENV, "") not in ("", "0")


def simulated() -> bool:
    """The Mac's path on a machine without Metal (MACFT_MAC_PATH=1)."""
    return mac_path() and not metal_available()


def parse_size(text: str, what: str = "--memory") -> int:
    """'24GB', '24', '24 GiB', '16000MB' -> bytes (GB = 1e9; GiB = 2**30; a bare number is GB)."""
    t = str(text).strip().upper().replace(" ", "")
    units = {"GIB": 2**30, "GB": 1e9, "G": 1e9, "MIB": 2**20, "MB": 1e6, "M": 1e6}
    unit = next((u for u in units if t.endswith(u)), "")
    try:
        size = int(float(t[: len(t) - len(unit)]) * units.get(unit, 1e9))
    except (ValueError, OverflowError):
        size = 0
    if size <= 0:
        raise MacftError(f"{what} {text!r}: not a memory size; write it like 24GB, 16GiB or 32")
    return size


def _metal_info() -> dict:
    # mx.device_info replaces mx.metal.device_info (deprecated in MLX 0.32).
    info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
    return dict(info)


def usable_memory_bytes() -> int:
    """Metal's recommended working set on a Mac (MACFT_WORKING_SET stands in for it on any
    machine); available RAM elsewhere."""
    if os.environ.get(WORKING_SET_ENV):
        return parse_size(os.environ[WORKING_SET_ENV], WORKING_SET_ENV)
    if metal_available():
        info = _metal_info()
        return int(info.get("max_recommended_working_set_size", info.get("memory_size", 0)))
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def set_wired_limit() -> None:
    """On Metal, wire the working set so weights are not paged out mid-step. No-op on a CPU."""
    if metal_available():
        mx.set_wired_limit(int(_metal_info()["max_recommended_working_set_size"]))


def peak_memory_gb() -> float:
    return mx.get_peak_memory() / 1e9


def memory_gb() -> dict:
    """MLX's memory now: arrays in use and freed buffers it keeps for reuse (GB)."""
    return {
        "active_memory_gb": round(mx.get_active_memory() / 1e9, 4),
        "cache_memory_gb": round(mx.get_cache_memory() / 1e9, 4),
    }


def reset_peak_memory() -> None:
    mx.reset_peak_memory()


def limit_cache(nbytes: int) -> None:
    """Let MLX keep at most nbytes of freed buffers for reuse (about one step's worth).

    Its buffer cache otherwise grows with every new shape toward the working set (all of it
    wired on a Mac); mlx-lm empties it after every step instead, which costs reallocation.
    """
    mx.set_cache_limit(max(int(nbytes), 0))


def clear_cache() -> None:
    mx.clear_cache()
