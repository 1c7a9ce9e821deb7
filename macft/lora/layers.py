"""The LoRA / DoRA layer over one frozen (quantized or float) linear, and its merge into a weight."""

import math

import mlx.core as mx
import mlx.nn as nn

from macft.models.quant import float_weight

# A LoRA layer's own parameters (the rest is the frozen linear): lora_a, lora_b, DoRA's m.
ADAPTER_LEAVES = ("lora_a", "lora_b", "m")


def linear_dims(linear: nn.Module) -> tuple[int, int]:
    """(in, out) of a float or quantized linear; a quantized weight packs 32 // bits values per word."""
    out_dims, in_dims = linear.weight.shape
    if isinstance(linear, nn.QuantizedLinear):
        in_dims = in_dims * 32 // linear.bits
    return in_dims, out_dims


def base_no_bias(lin: nn.Module, x: mx.array) -> mx.array:
    """x @ W^T of a float or quantized linear, without its bias (DoRA rescales before it)."""
    if isinstance(lin, nn.QuantizedLinear):
        return mx.quantized_matmul(
            x,
            lin.weight,
            lin.scales,
            lin.get("biases"),
            transpose=True,
            group_size=lin.group_size,
            bits=lin.bits,
            mode=lin.mode,
        )
    return x @ lin.weight.T


def dora_norm(lin: nn.Module, lora_a: mx.array, lora_b: mx.array, scale: float) -> mx.array:
    """The norm of each row of W + scale * (A @ B)^T: DoRA divides its magnitudes by it."""
    return mx.linalg.norm(float_weight(lin) + (scale * lora_b.T) @ lora_a.T, axis=1)


class LoRALinear(nn.Module):
    """y = base(x) + scale * dropout(x) @ lora_a @ lora_b; with dora, rows rescaled to norm m.

    Parameter names and shapes follow mlx-lm (lora_a (in, r), lora_b (r, out), m (out,)) so
    mlx_lm.load(base, adapter_path=run) reads what macft saves.
    """

    def __init__(
        self, linear: nn.Module, rank: int, scale: float, dropout: float = 0.0, dora: bool = False
    ):
        super().__init__()
        in_dims, out_dims = linear_dims(linear)
        self.linear = linear
        self.dropout = nn.Dropout(p=dropout)
        self.scale = scale
        self.dora = dora
        bound = 1 / math.sqrt(in_dims)
        self.lora_a = mx.random.uniform(low=-bound, high=bound, shape=(in_dims, rank))
        self.lora_b = mx.zeros((rank, out_dims))  # zero: the wrapped layer starts equal to the base
        if dora:
            # DoRA's magnitude: the row norms of W, so that at init the output equals the base.
            self.m = mx.linalg.norm(float_weight(linear), axis=1)

    def __call__(self, x: mx.array) -> mx.array:
        z = (self.dropout(x) @ self.lora_a) @ self.lora_b
        if not self.dora:
            return self.linear(x) + (self.scale * z).astype(x.dtype)
        out = base_no_bias(self.linear, x) + (self.scale * z).astype(x.dtype)
        # Norm of each row of W + scale * (A @ B)^T; no gradient through it, as in DoRA's paper
        # and mlx-lm (it saves memory and keeps the update stable).
        denom = mx.stop_gradient(dora_norm(self.linear, self.lora_a, self.lora_b, self.scale))
        out = (self.m / denom).astype(x.dtype) * out
        if "bias" in self.linear:
            out = out + self.linear.bias
        return out

    def merged_weight(self, dtype=mx.float32) -> mx.array:
        """W + scale * B^T A^T in float32 (DoRA: each row then rescaled to norm m), cast to dtype.

        The same update this layer applies to its input, written into the weight: lora_a is
        (in, r) and lora_b (r, out), so the (out, in) update is (scale * B^T) @ A^T.
        """
        f32 = mx.float32
        w = float_weight(self.linear)
        w = w + (self.scale * self.lora_b.astype(f32).T) @ self.lora_a.astype(f32).T
        if self.dora:
            w = (self.m.astype(f32) / mx.linalg.norm(w, axis=1))[:, None] * w
        return w.astype(dtype)

    def fused(self, dtype=mx.float32) -> nn.Linear:
        """A plain float Linear with the adapter merged into its weight."""
        w = self.merged_weight(dtype)
        has_bias = "bias" in self.linear
        fused = nn.Linear(w.shape[1], w.shape[0], bias=has_bias)
        fused.weight = w
        if has_bias:
            fused.bias = self.linear.bias.astype(dtype)
        return fused
