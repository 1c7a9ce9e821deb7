"""Preference tuning on tiny models: the DPO (with and without train.dpo_nll) and ORPO losses
against direct computations, the reference is the base with LoRA off and never moves,
accumulation and resume are exact."""

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from helpers import (
    PAD,
    Reports,
    counting_pairs,
    lora_model,
    new_run,
    train_config,
    weights_close,
)
from mlx.utils import tree_flatten

from macft.config.recipes import load_recipe
from macft.data.batches import make_batch
from macft.errors import DataError, RecipeError
from macft.lora.apply import adapter_weights, lora_disabled
from macft.runs.folder import RunDir
from macft.train.loop import train
from macft.train.plan import setup_for
from macft.train.preference import Reference, pair_losses, preference_loss, row_logps
from macft.train.session import describe_method
from macft.train.step import accumulate

BETA = 0.5


def direct_logp(model, example) -> float:
    """Sum of log p(token) over the answer tokens, from full logits of the one sequence."""
    ids = mx.array(np.asarray(example.ids)[None])
    logp = nn.log_softmax(model(ids[:, :-1]).astype(mx.float32), axis=-1)[0]
    picked = np.array(mx.take_along_axis(logp, ids[0, 1:, None], axis=-1)[:, 0])
    return float((picked * np.asarray(example.mask[1:], np.float32)).sum())


def moved_model():
    """A LoRA model whose adapters are not zero: policy and reference differ."""
    model, _ = lora_model()
    mx.random.seed(7)
    for layer in model.layers:
        lin = layer.self_attn.q_proj
        lin.lora_b = mx.random.normal(lin.lora_b.shape) * 0.3
    return model


@pytest.mark.parametrize("chunk, nll", [(0, 0.0), (64, 0.0), (64, 0.7)])
def test_dpo_loss_equals_direct_computation(chunk, nll):
    model, pairs = moved_model(), counting_pairs(3)
    model.eval()
    Reference(model, PAD, chunk).fill(pairs)
    with lora_disabled(model):
        for p in pairs:  # the reference is the base: LoRA off
            assert p.ref[0] == pytest.approx(direct_logp(model, p.chosen), rel=1e-5)
            assert p.ref[1] == pytest.approx(direct_logp(model, p.rejected), rel=1e-5)
    want = 0.0
    for p in pairs:
        c, r = direct_logp(model, p.chosen), direct_logp(model, p.rejected)
        z = BETA * ((c - p.ref[0]) - (r - p.ref[1]))
        # train.dpo_nll: the chosen answer's mean token NLL, weighted
        want += -math.log(1 / (1 + math.exp(-z))) - nll * c / p.chosen.mask[1:].sum()
    batch = make_batch(pairs, PAD)
    cfg = train_config(method="dpo", beta=BETA, dpo_nll=nll)
    loss, stats = preference_loss(cfg)(model, batch, chunk)
    assert loss.item() == pytest.approx(want, rel=1e-4)
    logps, _ = row_logps(model, batch, chunk)
    want_c = sum(direct_logp(model, p.chosen) for p in pairs)
    assert stats[2].item() == pytest.approx(want_c, rel=1e-5)
    assert logps.shape == (6,)


def test_dpo_sign_a_model_preferring_chosen_has_the_lower_loss():
    ref, tokens = mx.array([-10.0, -10.0]), mx.array([5.0, 5.0])
    prefers = pair_losses("dpo", BETA, 0, mx.array([-8.0, -12.0]), tokens, ref)
    dislikes = pair_losses("dpo", BETA, 0, mx.array([-12.0, -8.0]), tokens, ref)
    neutral = pair_losses("dpo", BETA, 0, mx.array([-10.0, -10.0]), tokens, ref)
    assert prefers[0].item() < neutral[0].item() < dislikes[0].item()
    assert neutral[0].item() == pytest.approx(math.log(2), rel=1e-6)
    assert prefers[1].item() == pytest.approx(BETA * 2) and prefers[2].item() == pytest.approx(-1)


def test_dpo_nll_zero_is_exactly_plain_dpo_and_adds_the_chosen_mean_nll():
    ref, tokens = mx.array([-10.0, -9.0]), mx.array([5.0, 4.0])
    logps = mx.array([-8.0, -12.0])
    old = -nn.log_sigmoid(BETA * (logps[0] - ref[0]) - BETA * (logps[1] - ref[1])).item()
    plain = pair_losses("dpo", BETA, 0, logps, tokens, ref, dpo_nll=0.0)
    assert plain[0].item() == old  # bit for bit: at 0 the term is not in the graph
    nll = pair_losses("dpo", BETA, 0, logps, tokens, ref, dpo_nll=2.0)
    assert nll[0].item() == pytest.approx(old + 2.0 * 8 / 5, rel=1e-6)  # chosen: 8 nats, 5 tokens
    # the rewards, and so reward accuracy and margin, stay DPO's
    assert nll[1].item() == plain[1].item() and nll[2].item() == plain[2].item()


