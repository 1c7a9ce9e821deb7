"""MLX's CPU kernels built for AVX2/FMA through a g++ wrapper, in a kernel folder of their own."""

import os
import platform
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import mlx.core as mx
import pytest

from macft.cpu import kernels
from macft.cpu.process import describe

needs_gxx = pytest.mark.skipif(
    platform.machine() != "x86_64" or shutil.which("g++") is None, reason="x86-64 with g++ only"
)


@pytest.fixture
def native_env(monkeypatch, tmp_path):
    """A CPU that reports AVX2/FMA, and a home and temp folder of the test's own."""
    monkeypatch.setattr(kernels, "_cpu_flags", lambda: set(kernels.NATIVE_CPU_FLAGS) | {"sse2"})
    monkeypatch.setattr(kernels.platform, "system", lambda: "Linux")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", os.environ["PATH"])
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.delenv(kernels.NO_NATIVE_KERNELS_ENV, raising=False)
    monkeypatch.setattr(tempfile, "tempdir", None)
    return tmp_path


@needs_gxx
def test_native_kernels_build_for_avx2_in_their_own_temp_folder(native_env):
    assert not kernels.native_kernels()
    assert kernels.use_native_kernels() and kernels.use_native_kernels()  # twice: no nesting
    folders = os.environ["PATH"].split(os.pathsep)
    wrapper = shutil.which("g++")
    assert Path(wrapper).parent == native_env / "cache" / "macft" / "native-gxx"
    assert folders.count(folders[0]) == 1
    # the g++ MLX finds defines what -mavx2 -mfma turn on
    macros = subprocess.run([wrapper, "-dM", "-E", "-x", "c++", "/dev/null"], text=True,
                            capture_output=True, check=True).stdout  # fmt: skip
    assert "__AVX2__" in macros and "__FMA__" in macros
    # MLX's kernel cache ($TMPDIR/mlx) is not the one baseline-built kernels went to
    assert Path(os.environ["TMPDIR"]) == native_env / f"macft-native-{os.getuid()}"
    assert tempfile.gettempdir() == os.environ["TMPDIR"]
    assert kernels.native_kernels() and "AVX2/FMA" in describe()


@needs_gxx
def test_native_kernels_opt_out_and_plain_cpus(native_env, monkeypatch):
    path = os.environ["PATH"]
    monkeypatch.setenv(kernels.NO_NATIVE_KERNELS_ENV, "1")
    assert not kernels.use_native_kernels()
    monkeypatch.delenv(kernels.NO_NATIVE_KERNELS_ENV)
    monkeypatch.setattr(kernels, "_cpu_flags", lambda: {"sse2", "avx"})
    assert not kernels.use_native_kernels()
    assert os.environ["PATH"] == path and os.environ["TMPDIR"] == str(native_env)
    assert "AVX2/FMA" not in describe()


@needs_gxx
@pytest.mark.parametrize("planted", ["another user's", "world-writable", "a link"])
def test_a_kernel_folder_someone_else_made_is_never_used(native_env, planted):
    """Another local user can make $TMPDIR/macft-native-<uid> first and put a kernel there that
    MLX would load by name: macft then keeps its kernels in its own cache folder."""
    shared = native_env / f"macft-native-{os.getuid()}"
    if planted == "a link":
        (native_env / "theirs").mkdir()
        shared.symlink_to(native_env / "theirs")
    else:
        shared.mkdir(mode=0o777)
        shared.chmod(0o777)
        if planted == "another user's":
            if os.geteuid() != 0:
                pytest.skip("giving a folder to another user needs root")
            os.chown(shared, 4242, 4242)
    assert kernels.use_native_kernels()
    used = Path(os.environ["TMPDIR"])
    assert used == native_env / "cache" / "macft" / f"macft-native-{os.getuid()}"
    st = used.stat()
    assert st.st_uid == os.getuid() and st.st_mode & 0o077 == 0
    assert tempfile.gettempdir() == str(used)


# A kernel as MLX writes one (compiled.cpp): the preamble's ops in a loop.
KERNEL = """
using namespace mlx::core;
using namespace mlx::core::detail;
extern "C" void macft_kernel(const float* a, float* out, size_t n) {
  for (size_t i = 0; i < n; ++i) out[i] = Exp()(a[i]) * Sigmoid()(a[i]);
}
"""


@needs_gxx
def test_kernels_build_from_the_precompiled_preamble_to_the_same_code(native_env, monkeypatch):
    """The wrapper has g++ read MLX's kernel preamble precompiled (built once), not its ~69,000
    lines of headers, and the kernel comes out the same."""
    path = os.environ["PATH"].split(os.pathsep)  # without this test session's own wrapper
    monkeypatch.setenv("PATH", os.pathsep.join(p for p in path if "native-gxx" not in p))
    plain = shutil.which("g++")
    assert kernels.use_native_kernels()
    wrapper = shutil.which("g++")
    include = Path(mx.__file__).parent / "include"
    source = native_env / "kernel.cpp"
    source.write_text(f'#include "{kernels.PREAMBLE}"\n{KERNEL}')
    logs, code = {}, {}
    for name, cmd in (("wrapper", [wrapper]), ("plain", [plain, *kernels.NATIVE_FLAGS])):
        out = native_env / f"lib{name}.so"
        # MLX's own command (jit_compiler.cpp); -H names each header as g++ reads it
        cmd += [*kernels.MLX_FLAGS, "-shared", "-H", "-Winvalid-pch", "-I", str(include),
                str(source), "-o", str(out)]  # fmt: skip
        log = subprocess.run(cmd, text=True, capture_output=True, check=True).stderr
        logs[name] = [x for x in log.splitlines() if re.match(r"[.!]+ ", x)]
        dump = ["objdump", "-d", "--no-show-raw-insn", str(out)]
        text = subprocess.run(dump, text=True, capture_output=True, check=True).stdout
        code[name] = text.partition("Disassembly of section .text:")[2]
    gch = native_env / "cache" / "macft" / "native-gxx"
    assert logs["wrapper"] == [f"! {gch}/pch-mlx-{mx.__version__}/{kernels.PREAMBLE}.gch"]
    assert logs["plain"][0] == f". {include / kernels.PREAMBLE}" and len(logs["plain"]) > 20
    assert code["wrapper"] == code["plain"] and "vfmadd" in code["plain"]
