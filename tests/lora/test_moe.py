"""Mixture-of-experts LoRA on tiny random qwen3_moe and mixtral models: presets, routing, metrics."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from helpers import (
    MOE_COMMON,
    MOE_CONFIGS,
    MOE_EXPERTS,
    MOE_FF,
    MOE_HIDDEN,
    MOE_TOP_K,
    PAD,
    Reports,
    build_moe,
    counting_examples,
    new_run,
    train_config,
)
from mlx.utils import tree_flatten

from macft.config.schema import LoraConfig
from macft.data.batches import make_batch
from macft.export.merge import fused_model
from macft.lora.apply import apply_lora
from macft.train.loop import train
from macft.train.loss import batch_loss

E, K, H, FF, RANK = MOE_EXPERTS, MOE_TOP_K, MOE_HIDDEN, MOE_FF, 4  # the tiny models' shape; rank


def lora_count(d_in, d_out, copies=1):
    return copies * RANK * (d_in + d_out)


def expected(targets, router):
    """Trainable parameters per preset, from the shapes alone (2 layers)."""
    q, kv = 4 * 16, 2 * 16
    attention = lora_count(H, q) + 2 * lora_count(H, kv) + lora_count(q, H)
    experts = 2 * lora_count(H, FF, E) + lora_count(FF, H, E)
    per_layer = {"attention": attention, "experts": experts, "all-linear": attention + experts}
    return 2 * (per_layer[targets] + (lora_count(H, E) if router else 0))


@pytest.mark.parametrize("kind", MOE_CONFIGS)
@pytest.mark.parametrize(
    "targets,router",
    [("attention", False), ("experts", False), ("experts", True), ("all-linear", False)],
)
def test_each_preset_trains_exactly_what_it_names(kind, targets, router):
    model = build_moe(kind)
    apply_lora(
        model, LoraConfig(rank=RANK, alpha=2 * RANK, targets=targets, router=router, dropout=0.0)
    )
    trainable = dict(tree_flatten(model.trainable_parameters()))
    assert sum(v.size for v in trainable.values()) == expected(targets, router)
    names = set(trainable)
    assert any(".gate." in n for n in names) == router  # the router: only when asked
    assert any("switch_mlp" in n for n in names) == (targets != "attention")
    assert any("self_attn" in n for n in names) == (targets != "experts")


def routed_experts(model, inputs):
    """The experts each layer's router picks for these inputs (a forward pass, gates hooked)."""
    picked, blocks = [], [layer.mlp for layer in model.model.layers]
    for block in blocks:
        gate = block.gate

        def hooked(x, gate=gate):
            logits = gate(x)
            picked.append(set(np.array(mx.argpartition(-logits, K - 1, axis=-1)[..., :K]).ravel()))
            return logits

        block.gate = hooked
    model(inputs)
    for block, gate in zip(blocks, [b.gate.__defaults__[0] for b in blocks], strict=True):
        block.gate = gate
    return picked


def test_unrouted_experts_get_no_gradient():
    model = build_moe("qwen3_moe")
    apply_lora(model, LoraConfig(rank=RANK, alpha=2 * RANK, targets="experts", dropout=0.0))
    for _, m in model.named_modules():  # non-zero B: every routed expert's A gets a gradient
        if hasattr(m, "lora_b"):
            m.lora_b = mx.random.normal(m.lora_b.shape) * 0.3
    batch = make_batch([counting_examples(1, seed=3)[0]], PAD)
    inputs = batch.inputs[:, :3]  # few tokens: some experts get none
    picked = routed_experts(model, inputs)
    _, grads = nn.value_and_grad(model, lambda m: m(inputs).astype(mx.float32).sum())(model)
    grads = dict(tree_flatten(grads))
    unrouted = 0
    for i, chosen in enumerate(picked):
        g = np.array(grads[f"model.layers.{i}.mlp.switch_mlp.up_proj.lora_a"])
        for e in range(E):
            if e in chosen:
                assert np.abs(g[e]).max() > 0
            else:
                unrouted += 1
                assert np.abs(g[e]).max() == 0
    assert unrouted > 0  # the test saw at least one expert with no tokens


