"""The training loop: token-weighted accumulation, LR schedule, eval, checkpoints and exact resume."""

import contextlib
import signal
import threading
import time
from dataclasses import dataclass, field, replace

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map_with_path

from macft import backend
from macft.batches import (
    accumulate,
    batch_loss,
    batch_order,
    batches_per_epoch,
    can_pack,
    evaluate,
)
from macft.compiled_step import CompiledStep, make_update
from macft.distributed import SOLO, PeerLost
from macft.errors import DataError, RunError
from macft.lean_ops import lean_training
from macft.lora import adapter_weights, load_adapter_weights
from macft.moe import is_moe
from macft.moe_load import ExpertTracker
from macft.qmatmul import float_matmuls
from macft.recompute import grad_checkpointing
from macft.schedule import lr_at, micro_seed, total_steps
from macft.train_state import (
    best_of,
    fresh_state,
    record_val,
    report_record,
    should_stop,
    stream_count,
)


@dataclass
class TrainConfig:
    iters: int | None = None  # optimizer steps; if None, use epochs
    epochs: float | None = None
    batch_size: int = 4  # examples per micro-batch
    grad_accumulation: int = 1  # micro-batches per optimizer step
    learning_rate: float = 2e-4
    warmup: int = 10  # steps of linear warmup from 0
    schedule: str = "cosine"  # "cosine" (to min_lr_ratio * lr at the last step) | "constant"
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 disables clipping
    eval_every: int = 50  # 0 disables (a final eval still runs)
    eval_batches: int = 0  # 0 = whole validation set
    save_every: int = 100  # 0 = checkpoints only at the end and on Ctrl-C
    grad_checkpoint: bool = False
    seed: int = 0
    early_stopping: int = 0  # evals without val-loss improvement before stopping; 0 = off
    report_every: int = 5
    pack: bool = True  # several examples per row (block-diagonal mask, positions from 0)
    loss_chunk: int = 64  # LM head + loss on target positions only, this many at a time; 0 = off
    moe_aux_loss: float = 0.0  # MoE load-balancing loss weight (needs a trained router); 0 = off
    compile: bool = True  # one compiled graph per batch shape (not for MoE: see uses_compile)


@dataclass
class TrainResult:
    status: str  # "finished" | "interrupted"
    step: int
    total_steps: int
    best_val_loss: float | None = None
    best_step: int | None = None
    val_loss: float | None = None  # the last validation loss
    stopped_early: bool = False
    losses: dict[int, float] = field(default_factory=dict)  # step -> train loss, this call only


