"""One optimizer step's work: micro-batches forward and backward (one compiled graph per shape,
or op by op), their sums, and the update. train/speed.py puts these together for a run."""

import contextlib
from dataclasses import replace

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_map

from macft.data.batches import Batch, make_batch
from macft.data.packing import PackedCache, packing_context


def pad_index(batch: Batch, multiple: int = 0) -> Batch:
    """The batch with its loss positions padded (with weight 0) to half or all of its tokens,
    or with `multiple` to the next multiple of it.

    So the positions add at most two shapes per (rows, width): each new shape is traced and
    compiled again (~0.3 s and a few MB kept for the run), and with a multiple of 32 a long run
    met hundreds of shapes. The head's matmuls on the extra positions are the price: DPO's
    reference, traced once per pair's shape and never again, pays less with a multiple.
    """
    n, cap = batch.index.shape[0], batch.inputs.size
    if multiple:
        extra = min(-(-n // multiple) * multiple, cap) - n
    else:
        extra = (cap // 2 if n <= cap // 2 else cap) - n
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
        "ref": batch.ref,
    }
    if batch.cache is not None:
        arrays.update(positions=batch.cache.offset, segments=batch.cache.segments)
    return {k: v for k, v in arrays.items() if v is not None}


def accumulate(
    loss_and_grad, model, batches, pad_id: int, seeds=None, pack=False, loss_chunk=0, streams=None
):
    """(loss sum, gradient sums, target tokens, input tokens) over micro-batches.

    A preference loss returns (loss, stats) (train/preference.py): then the loss sum is a
    vector, the loss followed by the stats' sums, and "target tokens" counts pairs.

    `loss_and_grad` is nn.value_and_grad(model, batch_loss) or a CompiledStep of it. Dividing
    both sums by the target tokens afterwards weighs every token equally, so 4 micro-batches of 1 give the same update
    as 1 batch of 4, packed or not. With `streams` (cpu/streams.py) each
    micro-batch is split into that many parts, each computed on its own stream, at once.
    """
    grads, loss, n_targets, n_inputs = None, None, 0, 0
    with packing_context(model, pack):
        for i, examples in enumerate(batches):
            if not examples:  # a rank's share of a small last batch can be empty
                continue
            if seeds is not None:
                mx.random.seed(seeds[i])
            k = len(streams) if streams and len(examples) >= len(streams) else 1
            for j in range(k):
                batch = make_batch(examples[j::k], pad_id, pack)
                n_inputs += batch.n_inputs
                if not batch.n_targets:
                    continue
                with mx.stream(streams[j]) if k > 1 else contextlib.nullcontext():
                    mb_loss, mb_grads = loss_and_grad(model, batch, loss_chunk)
                grads = mb_grads if grads is None else tree_map(mx.add, grads, mb_grads)
                loss = mb_loss if loss is None else tree_map(mx.add, loss, mb_loss)
                n_targets += batch.n_targets
            mx.eval(loss, grads)  # keep the graph one micro-batch deep
    if isinstance(loss, tuple):
        loss = mx.concatenate([loss[0].reshape(1), loss[1]])
    return mx.array(0.0) if loss is None else loss, grads, n_targets, n_inputs


class CompiledStep:
    """Called like loss_and_grad(model, batch, loss_chunk), but through mx.compile; any
    function of those three works (DPO's reference is train/preference.row_logps).

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

    def __init__(self, loss_and_grad, model, index_multiple: int = 0):
        self.loss_and_grad = loss_and_grad
        self.model = model
        self.index_multiple = index_multiple  # how pad_index pads the loss positions
        self.functions: dict[tuple, object] = {}
        self.shapes: set[tuple] = set()  # one trace each

    def _function(self, names: tuple, loss_chunk: int):
        def step(*arrays):
            a = dict(zip(names, arrays, strict=True))
            cache = PackedCache(a["positions"], a["segments"]) if "positions" in a else None
            batch = Batch(
                a["inputs"], a["targets"], a["loss_mask"], a["index"], 0, 0, cache,
                a.get("weights"), a.get("ref"),
            )  # fmt: skip
            return self.loss_and_grad(self.model, batch, loss_chunk)

        state = [self.model.state, mx.random.state]
        return mx.compile(step, inputs=state, outputs=state)

    def __call__(self, model, batch: Batch, loss_chunk: int):
        if model is not self.model:
            raise ValueError("CompiledStep was built for another model")
        if loss_chunk:
            batch = pad_index(batch, self.index_multiple)
        arrays = _arrays(batch)
        key = (tuple(arrays), loss_chunk)
        # a trace keeps the stream it was made on: one per stream (cpu/streams.py)
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
