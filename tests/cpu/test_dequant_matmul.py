"""Quantized weights dequantized per matmul give the quantized kernel's losses and gradients."""

import mlx.core as mx
import mlx.nn as nn
import pytest
from helpers import build_tiny_model
from mlx.utils import tree_flatten

from macft.config.schema import LoraConfig
from macft.cpu.dequant_matmul import float_matmuls
from macft.lora.apply import apply_lora


@pytest.mark.parametrize("tied", [True, False])
def test_float_matmuls_match_quantized_kernels(tied):
    model = build_tiny_model(tie_word_embeddings=tied)
    nn.quantize(model, group_size=32, bits=4)
    apply_lora(model, LoraConfig(rank=4, alpha=8, dropout=0.0))
    x = mx.array([[3, 4, 5, 6, 7, 8, 9], [9, 8, 7, 6, 5, 4, 3]])

    def loss(model, x):
        return model(x).astype(mx.float32).logsumexp(-1).sum()

    lg = nn.value_and_grad(model, loss)
    l0, g0 = lg(model, x)
    classes = [type(m) for _, m in model.named_modules()]
    with float_matmuls(model):
        assert [type(m) for _, m in model.named_modules()] != classes
        l1, g1 = lg(model, x)
    assert [type(m) for _, m in model.named_modules()] == classes
    assert l1.item() == pytest.approx(l0.item(), rel=1e-5)
    for (k, a), (_, b) in zip(tree_flatten(g0), tree_flatten(g1), strict=True):
        assert mx.allclose(a, b, atol=1e-5), k


def test_float_matmuls_disabled_changes_nothing():
    model = build_tiny_model()
    nn.quantize(model, group_size=32, bits=4)
    classes = [type(m) for _, m in model.named_modules()]
    with float_matmuls(model, enabled=False):
        assert [type(m) for _, m in model.named_modules()] == classes