@contextlib.contextmanager
def _defer_sigint():
    """Hold Ctrl-C while a step is committed, so model, optimizer and counters stay in step."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda *_: caught.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def _restore_optimizer(optimizer, flat: dict) -> None:
    missing = [k for k, _ in tree_flatten(optimizer.state) if k not in flat]
    if missing:
        raise RunError(
            f"checkpoint optimizer state lacks {len(missing)} entries (e.g. {missing[0]})"
        )
    optimizer.state = tree_map_with_path(lambda path, _: flat[path], optimizer.state)


def train(
    model,
    train_set,
    valid_set,
    cfg: TrainConfig,
    run,
    pad_id: int,
    resume: bool = False,
    on_report=None,
    lora_info=None,
    on_start=None,
    world=None,
) -> TrainResult:
    """Train the model's trainable (LoRA) parameters; checkpoints and metrics go to `run`.

    With a `world` of several ranks (macft.distributed), each trains on its share of every
    global batch (batch_size x ranks) and only rank 0's `run` writes anything."""
    if not train_set:
        raise DataError("no training examples left to train on; check the data file")
    world = world or SOLO
    if world.size > 1:
        cfg = replace(cfg, batch_size=cfg.batch_size * world.size)
    n_train, bs = len(train_set), cfg.batch_size
    per_epoch = batches_per_epoch(n_train, bs)
    total = total_steps(cfg, n_train)
    lengths = [len(e.ids) for e in train_set]
    config = lora_info.adapter_config() if lora_info is not None else None
    orders: dict[int, list[list[int]]] = {}

    def next_batch(epoch: int, index: int):
        if index >= per_epoch:
            epoch, index = epoch + 1, 0
        if epoch not in orders:
            orders.clear()  # one epoch at a time is enough
            orders[epoch] = batch_order(n_train, bs, cfg.seed, epoch, lengths)
        return orders[epoch][index], epoch, index + 1

    optimizer = optim.AdamW(learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay)
    optimizer.init(model.trainable_parameters())
    experts = ExpertTracker(model, pad_id, cfg.moe_aux_loss)  # MoE: expert load, aux loss
    loss_and_grad = nn.value_and_grad(model, experts.loss(batch_loss))
    pack = cfg.pack and can_pack(model)
    fast = {"pack": pack, "loss_chunk": cfg.loss_chunk}
    ev = {**fast, "shard": (world.rank, world.size), "reduce": world.sum_eval}
    st = fresh_state()
    result = TrainResult("finished", 0, total)

    def checkpoint() -> None:
        run.save_checkpoint(
            st["step"],
            adapter_weights(model),
            dict(tree_flatten(optimizer.state)),
            {**st, "total_steps": total, "world_size": world.size},
            config,
        )

    # On a CPU, quantized weights are dequantized per matmul (a float BLAS is ~70x faster).
    float_mm = float_matmuls(model, enabled=not backend.metal_available())
    with run.lock(), float_mm:
        if resume and (ckpt := run.latest_checkpoint()) is not None:
            adapters, opt_state, saved = run.load_checkpoint(ckpt)
            if saved.get("world_size", 1) != world.size:
                n = saved.get("world_size", 1)
                raise RunError(
                    f"{ckpt}: this run trained as {n} process(es), not {world.size}; resume it "
                    f"with {n} (--hosts with {n} entries; 127.0.0.1 repeated runs them on one Mac)"
                )
            load_adapter_weights(model, adapters)
            _restore_optimizer(optimizer, opt_state)
            st.update({k: saved[k] for k in st if k in saved})
        world.sync(model, optimizer, st)  # every rank starts from rank 0's state
        if resume:
            run.trim_metrics(st["step"])  # records past the checkpoint get written again
        run.update_state(status="running", step=st["step"], total_steps=total)
        if on_start is not None:
            on_start(total, st["step"])
        backend.reset_peak_memory()
        if (
            st["step"] == 0
            and valid_set
            and cfg.eval_every
            and world.from_main(lambda: not run.read_metrics())
        ):
            # The untrained model's validation loss: the figure every later one is judged by.
            val = evaluate(model, valid_set, bs, pad_id, cfg.eval_batches, **ev)
            report = report_record(st, 0.0, total, per_epoch, val, final=False)
            run.append_metrics(report)
            if on_report is not None:
                on_report(report)
        session_start, elapsed0 = time.perf_counter(), st["elapsed_s"]
        was_training = model.training
        model.train()
        try:
            ckpt = cfg.grad_checkpoint
            with grad_checkpointing(model, ckpt), lean_training(model, checkpointing=ckpt), experts:
                # built inside the patches above: they are traced into its graph
                step_fn = CompiledStep(loss_and_grad, model) if uses_compile(cfg, model) else None
                quantized = any(isinstance(m, nn.QuantizedLinear) for m in model.modules())
                n = stream_count(cfg, world.size, quantized)
                streams = [mx.new_stream(mx.cpu) for _ in range(n)] if n > 1 else None
                update = make_update(model, optimizer, cfg.max_grad_norm, step_fn is not None)
                while st["step"] < total:
                    step = st["step"] + 1
                    t0 = time.perf_counter()
                    epoch, index = st["epoch"], st["index"]
                    batches = []
                    seeds = [
                        micro_seed(cfg.seed, step, i, world.rank)
                        for i in range(cfg.grad_accumulation)
                    ]
                    for _ in range(cfg.grad_accumulation):
                        idx, epoch, index = next_batch(epoch, index)
                        batches.append([train_set[i] for i in world.shard(idx)])
                    with backend.blas_threads(1 if streams else None):  # a core per stream
                        loss, grads, n_targets, n_inputs = accumulate(
                            step_fn or loss_and_grad, model, batches, pad_id, seeds, **fast,
                            streams=streams,
                        )  # fmt: skip
                    loss, grads, n_targets, n_inputs = world.sum_step(
                        loss, grads, n_targets, n_inputs, model.trainable_parameters(), step
                    )
                    lr = lr_at(step, cfg, total)
                    step_loss = loss.item() / max(n_targets, 1)
                    with _defer_sigint():
                        if n_targets:
                            optimizer.learning_rate = lr
                            update(grads, mx.array(n_targets, mx.float32))
                        mx.eval(model.trainable_parameters(), optimizer.state)
                        st.update(step=step, epoch=epoch, index=index)
                        st["trained_tokens"] += n_inputs
                        st["pending_loss"] += loss.item()
                        st["pending_targets"] += n_targets
                        st["pending_tokens"] += n_inputs
                        st["pending_time"] += time.perf_counter() - t0
                        st["elapsed_s"] = elapsed0 + time.perf_counter() - session_start
                    result.losses[step] = step_loss

                    last = step == total
                    val = None
                    if valid_set and (last or (cfg.eval_every and step % cfg.eval_every == 0)):
                        val = evaluate(model, valid_set, bs, pad_id, cfg.eval_batches, **ev)
                    stop = False
                    if val is not None:
                        if record_val(st, val):
                            info = {"step": step, "val_loss": val}
                            run.save_best(adapter_weights(model), config, info)
                        stop = should_stop(st, cfg.early_stopping)
                    st["elapsed_s"] = elapsed0 + time.perf_counter() - session_start
                    if last or stop or val is not None or step % cfg.report_every == 0:
                        report = report_record(st, lr, total, per_epoch, val, final=last or stop)
                        report.update(experts.report())
                        if stop:
                            report["stopped_early"] = True
                        run.append_metrics(report)
                        if on_report is not None:
                            on_report(report)
                    if stop:
                        result.stopped_early = True
                        break
                    if cfg.save_every and step % cfg.save_every == 0 and not last:
                        checkpoint()
                        run.update_state(status="running", step=step)
        except KeyboardInterrupt:
            _or_failed(run, st, checkpoint)
            run.update_state(status="interrupted", step=st["step"], **best_of(st))
            result.status = "interrupted"
        except BaseException as e:
            if isinstance(e, PeerLost) and st["step"]:  # the model holds the last whole step
                _or_failed(run, st, checkpoint)
            run.update_state(status="failed", step=st["step"], error=f"{type(e).__name__}: {e}")
            raise
        else:
            _or_failed(run, st, checkpoint)
            _or_failed(run, st, lambda: run.write_adapters(adapter_weights(model), config))
            run.update_state(
                status="finished",
                step=st["step"],
                stopped_early=result.stopped_early,
                **best_of(st),
            )
        finally:
            model.train(was_training)
    result.step = st["step"]
    result.best_val_loss, result.best_step = st["best_val_loss"], st["best_step"]
    result.val_loss = st["val_loss"]
    return result


def uses_compile(cfg: TrainConfig, model) -> bool:
    """MoE models train uncompiled: the expert counts are read out of the forward pass."""
    return cfg.compile and not is_moe(model)


def _or_failed(run, st: dict, save) -> None:
    """A save refused (no disk space) marks the run failed; earlier checkpoints still resume it."""
    try:
        save()
    except RunError as e:
        run.update_state(status="failed", step=st["step"], error=str(e))
        raise
