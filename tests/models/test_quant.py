"""Quantized weights counted and sized by their logical parameters, experts included."""

import mlx.nn as nn
from helpers import build_moe, build_tiny_model

from macft.models.mlx_lm_compat import QuantizedSwitchLinear
from macft.models.quant import float32_bytes, parameter_count


def test_quantized_experts_count_as_their_float_weights():
    """fuse's disk estimate and load_base's float32 size read this: an MoE's stacked experts
    are most of its weights, and their packed uint32 words are not their parameter count."""
    for kind in ("qwen3_moe", "mixtral"):
        float_model, quantized = build_moe(kind), build_moe(kind)
        nn.quantize(quantized, group_size=32, bits=4)
        assert any(isinstance(m, QuantizedSwitchLinear) for m in quantized.modules())
        assert parameter_count(quantized) == parameter_count(float_model), kind
        assert float32_bytes(quantized) == 4 * parameter_count(float_model)


def test_scales_and_biases_are_not_parameters():
    model = build_tiny_model()
    plain = parameter_count(model)
    nn.quantize(model, group_size=32, bits=8)
    assert parameter_count(model) == plain
