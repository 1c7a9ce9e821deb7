"""The compiled training step gives the eager step's loss and gradients, and sees every change."""

import mlx.core as mx
import mlx.nn as nn
import pytest
from helpers import (
    PAD,
    assert_same,
    counting_examples,
    lora_model,
    new_run,
    train_config,
    trained_lora,
)

from macft.data.batches import make_batch
from macft.data.packing import packing_context
from macft.lora.apply import adapter_weights
from macft.train.lean_ops import lean_ops, lean_training
from macft.train.loop import train
from macft.train.loss import batch_loss
from macft.train.recompute import grad_checkpointing
from macft.train.speed import Speed
from macft.train.step import CompiledStep, pad_index


@pytest.mark.parametrize(
    "pack,chunk,lean,ckpt",
    [(True, 16, True, False), (False, 16, True, False), (True, 0, False, False),
     (False, 0, False, True), (True, 16, True, True)],
)  # fmt: skip
def test_compiled_step_gives_the_eager_loss_and_gradients(pack, chunk, lean, ckpt):
    model = trained_lora()
    eager = nn.value_and_grad(model, batch_loss)
    # three batches, two shapes: the second call of a shape reuses its graph
    batches = [counting_examples(4, seed=s) for s in (1, 2, 1)]
    with (
        grad_checkpointing(model, ckpt),
        lean_training(model, lean_ops(False, ckpt) if lean else (), checkpointing=ckpt),
        packing_context(model, pack),
    ):
        step = CompiledStep(eager, model)
        for data in batches:
            batch = make_batch(data, PAD, pack=pack)
            expected = eager(model, batch, chunk)
            mx.eval(expected)
            got = step(model, batch, chunk)
            mx.eval(got)
            assert_same(got, expected)
    assert len(step.shapes) <= 2
    # the model holds real arrays again, not the graph's placeholders
    mx.eval(model.parameters())
    assert_same(eager(model, make_batch(batches[0], PAD), chunk), expected)


def test_padding_the_loss_positions_changes_nothing():
    model = trained_lora()
    batch = make_batch(counting_examples(3, seed=2), PAD, pack=True)
    padded = pad_index(batch)
    # half or all of the batch's tokens: at most two shapes per (rows, width)
    assert padded.index.shape[0] in (batch.inputs.size // 2, batch.inputs.size)
    assert padded.index.shape[0] > batch.index.shape[0]
    assert padded.weights.sum().item() == batch.n_targets
    lg = nn.value_and_grad(model, batch_loss)
    with packing_context(model, True):
        assert_same(lg(model, padded, 8), lg(model, batch, 8), atol=1e-6)


def test_updated_adapters_and_new_batches_are_seen():
    """The LoRA weights and the batch go in as inputs: neither is frozen into the graph."""
    model, _ = lora_model()
    eager = nn.value_and_grad(model, batch_loss)
    step = CompiledStep(eager, model)
    data = counting_examples(4, seed=3)
    batch = make_batch(data, PAD)
    first, _ = step(model, batch, 16)
    changed = {k: v + 0.1 for k, v in adapter_weights(model).items()}
    model.load_weights(list(changed.items()), strict=False)
    second = step(model, batch, 16)
    assert abs(second[0].item() - first.item()) > 1e-3
    assert_same(second, eager(model, batch, 16))
    other = make_batch([e for e in counting_examples(4, seed=9)], PAD)
    assert other.inputs.shape == batch.inputs.shape  # the same shape, other tokens
    assert_same(step(model, other, 16), eager(model, other, 16))


@pytest.mark.parametrize("ckpt", [False, True])
def test_dropout_draws_the_eager_masks(ckpt):
    model = trained_lora(dropout=0.3)
    model.train()
    eager = nn.value_and_grad(model, batch_loss)
    batch = make_batch(counting_examples(4, seed=5), PAD)
    results = []
    with grad_checkpointing(model, ckpt):
        step = CompiledStep(eager, model)
        for fn in (eager, step, step):
            mx.random.seed(7)
            results.append(fn(model, batch, 16))
            mx.eval(results[-1])
        mx.random.seed(8)  # another seed, other masks: dropout did act
        other = step(model, batch, 16)[0].item()
    # Compiled kernels built for AVX2/FMA (macft.cpu.kernels) round unlike eager ops: gradients
    # up to ~60 differ by up to ~1.2e-4 with the same masks; other masks move them by ~60.
    assert_same(results[1], results[0], atol=1e-3)
    assert_same(results[2], results[0], atol=1e-3)
    assert abs(other - results[0][0].item()) > 1e-4


def test_training_compiled_matches_eager(tmp_path):
    data = counting_examples(8)
    runs = []
    for compiled in (True, False):
        model, info = lora_model(dropout=0.1)
        cfg = train_config(iters=4, batch_size=4, learning_rate=1e-2, warmup=0, eval_every=0,
                          save_every=0, compile=compiled)  # fmt: skip
        result = train(model, data, [], cfg, new_run(tmp_path, f"c{compiled}"), PAD, lora_info=info)
        runs.append((result.losses, adapter_weights(model)))
    (losses, weights), (losses_eager, weights_eager) = runs
    assert losses.keys() == losses_eager.keys() == {1, 2, 3, 4}
    for step in losses:  # every step saw the adapters the optimizer left, not stale ones
        assert losses[step] == pytest.approx(losses_eager[step], rel=1e-5), step
    # Fused kernels round differently; Adam's g / sqrt(v) turns that into up to ~1e-4 on
    # near-zero gradients. The adapters moved ~7e-2 in these 4 steps.
    for k in weights:
        assert mx.allclose(weights[k], weights_eager[k], atol=1e-3, rtol=0), k


def test_moe_models_train_uncompiled():
    from helpers import build_moe

    dense, _ = lora_model()
    moe = build_moe("qwen3_moe")
    cfg = train_config()
    assert Speed.choose(cfg, dense).compiled
    assert not Speed.choose(cfg, moe).compiled
    assert not Speed.choose(train_config(compile=False), dense).compiled
