"""The lean training ops give MLX's values and gradients, and keep less memory for the backward pass."""

import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from helpers import PAD, build_tiny_model, counting_examples, flat, trained_lora
from mlx_lm.models import activations
from mlx_lm.models import base as mlx_lm_base

from macft.config.schema import LoraConfig
from macft.data.batches import collate, make_batch
from macft.data.packing import PackedCache, packing_context
from macft.lora.apply import apply_lora
from macft.train import fast_math, lean_ops
from macft.train.lean_ops import lean_training
from macft.train.loss import batch_loss

LEAN = ("attention", "norm", "swiglu")  # every lean op


def grads_of(f, args):
    """f's outputs under a fixed random weighting, and the gradients of that w.r.t. every arg."""
    w = np.random.default_rng(1).normal(0, 1, f(*args).shape).astype(np.float32)
    return mx.value_and_grad(
        lambda *a: (f(*a) * mx.array(w)).sum(), argnums=tuple(range(len(args)))
    )(*args)


def check_same(ref, new, args, atol):
    (v0, g0), (v1, g1) = grads_of(ref, args), grads_of(new, args)
    assert v1.item() == pytest.approx(v0.item(), rel=1e-5, abs=1e-4)
    for a, b in zip(g0, g1, strict=True):
        assert mx.allclose(a, b, atol=atol), mx.abs(a - b).max()


def packed_mask(segments, positions):
    seg, pos = mx.array(segments), mx.array(positions)
    return PackedCache(pos, seg).make_mask(seg.shape[1])


@pytest.mark.parametrize("mask_kind", ["packed", "causal", "none", "additive"])
def test_attention_matches_mlx(mask_kind):
    rng = np.random.default_rng(0)
    q, k, v = (mx.array(rng.normal(0, 1, (2, h, 12, 8)).astype(np.float32)) for h in (6, 2, 2))
    mask = {
        "packed": packed_mask(
            [[0] * 5 + [1] * 7, [0] * 12], [[*range(5), *range(7)], list(range(12))]
        ),
        "causal": "causal",
        "none": None,
        "additive": mx.array(rng.normal(0, 2, (12, 12)).astype(np.float32)),
    }[mask_kind]

    def ref(q, k, v):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=0.35, mask=mask)

    check_same(ref, lambda q, k, v: lean_ops.attention(q, k, v, 0.35, mask), (q, k, v), 2e-5)


def test_rms_norm_and_swiglu_match_mlx():
    rng = np.random.default_rng(2)
    x = mx.array(rng.normal(0, 3, (3, 5, 16)).astype(np.float32))
    w = mx.array(rng.normal(1, 0.2, (16,)).astype(np.float32))
    check_same(
        lambda x, w: mx.fast.rms_norm(x, w, 1e-5),
        lambda x, w: lean_ops.rms_norm(x, w, 1e-5),
        (x, w),
        1e-4,
    )
    g = mx.array(rng.normal(0, 4, (3, 5, 16)).astype(np.float32))
    check_same(lambda g, x: nn.silu(g) * x, lean_ops.swiglu, (g, x), 1e-5)


def test_fast_swiglu_is_float32_accurate_and_never_overflows():
    g = np.concatenate([np.linspace(-30, 30, 20_001), [-1e30, -200.0, 200.0, 1e30]]).astype(
        np.float32
    )
    x = np.ones_like(g)
    got = np.array(fast_math.swiglu(mx.array(g), mx.array(x)))
    with np.errstate(over="ignore"):
        want = g.astype(np.float64) / (1 + np.exp(-g.astype(np.float64)))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-8)  # -1e30 gives -6e-9, not 0
    d_gate, _ = fast_math.swiglu_grads(mx.array(g[:-4]), mx.array(x[:-4]), mx.ones(len(g) - 4))
    s = 1 / (1 + np.exp(-g[:-4].astype(np.float64)))
    np.testing.assert_allclose(np.array(d_gate), s * (1 + g[:-4] * (1 - s)), rtol=1e-5, atol=1e-6)
    top = mx.array([[0.5], [-3.0]])
    s = mx.array(np.random.default_rng(3).normal(0, 5, (2, 40)).astype(np.float32))
    assert mx.allclose(fast_math.shifted_exp(s, top), mx.exp(s - top), rtol=1e-6)


@pytest.mark.parametrize("pack", [True, False])
@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_training_loss_and_gradients_unchanged(pack, model_type):
    if model_type == "llama":
        model = trained_lora()
    else:
        model = build_tiny_model(model_type="qwen3", head_dim=16)
        mx.random.seed(0)
        apply_lora(model, LoraConfig(rank=4, alpha=8, dropout=0.0))
        for _, m in model.named_modules():
            if hasattr(m, "lora_b"):  # not zero, so every adapter's gradient matters
                m.lora_b = mx.random.normal(m.lora_b.shape) * 0.3
    data = counting_examples(6, seed=4)
    inputs, targets, mask, _ = collate(data, PAD)

    def reference(model):
        logits = model(inputs).astype(mx.float32)
        return (nn.losses.cross_entropy(logits, targets) * mask).sum()

    loss0, g0 = nn.value_and_grad(model, reference)(model)
    module = sys.modules[type(model).__module__]
    with packing_context(model, pack), lean_training(model):
        assert module.scaled_dot_product_attention is not mlx_lm_base.scaled_dot_product_attention
        assert module.swiglu is not activations.swiglu
        batch = make_batch(data, PAD, pack=pack)
        loss, g = nn.value_and_grad(model, batch_loss)(model, batch, 16)
    assert module.scaled_dot_product_attention is mlx_lm_base.scaled_dot_product_attention
    assert module.swiglu is activations.swiglu
    assert all(type(m) is nn.RMSNorm for _, m in model.named_modules() if isinstance(m, nn.RMSNorm))
    assert loss.item() == pytest.approx(loss0.item(), rel=1e-5)
    g0, g = flat(g0), flat(g)
    assert g0.keys() == g.keys()
    for key in g0:
        assert mx.allclose(g0[key], g[key], atol=2e-5, rtol=1e-4), (
            key,
            mx.abs(g0[key] - g[key]).max(),
        )


def test_lean_training_keeps_less_per_layer():
    """A long row: MLX keeps each layer's heads x n x n probabilities, the lean ops do not.

    The peak also holds one layer's backward-pass temporaries (n x n too), so the test
    compares what each extra layer adds: 6 layers minus 2.
    """
    n = 512
    x = mx.array(np.random.default_rng(5).integers(3, 250, (1, n)).astype(np.int32))

    def peak(layers, enabled):
        model = build_tiny_model(num_hidden_layers=layers)
        model.freeze()
        apply_lora(model, LoraConfig(rank=4, alpha=8, dropout=0.0))
        with lean_training(model, LEAN if enabled else ()):
            step = nn.value_and_grad(model, lambda m: m(x).astype(mx.float32).logsumexp(-1).sum())
            mx.eval(step(model))  # warm up
            mx.clear_cache()
            start = mx.get_active_memory()
            mx.reset_peak_memory()
            mx.eval(step(model))
            return mx.get_peak_memory() - start

    standard = (peak(6, False) - peak(2, False)) / 4
    lean = (peak(6, True) - peak(2, True)) / 4
    probs = 4 * n * n * 4  # heads x n x n float32
    assert standard > probs  # what MLX keeps per layer includes the probabilities
    assert lean < standard - 0.8 * probs, (lean, standard, probs)