@pytest.mark.parametrize("kind", MOE_CONFIGS)
def test_training_keeps_frozen_routers_and_logs_expert_load(kind, tmp_path):
    model = build_moe(kind)
    info = apply_lora(model, LoraConfig(rank=RANK, alpha=2 * RANK, targets="experts", dropout=0.0))
    frozen = {k: np.array(v) for k, v in tree_flatten(model.parameters()) if "lora" not in k}
    data = counting_examples(8)
    cfg = train_config(iters=20, batch_size=4, learning_rate=3e-3, warmup=2, eval_every=10,
                      report_every=5)  # fmt: skip
    run = new_run(tmp_path)
    result = train(model, data, data, cfg, run, PAD, lora_info=info)
    assert result.losses[20] < result.losses[1]
    after = dict(tree_flatten(model.parameters()))
    for k, v in frozen.items():  # routers and the experts' base weights: bit-identical
        assert np.array_equal(np.array(after[k]), v), k
    rows = [json.loads(x) for x in (run.path / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "expert_counts" in r]
    assert logged, rows[-1].keys()
    for r in logged:
        assert set(r["expert_counts"]) == {"0", "1"}  # both layers
        for counts in r["expert_counts"].values():
            assert len(counts) == E and sum(counts) == K * r["expert_tokens"]
        assert K / E <= r["expert_top_share"] <= 1.0


def test_dense_models_log_no_expert_metrics(tmp_path):
    from helpers import lora_model

    model, info = lora_model()
    run = new_run(tmp_path)
    train(model, counting_examples(4), [], train_config(iters=3, batch_size=2, report_every=1),
          run, PAD, lora_info=info)  # fmt: skip
    rows = [json.loads(x) for x in (run.path / "metrics.jsonl").read_text().splitlines()]
    assert rows and not any(k.startswith("expert_") for r in rows for k in r)


def test_batch_loss_runs_on_moe():
    model = build_moe("mixtral")
    apply_lora(model, LoraConfig(rank=RANK, alpha=2 * RANK, targets="all-linear", dropout=0.0))
    batch = make_batch(counting_examples(3), PAD)
    assert np.isfinite(batch_loss(model, batch).item())


@pytest.mark.parametrize("kind", MOE_CONFIGS)
def test_fused_moe_model_gives_the_adapted_logits(kind):
    model = build_moe(kind)
    apply_lora(model, LoraConfig(rank=RANK, alpha=2 * RANK, targets="all-linear", dropout=0.0))
    for _, m in model.named_modules():  # adapters that change the output
        if hasattr(m, "lora_b"):
            m.lora_b = mx.random.normal(m.lora_b.shape) * 0.2
    inputs = make_batch(counting_examples(2, seed=5), PAD).inputs
    adapted = model(inputs)
    plain = build_moe(kind)(inputs)
    assert mx.abs(adapted - plain).max().item() > 1e-2  # the adapters matter
    fused = fused_model(model, MOE_CONFIGS[kind][1], mx.float32)
    assert not any("lora" in k for k, _ in tree_flatten(fused.parameters()))
    assert mx.allclose(fused(inputs), adapted, atol=1e-4)


@pytest.mark.parametrize("kind", MOE_CONFIGS)
def test_cli_trains_fuses_and_exports_an_moe_run(kind, tmp_path):
    import gguf
    import mlx_lm
    from click.testing import CliRunner
    from helpers import bpe_tokenizer, save_tiny_model_dir, train_with_cli, write_chat

    from macft.cli import cli

    module, cfg = MOE_CONFIGS[kind]
    cfg = {**cfg, "vocab_size": 300}  # the BPE tokenizer's: llama.cpp needs its merges
    mx.random.seed(0)
    model = module.Model(module.ModelArgs.from_dict(cfg))
    model_dir = save_tiny_model_dir(tmp_path / "moe", model=model, **cfg)
    bpe_tokenizer()._tokenizer.save_pretrained(str(model_dir))
    data = write_chat(tmp_path / "qa.jsonl", 16, [("what is bgp", "a routing protocol")])
    # group 32: the toy's experts are 32 wide, and a float SwitchLinear would take bfloat16 on
    # the Mac's path, which MLX's CPU gather_mm does not (Metal's does)
    settings = {"model.group_size": 32, "train.batch_size": 4, "train.iters": 4,
                "train.grad_checkpoint": "false", "train.learning_rate": "2.0e-2",
                "train.warmup": 0, "train.eval_every": 0, "train.save_every": 0,
                "lora.rank": RANK, "lora.targets": "experts"}  # fmt: skip
    run = train_with_cli(model_dir, data, tmp_path / "run", settings)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("expert_counts" in r for r in rows)
    ids = mx.array([[5, 6, 7, 8, 9]])
    adapted, _ = mlx_lm.load(str(model_dir), adapter_path=str(run))  # mlx-lm reads the adapters
    result = CliRunner().invoke(cli, ["fuse", str(run), "--dtype", "f32"])
    assert result.exit_code == 0, result.output
    fused, _ = mlx_lm.load(str(run / "export" / "mlx"))
    assert mx.allclose(fused(ids), adapted(ids), atol=1e-4)
    result = CliRunner().invoke(cli, ["fuse", str(run), "--gguf", "--quant", "f16"])
    assert result.exit_code == 0, result.output
    (path,) = (run / "export").glob("*.gguf")
    names = {t.name for t in gguf.GGUFReader(path).tensors}
    assert {"blk.0.ffn_gate_exps.weight", "blk.1.ffn_down_exps.weight"} <= names


def test_collapse_warns_and_names_the_busy_experts(tmp_path):
    model = build_moe("qwen3_moe")
    info = apply_lora(model, LoraConfig(rank=RANK, alpha=2 * RANK, targets="experts", dropout=0.0))
    favour = mx.array([8.0, 6.0, 0.0, 0.0])  # every token routed to experts 0 and 1

    class Biased(nn.Linear):
        def __call__(self, x):
            return super().__call__(x) * 0 + favour

    for layer in model.model.layers:
        layer.mlp.gate.__class__ = Biased
    run = new_run(tmp_path)
    reports = Reports()
    train(model, counting_examples(8), [], train_config(iters=2, batch_size=4, report_every=1),
          run, PAD, lora_info=info, callback=reports)  # fmt: skip
    seen = reports.records
    warned = [r["expert_warning"] for r in seen if "expert_warning" in r]
    assert len(warned) == 1  # once per layer, not every report
    assert "experts 0, 1 took 100%" in warned[0] and "balanced: 50%" in warned[0]
    assert seen[0]["expert_top_share"] == 1.0


def router_grads(aux):
    model = build_moe("mixtral")
    apply_lora(
        model, LoraConfig(rank=RANK, alpha=2 * RANK, targets="experts", router=True, dropout=0.0)
    )
    for _, m in model.named_modules():
        if hasattr(m, "lora_b"):
            m.lora_b = mx.random.normal(m.lora_b.shape) * 0.3
    from macft.train.expert_load import ExpertTracker

    batch = make_batch(counting_examples(4, seed=6), PAD)
    with ExpertTracker(model, PAD, aux) as tracker:
        loss, grads = nn.value_and_grad(model, tracker.loss(batch_loss))(model, batch)
    grads = dict(tree_flatten(grads))
    return loss.item(), {k: np.array(v) for k, v in grads.items() if ".gate." in k}


def test_aux_loss_changes_router_gradients_not_the_reported_loss():
    loss0, g0 = router_grads(0.0)
    loss1, g1 = router_grads(0.5)
    assert loss1 == pytest.approx(loss0, rel=1e-6)  # the reported loss stays cross-entropy
    assert g0.keys() == g1.keys() and g0
    assert any(not np.allclose(g0[k], g1[k], atol=1e-6) for k in g0)


def test_aux_loss_needs_a_trained_router():
    from macft.errors import MacftError
    from macft.train.expert_load import ExpertTracker

    model = build_moe("qwen3_moe")
    apply_lora(model, LoraConfig(rank=RANK, alpha=2 * RANK, targets="experts", dropout=0.0))
    with pytest.raises(MacftError, match="lora.router: true"):
        ExpertTracker(model, PAD, 0.01)


def test_shared_expert_preset_trains_only_the_shared_expert():
    from mlx_lm.models import qwen2_moe

    cfg = {**MOE_COMMON, "model_type": "qwen2_moe", "intermediate_size": 128, "moe_intermediate_size": FF,
           "shared_expert_intermediate_size": 48, "num_experts": E, "num_experts_per_tok": K}  # fmt: skip
    mx.random.seed(0)
    model = qwen2_moe.Model(qwen2_moe.ModelArgs.from_dict(cfg))
    apply_lora(model, LoraConfig(rank=RANK, alpha=2 * RANK, targets="shared-expert", dropout=0.0))
    trainable = dict(tree_flatten(model.trainable_parameters()))
    assert all(".shared_expert." in k for k in trainable)
    assert sum(v.size for v in trainable.values()) == 2 * (
        2 * lora_count(H, 48) + lora_count(48, H)
    )


def test_shared_expert_preset_on_a_model_without_one_is_refused():
    from macft.errors import MacftError

    with pytest.raises(MacftError, match="shared"):
        apply_lora(
            build_moe("qwen3_moe"),
            LoraConfig(rank=RANK, alpha=2 * RANK, targets="shared-expert", dropout=0.0),
        )


def test_plan_keeps_every_expert_resident():
    from dataclasses import replace

    from macft.models import catalog
    from macft.train import memory as mp

    shape = catalog.CATALOG["qwen3-30b-a3b"].shape
    weights = mp.plan(shape, mp.Setup()).parts["weights"]
    assert 15e9 < weights < 19e9  # 30.5B parameters at ~4.5 bits: all 128 experts
    active_only = mp.plan(replace(shape, experts=shape.active), mp.Setup()).parts["weights"]
    assert weights > 5 * active_only
