"""Which speed-ups a training step uses, and the stack that applies them, built in one place.

The trainer, bench/bench_step.py and the tests all build their steps here:

    speed = Speed.choose(cfg, model)            # or Speed(...) to try one option
    with Stepper(model, speed, pad_id) as stepper:
        loss, grads, n_targets, n_inputs = stepper.grads(batches, seeds)

The Mac and the CPU part here: on a CPU, a quantized base is dequantized per matmul for the
float BLAS, the lean ops keep less for the backward pass, and a batch may be split over one
stream per core. On a Mac, MLX's own quantized kernels and fused ops run as they are.
"""

import contextlib
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from macft import device
from macft.config.schema import TrainConfig, resolve_loss_chunk
from macft.cpu.blas import blas_threads
from macft.cpu.dequant_matmul import float_matmuls
from macft.cpu.streams import stream_count
from macft.data.packing import packing_supported
from macft.lora.moe import is_moe
from macft.train.lean_ops import lean_ops, lean_training
from macft.train.loss import batch_loss
from macft.train.recompute import grad_checkpointing
from macft.train.step import CompiledStep, accumulate, make_update


def is_quantized(model: nn.Module) -> bool:
    """Does the model compute on quantized weights (the base was kept 4-bit)?"""
    return any(isinstance(m, nn.QuantizedLinear) for m in model.modules())


@dataclass(frozen=True)
class Speed:
    pack: bool = False  # several examples per row
    loss_chunk: int = 0  # LM head + loss on target positions, this many at a time; 0: all
    grad_checkpoint: bool = False  # recompute each layer in the backward pass
    compiled: bool = False  # one mx.compile graph per batch shape
    lean: tuple = ()  # lean ops: attention, norm, swiglu (train/lean_ops.py)
    float_matmuls: bool = False  # a quantized base dequantized per matmul (CPU BLAS)
    streams: int = 1  # CPU streams each micro-batch is split over; 1: not split

    @classmethod
    def choose(cls, cfg: TrainConfig, model: nn.Module, world_size: int = 1) -> "Speed":
        """What a run with these settings does on this machine."""
        quantized, mac = is_quantized(model), device.mac_path()
        return cls(
            # a pair's two answers are compared row by row: pairs are not packed
            pack=cfg.pack and cfg.method == "sft" and packing_supported(model),
            loss_chunk=resolve_loss_chunk(cfg.loss_chunk, mac),
            grad_checkpoint=cfg.grad_checkpoint,
            # MoE models train uncompiled: the expert counts are read out of the forward pass.
            compiled=cfg.compile and not is_moe(model),
            lean=lean_ops(mac, cfg.grad_checkpoint),
            float_matmuls=not mac,  # finds nothing to dequantize on a float base
            streams=stream_count(cfg, world_size, quantized),
        )

    def describe(self, cfg: TrainConfig, model_type: str | None, compute: str) -> str:
        """The speed line: which of the speed-ups this run uses, and how to turn each off."""
        if cfg.method != "sft":
            rows = f"preference pairs ({cfg.method}), padded rows grouped by length"
        elif not cfg.pack:
            rows = "padded rows grouped by length (train.pack=false)"
        elif self.pack:
            rows = "examples packed in rows (train.pack)"
        else:
            rows = f"padded rows grouped by length ({model_type} is not packed)"
        loss = f"loss on target positions, {self.loss_chunk} at a time" if self.loss_chunk else ""
        parts = [rows, loss or "full logits"]
        if self.compiled:
            parts.append("one compiled step per batch shape (train.compile)")
        if device.simulated():
            parts.append("the Mac's path on a CPU (MACFT_MAC_PATH): slow, for testing")
        elif not device.mac_path():
            if compute == "quantized":
                parts.append("quantized weights dequantized per matmul for the CPU's BLAS")
            else:
                parts.append("float base on CPU (model.compute=quantized keeps 4-bit)")
        if self.streams > 1:
            parts.append(
                f"each batch split over {self.streams} CPU streams (MACFT_NO_CPU_STREAMS=1: one)"
            )
        return "; ".join(parts)


class Stepper:
    """The model patched for `speed` while the context lasts, and a step's gradients through it.

    loss_fn(model, batch, loss_chunk) is the loss to differentiate (train.loss.batch_loss, or
    that with an MoE aux loss). The patches are entered before the compiled step is built:
    they are traced into its graph.
    """

    def __init__(self, model: nn.Module, speed: Speed, pad_id: int, loss_fn=batch_loss,
                 prepare=None):  # fmt: skip
        self.model, self.speed, self.pad_id, self.loss_fn = model, speed, pad_id, loss_fn
        self.prepare = prepare  # prepare(micro-batches) before their step: DPO's reference
        self._stack = contextlib.ExitStack()
        self.step_fn = None
        self.streams = None

    def __enter__(self) -> "Stepper":
        s, model = self.speed, self.model
        self._stack.enter_context(float_matmuls(model, s.float_matmuls))
        self._stack.enter_context(grad_checkpointing(model, s.grad_checkpoint))
        self._stack.enter_context(lean_training(model, s.lean, checkpointing=s.grad_checkpoint))
        self.loss_and_grad = nn.value_and_grad(model, self.loss_fn)
        self.step_fn = CompiledStep(self.loss_and_grad, model) if s.compiled else None
        if s.streams > 1:
            self.streams = [mx.new_stream(mx.cpu) for _ in range(s.streams)]
        return self

    def __exit__(self, *exc):
        return self._stack.__exit__(*exc)

    def grads(self, batches: list, seeds=None):
        """(loss sum, gradient sums, target tokens, input tokens) of a step's micro-batches."""
        s = self.speed
        if self.prepare is not None:
            self.prepare(batches)
        with blas_threads(1 if self.streams else None):  # a core per stream
            return accumulate(
                self.step_fn or self.loss_and_grad, self.model, batches, self.pad_id, seeds,
                s.pack, s.loss_chunk, self.streams,
            )  # fmt: skip

    def shapes(self) -> dict:
        """{"compiled_shapes": traces so far} for the metrics, when the step is compiled."""
        return {"compiled_shapes": len(self.step_fn.shapes)} if self.step_fn else {}

    def update_fn(self, optimizer, max_grad_norm: float):
        """update(gradient sums, target tokens), compiled with the step (see make_update)."""
        return make_update(self.model, optimizer, max_grad_norm, self.step_fn is not None)
