"""Packing and the chunked loss give the same losses and gradients as padded rows and full logits."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from helpers import PAD, Ex, build_tiny_model, counting_examples, flat, trained_lora

from macft.data.batches import collate, collate_packed, make_batch, plan_rows, width_bucket
from macft.data.packing import packing_context, packing_supported, per_token_rope
from macft.train.loss import batch_loss, ce_sum, fused_ce_sum, head_fn


def per_token_losses(model, batch):
    """{(example, position): loss} from full logits of a Batch."""
    caches = None if batch.cache is None else [batch.cache] * len(model.layers)
    logits = model(batch.inputs, cache=caches).astype(mx.float32)
    return np.array(nn.losses.cross_entropy(logits, batch.targets))


def test_packed_per_token_losses_equal_unpacked():
    data = counting_examples(5)
    model = trained_lora()
    padded = per_token_losses(model, make_batch(data, PAD, pack=False))
    with per_token_rope(model):
        batch = make_batch(data, PAD, pack=True)
        packed = per_token_losses(model, batch)
    assert batch.inputs.shape[0] < len(data)  # several examples did share a row
    _, _, _, positions, segments = collate_packed(data, PAD)
    _, rows = plan_rows([len(e.ids) - 1 for e in data])
    for r, row in enumerate(rows):
        for seg, i in enumerate(row):
            cols = np.flatnonzero(segments[r] == seg)
            assert positions[r, cols].tolist() == list(range(len(cols)))  # restart at 0
            np.testing.assert_allclose(packed[r, cols], padded[i, : len(cols)], atol=2e-5)


def test_packed_examples_do_not_see_each_other():
    data = counting_examples(3, seed=1)
    model = trained_lora()
    changed = [data[0], Ex((data[1].ids * 7 + 1) % 50 + 3, data[1].mask), data[2]]
    with per_token_rope(model):
        a = make_batch(data, PAD, pack=True)
        b = make_batch(changed, PAD, pack=True)
        la, lb = per_token_losses(model, a), per_token_losses(model, b)
    _, _, _, _, segments = collate_packed(data, PAD)
    _, rows = plan_rows([len(e.ids) - 1 for e in data])
    for r, row in enumerate(rows):
        for seg, i in enumerate(row):
            cols = segments[r] == seg
            if i == 1:
                assert not np.allclose(la[r, cols], lb[r, cols])
            else:
                np.testing.assert_allclose(la[r, cols], lb[r, cols], atol=1e-6)


@pytest.mark.parametrize("pack,chunk", [(True, 0), (False, 5), (True, 5), (True, 1024)])
def test_loss_and_gradients_match_the_reference(pack, chunk):
    data = counting_examples(6, seed=2)
    model = trained_lora()
    inputs, targets, mask, _ = collate(data, PAD)

    def reference(model, inputs, targets, mask):
        logits = model(inputs).astype(mx.float32)
        return (nn.losses.cross_entropy(logits, targets) * mask).sum()

    loss0, g0 = nn.value_and_grad(model, reference)(model, inputs, targets, mask)
    with packing_context(model, pack):
        batch = make_batch(data, PAD, pack=pack)
        loss, g = nn.value_and_grad(model, batch_loss)(model, batch, chunk)
        plain = batch_loss(model, batch, chunk, grad=False)
    assert loss.item() == pytest.approx(loss0.item(), rel=1e-5)
    assert plain.item() == pytest.approx(loss0.item(), rel=1e-5)
    g0, g = flat(g0), flat(g)
    assert g0.keys() == g.keys()
    for k in g0:
        assert mx.allclose(g0[k], g[k], atol=2e-5, rtol=1e-4), (k, mx.abs(g0[k] - g[k]).max())


@pytest.mark.parametrize("kind", ["untied", "tied", "quantized", "softcap"])
def test_fused_chunked_cross_entropy_matches_full(kind):
    model = build_tiny_model(tie_word_embeddings=kind != "untied")
    if kind == "quantized":
        nn.quantize(model, group_size=32, bits=4)
    if kind == "softcap":
        model.args.final_logit_softcapping = 5.0
    head = head_fn(model)
    rng = np.random.default_rng(0)
    h = mx.array(rng.normal(0, 1, (37, 64)).astype(np.float32))
    t = mx.array(rng.integers(0, 259, 37).astype(np.int32))

    def full(h):  # the reference: the model's own head module, full logits
        z = model.lm_head(h) if kind == "untied" else model.model.embed_tokens.as_linear(h)
        if kind == "softcap":
            z = mx.tanh(z / 5.0) * 5.0
        return nn.losses.cross_entropy(z.astype(mx.float32), t).sum()

    l0, g0 = mx.value_and_grad(full)(h)
    l1, g1 = mx.value_and_grad(lambda h: fused_ce_sum(head, h, t, 8))(h)  # 5 chunks, last short
    assert l1.item() == pytest.approx(l0.item(), rel=1e-5)
    assert ce_sum(head, h, t, 8).item() == pytest.approx(l0.item(), rel=1e-5)
    assert mx.allclose(g1, g0, atol=1e-5)
    # the incoming cotangent is applied: 3 * loss has 3 * the gradient
    _, g3 = mx.value_and_grad(lambda h: 3.0 * fused_ce_sum(head, h, t, 8))(h)
    assert mx.allclose(g3, 3 * g0, atol=1e-5)


def test_plan_rows_is_deterministic_and_complete():
    lengths = [50, 10, 31, 64, 7, 7, 33]
    width, rows = plan_rows(lengths)
    assert (width, rows) == plan_rows(lengths)
    assert width % 32 == 0 and width >= 64
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= width for r in rows)
    assert len(rows) * width < len(lengths) * 64  # less padding than one example per row
    assert plan_rows([100] * 8, max_width=128)[0] == 128


def test_widths_are_few_and_pad_little():
    """Every width up to 4096 tokens falls in one of 40 buckets, each at most 12.5% padding."""
    buckets = {width_bucket(n) for n in range(1, 4097)}
    assert len(buckets) == 40 and max(buckets) == 4096
    for n in range(1, 4097):
        w = width_bucket(n)
        assert w >= n and (w - n <= 32 or w - n < n / 8), n
    assert sorted(buckets)[15:18] == [512, 576, 640]  # 32 apart up to 512, then 8 per doubling


def test_collate_packed_layout():
    ex = [Ex(np.array([1, 2, 3, 4]), np.array([0, 0, 1, 1], bool)), Ex(np.arange(5, 10), None)]
    ex[1].mask = np.ones(5, bool)
    inputs, targets, mask, positions, segments = collate_packed(ex, pad_id=0, pad_to=8)
    assert inputs.shape == (1, 8)
    # longest first: example 1 (4 inputs), then example 0 (3 inputs), then one pad
    assert inputs[0].tolist() == [5, 6, 7, 8, 1, 2, 3, 0]
    assert targets[0].tolist() == [6, 7, 8, 9, 2, 3, 4, 0]
    assert mask[0].tolist() == [1, 1, 1, 1, 0, 1, 1, 0]
    assert positions[0].tolist() == [0, 1, 2, 3, 0, 1, 2, 0]
    assert segments[0].tolist() == [0, 0, 0, 0, 1, 1, 1, 2]


def test_packing_is_only_claimed_for_known_architectures():
    model = build_tiny_model()
    assert packing_supported(model)
    model.args.model_type = "somethingelse"
    assert not packing_supported(model)


def test_grad_checkpointing_with_packing_gives_the_same_gradients():
    from macft.train.recompute import grad_checkpointing

    data = counting_examples(4)
    model = trained_lora()
    lg = nn.value_and_grad(model, batch_loss)
    with packing_context(model, True):
        batch = make_batch(data, PAD, pack=True)
        loss, grads = lg(model, batch, 256)
        with grad_checkpointing(model):
            loss_ck, grads_ck = lg(model, batch, 256)
    assert loss.item() == pytest.approx(loss_ck.item(), rel=1e-6)
    for k, v in flat(grads).items():
        assert mx.allclose(v, flat(grads_ck)[k], atol=1e-5), k
