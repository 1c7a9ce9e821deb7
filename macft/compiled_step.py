"""The training step compiled: forward, loss and backward one MLX graph per shape; the update."""

import math
from dataclasses import replace

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_map

from macft.batches import Batch
from macft.packing import PackedCache

# The gathered loss positions are padded (with weight 0) to a multiple of this, so a data set
# needs few shapes: each new shape is traced and compiled again (about 0.5 s on a CPU).
INDEX_MULTIPLE = 32


def pad_index(batch: Batch, multiple: int = INDEX_MULTIPLE) -> Batch:
    """The batch with its loss positions padded to a multiple: the extra ones weigh 0."""
    n = batch.index.shape[0]
    extra = max(multiple, math.ceil(n / multiple) * multiple) - n
    weights = mx.concatenate([mx.ones((n,), mx.float32), mx.zeros((extra,), mx.float32)])
    index = mx.concatenate([batch.index, mx.zeros((extra,), batch.index.dtype)])
    return replace(batch, index=index, weights=weights)


def _arrays(batch: Batch) -> dict:
    arrays = {
        "inputs": batch.inputs,
        "targets": batch.targets,
        "loss_mask": batch.loss_mask,
        "index": batch.index,
        "weights": batch.weights,
    }
    if batch.cache is not None:
        arrays.update(positions=batch.cache.offset, segments=batch.cache.segments)
    return {k: v for k, v in arrays.items() if v is not None}


class CompiledStep:
    """Called like loss_and_grad(model, batch, loss_chunk), but through mx.compile.

    Compiled, MLX fuses the chains of elementwise ops between the matmuls (norms, rope, the
    LoRA sums, the activations, the loss's exp) into generated kernels: on a CPU, where every
    op runs on its own and one at a time, that is most of the time outside the matmuls. The
    first step of each new shape is traced again; on a CPU the kernels it needs are built
    with the C++ compiler once per machine (MLX keeps them on disk).

    Everything that changes between calls goes in as an input: the batch's arrays, the model's
    parameters (the optimizer replaces the LoRA weights every step) and the random key
    (dropout). The patches the trainer applies around it (packing, lean ops, checkpointing)
    must stay the same for its lifetime: they are traced into the graph.
    """

    def __init__(self, loss_and_grad, model):
        self.loss_and_grad = loss_and_grad
        self.model = model
        self.functions: dict[tuple, object] = {}
        self.shapes: set[tuple] = set()  # one trace each

    def _function(self, names: tuple, loss_chunk: int):
        def step(*arrays):
            a = dict(zip(names, arrays, strict=True))
            cache = PackedCache(a["positions"], a["segments"]) if "positions" in a else None
            batch = Batch(
                a["inputs"], a["targets"], a["loss_mask"], a["index"], 0, 0, cache, a.get("weights")
            )
            return self.loss_and_grad(self.model, batch, loss_chunk)

        state = [self.model.state, mx.random.state]
        return mx.compile(step, inputs=state, outputs=state)

    def __call__(self, model, batch: Batch, loss_chunk: int):
        if model is not self.model:
            raise ValueError("CompiledStep was built for another model")
        if loss_chunk:
            batch = pad_index(batch)
        arrays = _arrays(batch)
        key = (tuple(arrays), loss_chunk)
        # a trace keeps the stream it was made on: one per stream (backend.cpu_streams)
        stream = repr(mx.default_stream(mx.default_device()))
        if (key, stream) not in self.functions:
            self.functions[key, stream] = self._function(*key)
        self.shapes.add((key, stream, tuple(a.shape for a in arrays.values())))
        return self.functions[key, stream](*arrays.values())


def make_update(model, optimizer, max_grad_norm: float, compiled: bool):
    """update(gradient sums, target tokens): average, clip, one optimizer step; not evaluated.

    Compiled, the ~400 LoRA matrices' Adam updates run as a few fused kernels, not one op at a
    time (SmolLM2 on a CPU: 0.08-0.12 s a step -> 0.03). Build it after the optimizer state
    is final (restored, synced): the compiled function holds that state.
    """

    def update(grads, n_targets):
        # in the gradients' dtype, as dividing by a Python int did: bf16 stays bf16
        grads = tree_map(lambda g: g / n_targets.astype(g.dtype), grads)
        if max_grad_norm > 0:
            grads, _ = optim.clip_grad_norm(grads, max_grad_norm)
        optimizer.update(model, grads)

    if not compiled:
        return update
    state = [model.state, optimizer.state]
    return mx.compile(update, inputs=state, outputs=state)
