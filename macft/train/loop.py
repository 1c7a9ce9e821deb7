"""The training loop: batch -> step -> commit -> evaluate -> report -> checkpoint, and exact resume.

Token-weighted accumulation, the LR schedule, validation, early stopping and checkpoints that
resume to the same losses. Data-parallel ranks (train/parallel) each run this same loop.
"""

import contextlib
import signal
import threading
import time
from dataclasses import dataclass, field, replace

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map_with_path

from macft import device
from macft.config.schema import TrainConfig
from macft.data.batches import batch_order, batches_per_epoch, example_tokens
from macft.data.dataset import check_method
from macft.data.encode import Pair
from macft.errors import DataError, RunError
from macft.lora.apply import adapter_weights, load_adapter_weights
from macft.train import divergence, preference
from macft.train.evaluate import evaluate
from macft.train.expert_load import ExpertTracker
from macft.train.loss import batch_loss
from macft.train.parallel.world import SOLO, PeerLost
from macft.train.schedule import lr_at, micro_seed, total_steps
from macft.train.speed import Speed, Stepper
from macft.train.state import Clock, TrainState


class TrainingCallback:
    """What the loop tells whoever shows its progress; override what you need."""

    def on_start(self, total_steps: int, start_step: int) -> None:
        pass

    def on_report(self, record: dict) -> None:
        pass


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


class Batches:
    """Each epoch's batch order, and the next micro-batch from a (epoch, index) position."""

    def __init__(self, train_set: list, batch_size: int, seed: int):
        self.train_set, self.batch_size, self.seed = train_set, batch_size, seed
        self.per_epoch = batches_per_epoch(len(train_set), batch_size)
        self.lengths = [example_tokens(e) for e in train_set]
        self.orders: dict[int, list[list[int]]] = {}

    def next(self, epoch: int, index: int) -> tuple[list[int], int, int]:
        if index >= self.per_epoch:
            epoch, index = epoch + 1, 0
        if epoch not in self.orders:
            self.orders.clear()  # one epoch at a time is enough
            n = len(self.train_set)
            self.orders[epoch] = batch_order(n, self.batch_size, self.seed, epoch, self.lengths)
        return self.orders[epoch][index], epoch, index + 1


def train(
    model,
    train_set,
    valid_set,
    cfg: TrainConfig,
    run,
    pad_id: int,
    resume: bool = False,
    callback: TrainingCallback | None = None,
    lora_info=None,
    world=SOLO,
) -> TrainResult:
    """Train the model's trainable (LoRA) parameters; checkpoints and metrics go to `run`.

    With a `world` of several ranks, each trains on its share of every global batch
    (batch_size x ranks) and only rank 0's `run` writes anything."""
    if not train_set:
        raise DataError("no training examples left to train on; check the data file")
    check_method(cfg.method, isinstance(train_set[0], Pair), "the training data")
    if world.size > 1:
        cfg = replace(cfg, batch_size=cfg.batch_size * world.size)
    t = Training(model, train_set, valid_set, cfg, run, pad_id, lora_info, world)
    callback, stepper = callback or TrainingCallback(), t.stepper
    with run.lock(), t.experts, stepper:
        t.start(resume)
        update = stepper.update_fn(t.optimizer, cfg.max_grad_norm)  # after the state is final
        callback.on_start(t.total, t.state.step)
        device.reset_peak_memory()
        t.evaluate_untrained(callback)
        with t.recording():
            while t.state.step < t.total:
                step = t.state.step + 1
                started = time.perf_counter()
                batches, epoch, index = t.next_batches()
                seeds = [micro_seed(cfg.seed, step, i, world.rank) for i in range(len(batches))]
                sums = stepper.grads(batches, seeds)
                if cfg.method != "sft" and sums[0].ndim == 0:  # a rank's share had no pair:
                    sums = (mx.zeros(1 + len(preference.STATS)), *sums[1:])  # the same shape
                loss, grads, n_targets, n_inputs = world.sum_step(
                    *sums, model.trainable_parameters(), step
                )
                loss, stats = (loss[0], loss[1:]) if loss.ndim else (loss, None)  # pairs
                lr = lr_at(step, cfg, t.total)
                ok = divergence.finite(loss, grads)  # else the step is skipped, not applied
                with _defer_sigint():  # model, optimizer and counters move on together
                    if n_targets and ok:
                        t.optimizer.learning_rate = lr
                        update(grads, mx.array(n_targets, mx.float32))
                    mx.eval(model.trainable_parameters(), t.optimizer.state)
                    loss, n_targets = (loss.item(), n_targets) if ok else (0.0, 0)
                    stats = stats.tolist() if ok and stats is not None else None
                    seconds = time.perf_counter() - started
                    t.state.commit(step, epoch, index, loss, n_targets, n_inputs, seconds, stats)
                    divergence.count(t.state, ok)
                    t.clock.tick()
                t.result.losses[step] = loss / max(n_targets, 1) if ok else float("nan")
                stop = t.after_step(step, lr, callback)
                divergence.check(t.state, step, cfg, run.path)
                if stop:
                    break
    return t.finish()


