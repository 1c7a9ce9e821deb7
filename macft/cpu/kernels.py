"""MLX's compiled CPU kernels built for this CPU (AVX2, FMA): a g++ wrapper, a kernel folder and
the kernels' preamble precompiled."""

import importlib.metadata
import importlib.util
import os
import platform
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

from macft.atomic import atomic_write_bytes, write_via_temp

NO_NATIVE_KERNELS_ENV = "MACFT_NO_NATIVE_KERNELS"
NATIVE_FLAGS = ("-mavx2", "-mfma", "-mf16c")  # what these CPU flags let the compiler use
NATIVE_CPU_FLAGS = {"avx2", "fma", "f16c"}
# How MLX 0.32 builds a kernel (jit_compiler.cpp). g++ uses a precompiled header only when built
# with the same flags: if MLX changes them, kernels build from the header again, just slower.
MLX_FLAGS = ("-std=c++17", "-O3", "-Wall", "-fPIC")
PREAMBLE = "mlx/backend/cpu/compiled_preamble.h"  # every kernel includes it: ~69,000 lines
_NATIVE_TEMP = f"macft-native-{os.getuid()}"


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


def _own_folder(folder: Path, mode: int) -> bool:
    """`folder` exists (made here if missing) as a real folder of this user that no one else
    may write: MLX runs the g++ found in one and loads kernels by name from the other."""
    try:
        folder.mkdir(mode=mode, parents=True, exist_ok=True)
        st = os.lstat(folder)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o022


def _kernel_folder() -> Path | None:
    """$TMPDIR/macft-native-<uid>, unless another user made it first (or a link sits there):
    then the same name in macft's cache folder."""
    temp = Path(tempfile.gettempdir())
    shared = temp if temp.name == _NATIVE_TEMP else temp / _NATIVE_TEMP
    for folder in (shared, _cache_dir() / _NATIVE_TEMP):
        if _own_folder(folder, 0o700):
            return folder
    return None


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
    these get a temp folder of their own: a kernel built without the flags is never reused,
    and none another user planted there is loaded (see _kernel_folder). The wrapper also points
    g++ at MLX's kernel preamble precompiled (see _precompiled_preamble).
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
    kernels = _kernel_folder()
    if kernels is None or not _own_folder(folder, 0o755):
        return False
    flags = list(NATIVE_FLAGS)
    headers = _precompiled_preamble(gxx, folder)
    if headers is not None:
        flags += ["-I", f'"{headers}"']  # before MLX's own -I: g++ finds the .gch here first
    script, text = folder / "g++", f'#!/bin/sh\nexec "{gxx}" {" ".join(flags)} "$@"\n'
    try:
        if not (script.is_file() and script.read_text() == text):
            atomic_write_bytes(script, text.encode(), mode=0o755)
    except OSError:
        return False
    os.environ["TMPDIR"] = str(kernels)
    tempfile.tempdir = None  # Python's own temp files follow
    os.environ["PATH"] = os.pathsep.join([str(folder), *path])
    return True


def _precompiled_preamble(gxx: str, folder: Path) -> Path | None:
    """A folder holding MLX's kernel preamble precompiled for g++ (built once per MLX version),
    or None. A kernel then builds in ~0.25 s instead of ~0.85 s, to the same machine code: a
    training step's first run builds dozens of kernels."""
    spec = importlib.util.find_spec("mlx")
    if spec is None or not spec.submodule_search_locations:
        return None
    include = Path(next(iter(spec.submodule_search_locations))) / "include"
    if not (include / PREAMBLE).is_file():
        return None  # MLX then builds without its headers, as it does itself
    headers = folder / f"pch-mlx-{importlib.metadata.version('mlx')}"
    gch = headers / f"{PREAMBLE}.gch"
    if gch.is_file():
        return headers
    command = [gxx, *MLX_FLAGS, *NATIVE_FLAGS, "-I", str(include), "-x", "c++-header",
               str(include / PREAMBLE), "-o"]  # fmt: skip
    try:
        gch.parent.mkdir(parents=True, exist_ok=True)
        # whole or absent, when several processes build it at once (g++ fills the temp file)
        write_via_temp(gch, lambda tmp: subprocess.run([*command, str(tmp)], check=True,
                                                       capture_output=True, timeout=300))  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return headers
