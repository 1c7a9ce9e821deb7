"""QLoRA on a CPU: frozen quantized weights dequantized per matmul, so a fast BLAS does the work."""

import functools

import mlx.core as mx
import mlx.nn as nn

from macft.models.patching import swapped_classes


def _dequantize(w, scales, biases, group_size, bits, mode):
    return mx.dequantize(w, scales, biases, group_size=group_size, bits=bits, mode=mode)


def dequant_matmul(x, w, scales, biases, group_size: int, bits: int, mode: str = "affine"):
    """x @ dequantize(w).T with the float copy made in the forward and again in the backward.

    MLX's CPU quantized matmul runs at ~3 GFLOP/s; a float32 matmul with OpenBLAS at ~200.
    The float copy of one matrix lives only while its matmul runs, in both passes, so the
    weights at rest stay quantized (a plain dequantize would be kept for the backward pass).
    """
    extra = () if biases is None else (biases,)

    def full(w, scales, b, after):
        # Not before `after` is ready: MLX would otherwise make every layer's copy up front,
        # since each depends only on weights, and hold them all.
        w, scales, *b = mx.depends([w, scales, *b], [after])
        return _dequantize(w, scales, b[0] if b else None, group_size, bits, mode)

    @mx.custom_function
    def f(x, w, scales, *b):
        return x @ full(w, scales, b, x).T.astype(x.dtype)

    @f.vjp
    def f_vjp(primals, cotangent, output):
        x, w, scales, *b = primals
        full_w = full(w, scales, b, cotangent)
        dx = cotangent @ full_w.astype(cotangent.dtype)
        return (dx, mx.zeros_like(w), mx.zeros_like(scales), *(mx.zeros_like(v) for v in b))

    return f(x, w, scales, *extra)


def _linear_call(self, x):
    y = dequant_matmul(
        x, self.weight, self.scales, self.get("biases"), self.group_size, self.bits, self.mode
    )
    return y + self.bias if "bias" in self else y


def _as_linear(self, x):
    return dequant_matmul(
        x, self.weight, self.scales, self.get("biases"), self.group_size, self.bits, self.mode
    )


@functools.cache
def _float_class(cls):
    if issubclass(cls, nn.QuantizedLinear):
        return type(cls.__name__, (cls,), {"__call__": _linear_call, "_float_mm": True})
    return type(cls.__name__, (cls,), {"as_linear": _as_linear, "_float_mm": True})


def float_matmul_supported(m) -> bool:
    return isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) and getattr(
        m, "mode", "affine"
    ) in ("affine", "mxfp4", "mxfp8", "nvfp4")


def float_matmuls(model, enabled: bool = True):
    """Swap the classes of quantized linears (and a tied quantized head) for the duration."""
    found = [m for _, m in model.named_modules() if float_matmul_supported(m)]
    found = [m for m in found if enabled and not getattr(type(m), "_float_mm", False)]
    return swapped_classes(found, _float_class)
