"""LoRA on stacked mixture-of-experts weights: one adapter per expert, trained only where tokens go."""

import math

import mlx.core as mx
import mlx.nn as nn

from macft.models.mlx_lm_compat import QuantizedSwitchLinear, SwitchLinear
from macft.models.quant import float_weight

SWITCH_TYPES = (SwitchLinear, QuantizedSwitchLinear)


def is_switch_linear(m) -> bool:
    return isinstance(m, SWITCH_TYPES)


def switch_dims(linear: nn.Module) -> tuple[int, int, int]:
    """(experts, in, out) of a float or quantized SwitchLinear (its weight is (experts, out, in))."""
    experts, out_dims, in_dims = linear.weight.shape
    if isinstance(linear, QuantizedSwitchLinear):
        in_dims = in_dims * 32 // linear.bits
    return experts, in_dims, out_dims


class LoRASwitchLinear(nn.Module):
    """y = base(x, experts) + scale * B[e] A[e] x for each expert e a token was routed to.

    A and B are gathered by the routing indices (mx.gather_mm), so an expert no token was
    routed to takes no part in the step and its adapter gets a zero gradient. Names and shapes
    are mlx-lm's LoRASwitchLinear (lora_a (experts, r, in), lora_b (experts, out, r)), so
    mlx_lm.load(base, adapter_path=run) reads what macft saves.
    """

    dora = False  # DoRA is for single linears; the stacked experts take plain LoRA

    def __init__(self, linear: nn.Module, rank: int, scale: float, dropout: float = 0.0):
        super().__init__()
        experts, in_dims, out_dims = switch_dims(linear)
        self.linear = linear
        self.dropout = nn.Dropout(p=dropout)
        self.scale = scale
        self.num_experts = experts
        bound = 1 / math.sqrt(in_dims)
        self.lora_a = mx.random.uniform(low=-bound, high=bound, shape=(experts, rank, in_dims))
        self.lora_b = mx.zeros((experts, out_dims, rank))  # zero: starts equal to the base

    def __call__(self, x, indices, sorted_indices=False):
        y = self.linear(x, indices, sorted_indices=sorted_indices)
        kw = {"rhs_indices": indices, "sorted_indices": sorted_indices}
        # In the adapters' float32, as x @ A promotes in a dense LoRA (and MLX's CPU gather_mm
        # takes float32 only).
        z = mx.gather_mm(
            self.dropout(x).astype(self.lora_a.dtype), self.lora_a.swapaxes(-1, -2), **kw
        )
        z = mx.gather_mm(z, self.lora_b.swapaxes(-1, -2), **kw)
        return y + (self.scale * z).astype(x.dtype)

    def merged_weight(self, dtype=mx.float32) -> mx.array:
        """W[e] + scale * B[e] @ A[e] for every expert, in float32, cast to dtype."""
        f32 = mx.float32
        w = float_weight(self.linear)
        delta = (self.scale * self.lora_b.astype(f32)) @ self.lora_a.astype(f32)
        return (w + delta).astype(dtype)

    def fused(self, dtype=mx.float32) -> SwitchLinear:
        """A plain float SwitchLinear with the adapters merged into every expert's weight."""
        w = self.merged_weight(dtype)
        has_bias = "bias" in self.linear
        experts, out_dims, in_dims = w.shape
        fused = SwitchLinear(in_dims, out_dims, experts, bias=has_bias)
        fused.weight = w
        if has_bias:
            fused.bias = self.linear.bias.astype(dtype)
        return fused