class Training:
    """One call of train(): its settings, state, optimizer and run folder, and the loop's steps."""

    def __init__(self, model, train_set, valid_set, cfg, run, pad_id, lora_info, world):
        self.model, self.valid_set, self.cfg, self.run = model, valid_set, cfg, run
        self.pad_id, self.world = pad_id, world
        self.speed = Speed.choose(cfg, model, world.size)
        self.experts = ExpertTracker(model, pad_id, cfg.moe_aux_loss)  # MoE: expert load, aux
        self.loss_fn = batch_loss if cfg.method == "sft" else preference.preference_loss(cfg)
        # DPO's reference: the base, LoRA off, once per pair (ORPO needs none)
        self.reference = None
        if cfg.method == "dpo":
            self.reference = preference.Reference(
                model, pad_id, self.speed.loss_chunk, self.speed.compiled
            )
        prepare = self.reference.fill_batches if self.reference else None
        self.stepper = Stepper(
            model, self.speed, pad_id, self.experts.loss(self.loss_fn), prepare=prepare
        )
        self.batches = Batches(train_set, cfg.batch_size, cfg.seed)
        self.total = total_steps(cfg, len(train_set))
        self.adapter_config = lora_info.adapter_config() if lora_info is not None else None
        self.optimizer = optim.AdamW(learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay)
        self.optimizer.init(model.trainable_parameters())
        self.state = TrainState()
        self.result = TrainResult("finished", 0, self.total)

    # --- before the first step ------------------------------------------------------------
    def start(self, resume: bool) -> None:
        """Restore the last checkpoint (resume), agree across ranks, mark the run running."""
        if resume and (ckpt := self.run.latest_checkpoint()) is not None:
            self._restore(ckpt)
        self.state = TrainState.from_saved(
            self.world.sync(self.model, self.optimizer, self.state.saved())
        )
        if resume:
            self.run.trim_metrics(self.state.step)  # records past the checkpoint come again
        self.run.update_state(status="running", step=self.state.step, total_steps=self.total)
        self.clock = Clock(self.state)

    def _restore(self, ckpt) -> None:
        adapters, opt_state, saved = self.run.load_checkpoint(ckpt)
        n = saved.get("world_size", 1)
        if n != self.world.size:
            raise RunError(
                f"{ckpt}: this run trained as {n} process(es), not {self.world.size}; resume "
                f"it with {n} (--hosts with {n} entries; 127.0.0.1 repeated runs them on one Mac)"
            )
        load_adapter_weights(self.model, adapters)
        missing = [k for k, _ in tree_flatten(self.optimizer.state) if k not in opt_state]
        if missing:
            raise RunError(
                f"checkpoint optimizer state lacks {len(missing)} entries (e.g. {missing[0]})"
            )
        self.optimizer.state = tree_map_with_path(
            lambda path, _: opt_state[path], self.optimizer.state
        )
        self.state = TrainState.from_saved(saved)

    def evaluate_untrained(self, callback) -> None:
        """The untrained model's validation loss: the figure every later one is judged by."""
        cfg, run = self.cfg, self.run
        fresh = self.state.step == 0 and self.valid_set and cfg.eval_every
        if fresh and self.world.from_main(lambda: not run.read_metrics()):
            record = self.state.report(
                0.0, self.total, self.batches.per_epoch, self.validate(), False
            )
            run.append_metrics(record)
            callback.on_report(record)

    # --- each step ------------------------------------------------------------------------
    def next_batches(self) -> tuple[list, int, int]:
        """This rank's examples of the step's micro-batches, and the data position after them."""
        epoch, index, batches = self.state.epoch, self.state.index, []
        for _ in range(self.cfg.grad_accumulation):
            idx, epoch, index = self.batches.next(epoch, index)
            batches.append([self.batches.train_set[i] for i in self.world.shard(idx)])
        return batches, epoch, index

    def validate(self) -> float | None:
        cfg, world = self.cfg, self.world
        try:
            return evaluate(
                self.model, self.valid_set, cfg.batch_size, self.pad_id, cfg.eval_batches,
                self.speed.pack, self.speed.loss_chunk, (world.rank, world.size), world.sum_eval,
                loss_fn=self.loss_fn, prepare=self.reference and self.reference.fill,
            )  # fmt: skip
        finally:
            device.clear_cache()  # validation's shapes are not the training steps'; free them

    def after_step(self, step: int, lr: float, callback) -> bool:
        """Evaluate, report and checkpoint as the settings ask; True to stop early."""
        cfg, st, last = self.cfg, self.state, step == self.total
        val, stop = None, False
        if self.valid_set and (last or (cfg.eval_every and step % cfg.eval_every == 0)):
            val = self.validate()
            if st.is_best(val):  # saved first: the state names only a best that is on disk
                info = {"step": step, "val_loss": val}
                self.run.save_best(adapter_weights(self.model), self.adapter_config, info)
            st.record_val(val)
            stop = st.should_stop(cfg.early_stopping)
        self.clock.tick()
        if last or stop or val is not None or step % cfg.report_every == 0:
            record = st.report(lr, self.total, self.batches.per_epoch, val, final=last or stop)
            record.update(self.experts.report(), **self.stepper.shapes())
            if stop:
                record["stopped_early"] = self.result.stopped_early = True
            self.run.append_metrics(record)
            callback.on_report(record)
        if cfg.save_every and step % cfg.save_every == 0 and not last and not stop:
            self.checkpoint()
            self.run.update_state(status="running", step=step)
        return stop

    def checkpoint(self) -> None:
        self.run.save_checkpoint(
            self.state.step,
            adapter_weights(self.model),
            dict(tree_flatten(self.optimizer.state)),
            self.state.saved(total_steps=self.total, world_size=self.world.size),
            self.adapter_config,
        )

    # --- the end, however it comes --------------------------------------------------------
    @contextlib.contextmanager
    def recording(self):
        """Around the steps: the run folder says how they ended (finished, interrupted, failed)."""
        was_training = self.model.training
        self.model.train()
        try:
            yield
        except KeyboardInterrupt:
            self._save_or_fail(self.checkpoint)
            self.run.update_state(status="interrupted", step=self.state.step, **self.state.best())
            self.result.status = "interrupted"
        except BaseException as e:
            if isinstance(e, PeerLost) and self.state.step:  # the model holds a whole step
                self._save_or_fail(self.checkpoint)
            self.run.mark_failed(f"{type(e).__name__}: {e}", step=self.state.step)
            raise
        else:
            self._save_or_fail(self.checkpoint)
            adapters = adapter_weights(self.model)
            self._save_or_fail(lambda: self.run.write_adapters(adapters, self.adapter_config))
            self.run.update_state(
                status="finished",
                step=self.state.step,
                stopped_early=self.result.stopped_early,
                **self.state.best(),
            )
        finally:
            self.model.train(was_training)

    def _save_or_fail(self, save) -> None:
        """A save refused (no disk space) marks the run failed; earlier checkpoints still resume it."""
        try:
            save()
        except RunError as e:
            self.run.mark_failed(str(e), step=self.state.step)
            raise

    def finish(self) -> TrainResult:
        r, st = self.result, self.state
        r.step, r.best_val_loss, r.best_step, r.val_loss = (
            st.step,
            st.best_val_loss,
            st.best_step,
            st.val_loss,
        )
        return r


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
