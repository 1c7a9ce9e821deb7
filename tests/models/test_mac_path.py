"""On the Mac's path a base keeps its 4-bit weights and computes in one 16-bit dtype, whatever
dtypes its file holds: a bf16 or f16 HF folder, or a GGUF with f16 scales and f32 norms."""

import mlx.core as mx
import pytest
from helpers import build_tiny_model, save_tiny_model_dir
from mlx.utils import tree_flatten

from macft import device
from macft.models import load_base

pytestmark = pytest.mark.path("mac")

TOKENS = mx.array([[5, 70, 200, 33, 9, 120, 64]])


def assert_quantized_bf16(base):
    assert device.mac_path()
    assert base.source["compute"] == "quantized" and base.source["activations"] == "bfloat16"
    floats = {v.dtype for _, v in tree_flatten(base.model.parameters()) if v.dtype != mx.uint32}
    assert floats == {mx.bfloat16}, floats  # scales, biases and norms alike
    layer = base.model.model.layers[0]
    assert hasattr(layer.self_attn.q_proj, "scales")  # MLX's quantized matmul runs
    assert base.model(TOKENS).dtype == mx.bfloat16  # no float32 creeps in on the way


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32])
def test_hf_folders_keep_the_4bit_base_and_16_bit_activations(tmp_path, dtype):
    folder = save_tiny_model_dir(tmp_path / "hf", model=build_tiny_model(), dtype=dtype)
    assert_quantized_bf16(load_base(str(folder)))


@pytest.mark.real
def test_the_smollm2_gguf_keeps_its_4bit_weights_and_16_bit_activations(smollm2_gguf):
    """Its Q4_1 scales are f16 and its norms f32: mixed, they made every activation float32."""
    base = load_base(str(smollm2_gguf))
    assert_quantized_bf16(base)
    assert base.model.model.layers[0].self_attn.q_proj.group_size == 32  # GGUF's own groups


def test_the_working_set_can_be_given(monkeypatch):
    monkeypatch.setenv("MACFT_WORKING_SET", "16GB")
    assert device.usable_memory_bytes() == 16_000_000_000
    monkeypatch.setenv("MACFT_WORKING_SET", "lots")
    with pytest.raises(Exception, match="MACFT_WORKING_SET 'lots': not a memory size"):
        device.usable_memory_bytes()
