"""LoRA / DoRA layers: wrapping, target and layer selection, counts, and mlx-lm compatibility."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from helpers import build_tiny_model, save_tiny_model_dir
from mlx.utils import tree_flatten

from macft.config.schema import LoraConfig
from macft.errors import RecipeError
from macft.lora.apply import adapter_weights, apply_lora
from macft.lora.layers import LoRALinear
from macft.models.quant import parameter_count
from macft.runs.folder import RunDir

ATTN = ["self_attn.k_proj", "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj"]
MLP = ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj"]
TOKENS = mx.array([[5, 17, 99, 3, 250, 42, 8, 8, 120]])


def quantized_tiny():
    model = build_tiny_model()
    nn.quantize(model, group_size=32, bits=4)
    return model


def lora_layers(model):
    return {k: m for k, m in model.named_modules() if isinstance(m, LoRALinear)}


def perturb(model, seed=1):
    """Non-zero lora_b (and m) so the adapters change the output."""
    rng = np.random.default_rng(seed)
    for layer in lora_layers(model).values():
        layer.lora_b = mx.array(rng.normal(0, 0.2, layer.lora_b.shape).astype(np.float32))
        if layer.dora:
            layer.m = layer.m * mx.array(rng.uniform(0.8, 1.2, layer.m.shape).astype(np.float32))


@pytest.mark.parametrize("quantized", [False, True])
def test_wraps_float_and_quantized_linears(quantized):
    model = quantized_tiny() if quantized else build_tiny_model()
    apply_lora(model, LoraConfig(rank=4, alpha=8, dropout=0.0))
    q = model.layers[0].self_attn.q_proj
    assert isinstance(q, LoRALinear)
    assert isinstance(q.linear, nn.QuantizedLinear if quantized else nn.Linear)
    assert q.lora_a.shape == (64, 4) and q.lora_b.shape == (4, 64)
    assert q.scale == 2.0
    up = model.layers[1].mlp.up_proj
    assert up.lora_a.shape == (64, 4) and up.lora_b.shape == (4, 128)
    # Only adapter tensors train; names are mlx-lm's.
    names = [k for k, _ in tree_flatten(model.trainable_parameters())]
    assert names and all(k.rsplit(".", 1)[-1] in ("lora_a", "lora_b") for k in names)
    assert "model.layers.0.self_attn.q_proj.lora_a" in names


def test_target_presets():
    assert apply_lora(build_tiny_model(), LoraConfig(targets="attention", dropout=0.0)).keys == ATTN
    assert apply_lora(build_tiny_model(), LoraConfig(targets="mlp", dropout=0.0)).keys == MLP
    assert apply_lora(
        build_tiny_model(), LoraConfig(targets="all-linear", dropout=0.0)
    ).keys == sorted(ATTN + MLP)
    model = build_tiny_model()
    apply_lora(model, LoraConfig(targets="mlp", dropout=0.0))
    assert not isinstance(model.layers[0].self_attn.q_proj, LoRALinear)
    assert isinstance(model.layers[0].mlp.gate_proj, LoRALinear)


def test_explicit_targets_by_leaf_or_suffix():
    info = apply_lora(
        build_tiny_model(), LoraConfig(targets=["q_proj", "self_attn.v_proj"], dropout=0.0)
    )
    assert info.keys == ["self_attn.q_proj", "self_attn.v_proj"]
    assert apply_lora(
        build_tiny_model(), LoraConfig(targets="q_proj, down_proj", dropout=0.0)
    ).keys == [
        "mlp.down_proj",
        "self_attn.q_proj",
    ]


def test_unknown_target_lists_valid_names():
    with pytest.raises(RecipeError) as e:
        apply_lora(build_tiny_model(), LoraConfig(targets=["q_proj", "qkv_proj"], dropout=0.0))
    msg = str(e.value)
    assert "qkv_proj" in msg
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert name in msg


def test_last_n_layers():
    model = build_tiny_model(num_hidden_layers=3)
    info = apply_lora(model, LoraConfig(layers=2, dropout=0.0))
    assert info.num_layers == 2
    assert not lora_layers(model.layers[0])
    assert len(lora_layers(model.layers[1])) == len(lora_layers(model.layers[2])) == 7
    with pytest.raises(RecipeError, match="1 to 3"):
        apply_lora(build_tiny_model(num_hidden_layers=3), LoraConfig(layers=4, dropout=0.0))


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("quantized", [False, True])
def test_trainable_count(dora, quantized):
    model = quantized_tiny() if quantized else build_tiny_model()
    base_total = parameter_count(model)
    info = apply_lora(model, LoraConfig(rank=8, dora=dora, dropout=0.0))
    dims = {"q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (64, 64)}
    dims |= {"gate_proj": (64, 128), "up_proj": (64, 128), "down_proj": (128, 64)}
    per_layer = sum(8 * (i + o) + (o if dora else 0) for i, o in dims.values())
    assert info.trainable == 2 * per_layer
    assert info.total == base_total + info.trainable


def test_quantized_weights_counted_by_logical_size():
    assert parameter_count(quantized_tiny()) == parameter_count(build_tiny_model())


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("quantized", [False, True])
def test_output_equals_base_at_init(dora, quantized):
    model = quantized_tiny() if quantized else build_tiny_model()
    before = model(TOKENS)
    apply_lora(model, LoraConfig(rank=4, dropout=0.3, dora=dora))
    model.eval()
    assert mx.allclose(model(TOKENS), before, atol=1e-5)
    perturb(model)
    assert not mx.allclose(model(TOKENS), before, atol=1e-3)  # the adapters do act


def test_dora_magnitude_is_row_norm():
    model = build_tiny_model()
    w = model.layers[0].self_attn.q_proj.weight
    apply_lora(model, LoraConfig(dora=True, dropout=0.0))
    m = model.layers[0].self_attn.q_proj.m
    assert m.shape == (64,)
    assert mx.allclose(m, mx.linalg.norm(w, axis=1), atol=1e-6)


@pytest.mark.parametrize(
    "dora, targets, layers", [(False, "all-linear", "all"), (True, ["q_proj", "down_proj"], 1)]
)
def test_saved_adapters_load_in_mlx_lm(tmp_path, dora, targets, layers):
    from mlx_lm import load

    base = save_tiny_model_dir(tmp_path / "base")
    model, _ = load(str(base))
    info = apply_lora(
        model, LoraConfig(rank=4, alpha=8, dropout=0.1, targets=targets, layers=layers, dora=dora)
    )
    perturb(model)
    model.eval()
    ours = model(TOKENS)
    run = RunDir(tmp_path / "run")
    run.create({"lora": {"rank": 4}})
    run.write_adapters(adapter_weights(model), info.adapter_config())

    theirs_model, _ = load(str(base), adapter_path=str(run.path))
    theirs = theirs_model(TOKENS)
    assert mx.allclose(ours, theirs, atol=1e-4), mx.abs(ours - theirs).max()
    plain, _ = load(str(base))
    assert not mx.allclose(plain(TOKENS), theirs, atol=1e-3)  # mlx-lm did apply them


def test_applying_twice_is_refused():
    from macft.errors import ModelError

    model = build_tiny_model()
    apply_lora(model)
    with pytest.raises(ModelError, match="already"):
        apply_lora(model)


def test_adapter_config_format():
    info = apply_lora(
        build_tiny_model(), LoraConfig(rank=8, alpha=32, dropout=0.05, targets="attention")
    )
    cfg = info.adapter_config()
    assert cfg == {
        "fine_tune_type": "lora",
        "num_layers": 2,
        "lora_parameters": {"rank": 8, "scale": 4.0, "dropout": 0.05, "keys": ATTN},
    }
