"""Process-wide set-up for commands that compute, and the one-line description of the backend."""

from macft import device
from macft.cpu.blas import fast_blas_active, reexec_with_fast_blas
from macft.cpu.kernels import native_kernels, use_native_kernels


def prepare() -> None:
    """Before a command computes: OpenBLAS preloaded (a restart) and kernels built for this CPU.

    Commands that only read files (runs, models, recipes, report) skip it: the restart and
    the kernel wrapper cost time and change nothing for them.
    """
    reexec_with_fast_blas()  # both are Linux-only: nothing to do on a Mac
    use_native_kernels()


def describe() -> str:
    if device.metal_available():
        return "Metal GPU"
    blas = (
        "OpenBLAS"
        if fast_blas_active()
        else "reference BLAS (apt-get install libopenblas0-pthread for ~70x faster matmuls)"
    )
    kernels = ", kernels for AVX2/FMA" if native_kernels() else ""
    return f"CPU, {blas}{kernels}"