def test_orpo_loss_equals_direct_computation():
    model, pairs = moved_model(), counting_pairs(3, seed=1)
    model.eval()
    lam = 0.3
    want = 0.0
    for p in pairs:
        mc = direct_logp(model, p.chosen) / p.chosen.mask[1:].sum()
        mr = direct_logp(model, p.rejected) / p.rejected.mask[1:].sum()
        odds = lambda m: math.exp(m) / (1 - math.exp(m))  # noqa: E731
        ratio = math.log(odds(mc) / odds(mr))
        want += -mc - lam * math.log(1 / (1 + math.exp(-ratio)))
    cfg = train_config(method="orpo", orpo_lambda=lam)
    loss, stats = preference_loss(cfg)(model, make_batch(pairs, PAD), 64)
    assert loss.item() == pytest.approx(want, rel=1e-4)
    # a model preferring chosen: the odds-ratio term is below log 2, and above it reversed
    tokens = mx.array([4.0, 4.0])
    good = pair_losses("orpo", 0, 1.0, mx.array([-2.0, -8.0]), tokens)[0].item()
    bad = pair_losses("orpo", 0, 1.0, mx.array([-8.0, -2.0]), tokens)[0].item()
    assert good - 0.5 < math.log(2) < bad - 2.0


@pytest.mark.parametrize("chunk", [0, 64])
def test_compiled_reference_is_the_op_by_op_one_whatever_the_adapters(chunk):
    model, plain, compiled = moved_model(), counting_pairs(5), counting_pairs(5)
    model.eval()
    Reference(model, PAD, chunk).fill(plain)
    ref = Reference(model, PAD, chunk, compiled=True)
    ref.fill(compiled)
    for p, q in zip(plain, compiled, strict=True):
        assert q.ref.tolist() == pytest.approx(p.ref.tolist(), rel=1e-5)
    # the adapters move (as training moves them): the traced graph still computes the base
    for layer in model.layers:
        layer.self_attn.q_proj.lora_b = layer.self_attn.q_proj.lora_b + 1.0
    again = counting_pairs(5)
    ref.fill(again)
    assert [p.ref.tolist() for p in again] == [p.ref.tolist() for p in compiled]
    assert ref.forward.shapes  # it did run compiled


def test_reference_is_the_base_and_never_changes(tmp_path):
    pairs, valid = counting_pairs(6), counting_pairs(2, seed=5)
    model, info = lora_model()
    model.eval()
    with lora_disabled(model):
        before = [(direct_logp(model, p.chosen), direct_logp(model, p.rejected)) for p in pairs]
    cfg = train_config(
        iters=6, batch_size=2, learning_rate=1e-2, warmup=0, eval_every=3, method="dpo", beta=BETA
    )
    train(model, pairs, valid, cfg, new_run(tmp_path), PAD, lora_info=info)
    model.eval()
    for p, (c, r) in zip(pairs, before, strict=True):
        assert p.ref.tolist() == pytest.approx([c, r], rel=1e-5)  # what was cached: the base
        # trained, the policy moved away from it ...
        assert abs(direct_logp(model, p.chosen) - c) > 1e-3
    with lora_disabled(model):  # ... and LoRA off is still exactly the base
        after = [(direct_logp(model, p.chosen), direct_logp(model, p.rejected)) for p in pairs]
    assert after == before
    assert all(p.ref is not None for p in valid)


@pytest.mark.parametrize("method, nll", [("dpo", 0.0), ("dpo", 0.5), ("orpo", 0.0)])
def test_accumulated_grads_equal_one_big_batch(method, nll):
    model, pairs = moved_model(), counting_pairs(4)  # different lengths: padding differs
    Reference(model, PAD).fill(pairs)
    cfg = train_config(method=method, beta=BETA, dpo_nll=nll)
    lg = nn.value_and_grad(model, preference_loss(cfg))
    loss1, g1, n1, _ = accumulate(lg, model, [[p] for p in pairs], PAD, loss_chunk=64)
    loss4, g4, n4, _ = accumulate(lg, model, [pairs], PAD, loss_chunk=64)
    assert n1 == n4 == 4  # pairs, not tokens: each pair weighs the same
    assert loss1.shape == (5,)  # the loss, then the stats' sums
    # the margin is a small difference of large log-probabilities: absolute rounding
    assert np.allclose(np.array(loss1), np.array(loss4), rtol=1e-5, atol=1e-4)
    weights_close(dict(tree_flatten(g1)), dict(tree_flatten(g4)), 1e-5)  # sums of ~0.5


