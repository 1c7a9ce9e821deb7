"""The Mac's training path on this CPU: a 4-bit base, bfloat16 activations, MLX's quantized
matmuls, lean attention; its fast step gives the plain step's loss and gradients."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from helpers import PAD, build_tiny_model, counting_examples, flat

from macft.config.schema import LoraConfig, TrainConfig
from macft.lora.apply import apply_lora
from macft.models import quant
from macft.train.lean_ops import lean_ops
from macft.train.speed import Speed, Stepper

pytestmark = pytest.mark.path("mac")


def mac_lora_model():
    """A tiny base as load_base leaves it on the Mac's path, with adapters that are not zero."""
    model = build_tiny_model()
    nn.quantize(model, group_size=64, bits=4)
    quant.cast_floats(model, mx.bfloat16, lambda name: True)
    apply_lora(model, LoraConfig(rank=4, alpha=8, dropout=0.0))
    rng = np.random.default_rng(0)
    for _, m in model.named_modules():
        if hasattr(m, "lora_b"):
            m.lora_b = mx.array(rng.normal(0, 0.3, m.lora_b.shape).astype(np.float32))
    return model


def test_the_speed_stack_is_the_macs():
    model = mac_lora_model()
    speed = Speed.choose(TrainConfig(batch_size=4), model)
    assert speed.lean == ("attention",) and not speed.float_matmuls and speed.streams == 1
    assert speed.loss_chunk == 128 and speed.grad_checkpoint and speed.compiled
    assert "the Mac's path on a CPU" in speed.describe(TrainConfig(), "llama", "quantized")


def step_grads(model, speed: Speed, batches) -> tuple[float, dict]:
    with Stepper(model, speed, PAD) as stepper:
        loss, grads, n_targets, _ = stepper.grads(batches)
        mx.eval(loss, grads)
    return loss.item() / n_targets, flat(grads)


def relative_error(grads: dict, reference: dict) -> float:
    """The largest of ||g - ref|| / ||ref|| over the adapter tensors."""
    assert grads.keys() == reference.keys()
    return max(
        mx.linalg.norm(grads[k] - reference[k]).item() / mx.linalg.norm(reference[k]).item()
        for k in reference
    )


def test_fast_step_is_as_close_to_float32_as_the_plain_step():
    """Packed, chunked loss, checkpointed, compiled, lean attention vs padded rows, full logits,
    op by op, both on the 4-bit base in bfloat16: the fast one adds no error of its own to
    bfloat16's (each adapter gradient ~5% off float32's here, either way)."""
    model = mac_lora_model()
    model.train()
    batches = [counting_examples(4, seed=s) for s in (1, 2)]
    fast = step_grads(model, Speed(True, 16, True, True, lean_ops(True, True), False, 1), batches)
    plain = step_grads(model, Speed(), batches)
    quant.cast_floats(model, mx.float32, lambda name: True)  # the same 4-bit weights, float32
    loss32, grads32 = step_grads(model, Speed(), batches)
    assert fast[0] == pytest.approx(loss32, rel=1e-2) and plain[0] == pytest.approx(
        loss32, rel=1e-2
    )
    fast_error, plain_error = relative_error(fast[1], grads32), relative_error(plain[1], grads32)
    assert fast_error < 0.1 and fast_error <= 1.5 * plain_error, (fast_error, plain_error)
