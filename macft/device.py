"""The machine MLX runs on: which path macft takes (a Mac's or a CPU's), usable and peak memory.

Every decision that differs between a Mac and a CPU-only machine asks `mac_path()`, and
nothing else: that is where the two paths part. Calls that need Metal itself (wiring memory,
device facts) ask `metal_available()`.
"""

import os
from pathlib import Path

import mlx.core as mx


def metal_available() -> bool:
    try:
        return bool(mx.metal.is_available())
    except Exception:
        return False


def mac_path() -> bool:
    """True when macft decides as on a Mac: QLoRA on the 4-bit base, MLX's own kernels."""
    return metal_available()


def _metal_info() -> dict:
    # mx.device_info replaces mx.metal.device_info (deprecated in MLX 0.32).
    info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
    return dict(info)


def usable_memory_bytes() -> int:
    """Metal's recommended working set on a Mac; available RAM elsewhere."""
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


def reset_peak_memory() -> None:
    mx.reset_peak_memory()