def test_accumulation_4x1_gives_the_batch_4_adapters(tmp_path):
    common = dict(iters=3, learning_rate=1e-2, warmup=0, eval_every=0, save_every=0)
    m1, info = lora_model()
    cfg1 = train_config(batch_size=1, grad_accumulation=4, method="dpo", **common)
    train(m1, counting_pairs(4), [], cfg1, new_run(tmp_path, "a"), PAD, lora_info=info)
    m4, info = lora_model()
    cfg4 = train_config(batch_size=4, grad_accumulation=1, method="dpo", **common)
    train(m4, counting_pairs(4), [], cfg4, new_run(tmp_path, "b"), PAD, lora_info=info)
    weights_close(adapter_weights(m1), adapter_weights(m4), 5e-5)


@pytest.mark.parametrize("nll", [0.0, 0.5])
def test_resume_equals_uninterrupted(tmp_path, nll):
    cfg = train_config(
        iters=8, batch_size=2, grad_accumulation=2, learning_rate=5e-3, warmup=2,
        eval_every=4, save_every=3, report_every=1, seed=3, method="dpo", beta=BETA, dpo_nll=nll,
    )  # fmt: skip
    straight, info = lora_model(dropout=0.2)
    run_a = new_run(tmp_path, "a")
    train(straight, counting_pairs(7), counting_pairs(2, 9), cfg, run_a, PAD, lora_info=info)

    first, info = lora_model(dropout=0.2)
    run_b = new_run(tmp_path, "b")
    part = train(first, counting_pairs(7), counting_pairs(2, 9), cfg, run_b, PAD,
                 lora_info=info, callback=Reports(5))  # fmt: skip
    assert part.status == "interrupted" and part.step == 5
    # a fresh process: other LoRA init, no cached reference; all from the checkpoint and data
    second, info = lora_model(dropout=0.2, seed=99)
    rest = train(second, counting_pairs(7), counting_pairs(2, 9), cfg, RunDir(run_b.path), PAD,
                 resume=True, lora_info=info)  # fmt: skip
    assert rest.step == 8
    weights_close(adapter_weights(straight), adapter_weights(second), 1e-6)
    ma, mb = run_a.read_metrics(), RunDir(run_b.path).read_metrics()
    assert [r["step"] for r in mb] == [r["step"] for r in ma]
    keys = ("train_loss", "reward_margin", "reward_accuracy", "chosen_logp", "rejected_logp")
    for ra, rb in zip(ma[1:], mb[1:], strict=True):
        for k in keys:
            assert rb[k] == pytest.approx(ra[k], abs=1e-5), (ra["step"], k)
    assert ma[-1]["reward_accuracy"] > 0.5 and ma[-1]["val_loss"] < ma[0]["val_loss"]
    if not nll:
        assert ma[0]["val_loss"] == pytest.approx(math.log(2), rel=1e-5)  # policy = reference


def test_method_and_data_must_match(tmp_path):
    model, info = lora_model()
    with pytest.raises(DataError, match="train.method is sft"):
        train(model, counting_pairs(2), [], train_config(iters=1), new_run(tmp_path), PAD)


def test_memory_plan_counts_both_rows_of_a_pair():
    sft, _ = load_recipe("smollm2-135m-wikisql")
    dpo, _ = load_recipe("smollm2-135m-wikisql-dpo")
    a = setup_for(sft, 256, "float32", on_mac=False)
    b = setup_for(dpo, 256, "float32", on_mac=False)
    assert sft["train"]["batch_size"] == dpo["train"]["batch_size"] == a.batch_size == 4
    assert b.batch_size == 8


def test_the_schedule_line_names_the_loss_and_an_unused_dpo_key():
    dpo = train_config(method="dpo", beta=0.2, dpo_nll=1.0)
    assert describe_method(dpo) == (", DPO beta 0.2 + 1 x the chosen answer's loss", None)
    assert describe_method(train_config()) == ("", None)
    # the shipped DPO recipe switched to ORPO: its dpo_nll does nothing, and the user is told
    what, note = describe_method(train_config(method="orpo", orpo_lambda=0.3, dpo_nll=1.0))
    assert what == ", ORPO lambda 0.3"
    assert note == "train.dpo_nll 1 is DPO's; train.method orpo leaves it unused"


def test_moe_aux_loss_is_refused_with_preference_methods():
    with pytest.raises(RecipeError, match="train.moe_aux_loss: not with train.method: orpo"):
        load_recipe("smollm2-135m-wikisql-dpo", ("train.method=orpo", "train.moe_aux_loss=0.01"))
