"""The memory plan against the real trainer's measured peak, the shipped recipes, and the CLI."""

import gc
import json
from dataclasses import replace

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from helpers import save_tiny_model_dir, train_config
from mlx_lm.models import llama

from macft import device
from macft.cli import cli
from macft.config.recipes import load_recipe, shipped_recipes
from macft.config.schema import LoraConfig, TrainConfig, resolve_loss_chunk
from macft.cpu import streams
from macft.data.batches import width_bucket
from macft.data.encode import Example
from macft.lora.apply import apply_lora
from macft.models import catalog, quant
from macft.models.shape import Shape
from macft.runs.folder import RunDir
from macft.train import memory as mp
from macft.train import plan as planning
from macft.train.lean_ops import lean_ops
from macft.train.loop import train


def llama_config(hidden, layers, inter, heads, kv, vocab, tied=False):
    return {
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": inter,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "rms_norm_eps": 1e-5,
        "vocab_size": vocab,
        "rope_theta": 10000.0,
        "tie_word_embeddings": tied,
        "max_position_embeddings": 4096,
    }


SMOLLM2 = llama_config(576, 30, 1536, 9, 3, 49152, tied=True)  # SmolLM2-135M's real shape
SHAPES = {
    # name: (config, batch, tokens per row, rank, checkpointing, extra TrainConfig fields)
    "h64-b4-t128": (llama_config(64, 2, 128, 4, 2, 259), 4, 128, 8, False, {}),
    "h64-b4-t128-ckpt": (llama_config(64, 2, 128, 4, 2, 259), 4, 128, 8, True, {}),
    "h256-b2-t256": (llama_config(256, 4, 512, 8, 2, 1000), 2, 256, 8, False, {}),
    "h256-b2-t256-ckpt-full-logits": (
        llama_config(256, 4, 512, 8, 2, 1000), 2, 256, 8, True, {"loss_chunk": 0, "pack": False}
    ),
    "h128-b1-t512-r32": (llama_config(128, 3, 384, 4, 4, 2000), 1, 512, 32, False, {}),
    "smollm2-b1-t64-ckpt": (SMOLLM2, 1, 64, 8, True, {}),
    "smollm2-b2-t64": (SMOLLM2, 2, 64, 8, False, {}),
    "smollm2-b4-t224": (SMOLLM2, 4, 224, 8, False, {}),  # the benchmark's job
}  # fmt: skip


def measure(config, batch, width, rank, ckpt, extra, tmp_path, monkeypatch, mac=False):
    """Peak memory of 2 real training steps on a random model (no weights needed), and the plan.

    The CPU's path trains a float32 model; the Mac's (MACFT_MAC_PATH=1) a 4-bit one with
    bfloat16 scales, norms and activations, as load_base leaves a base there.
    One stream: split over CPU streams, a batch needs MLX's breadth-first order, set only
    before a process's first evaluation (`macft train` does it; its peak there was 1.01x).
    """
    monkeypatch.setenv(streams.NO_CPU_STREAMS_ENV, "1")
    gc.collect()
    before = mx.get_active_memory()
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    if mac:
        nn.quantize(model, group_size=64, bits=4)
        quant.cast_floats(model, mx.bfloat16, lambda name: True)
    mx.eval(model.parameters())
    apply_lora(model, LoraConfig(rank, 2 * rank, 0.0, "all-linear", "all", False))
    rng = np.random.default_rng(0)
    # width + 1 ids -> width inputs: rows of exactly `width` tokens, no padding.
    ids = [
        rng.integers(3, config["vocab_size"], width + 1).astype(np.int32) for _ in range(4 * batch)
    ]
    data = [Example(i, np.ones(width + 1, bool)) for i in ids]
    fields = {k: v for k, v in extra.items() if k in TrainConfig.__dataclass_fields__}
    cfg = train_config(iters=2, batch_size=batch, grad_checkpoint=ckpt, eval_every=0, save_every=0,
                      warmup=0, **fields)  # fmt: skip
    run = RunDir(tmp_path / "run")
    run.create({"model": {"path": "random"}})
    mx.clear_cache()
    train(model, data, [], cfg, run, pad_id=0)
    # Arrays an earlier test left alive (a traceback can hold a model) are not this run's.
    measured = mx.get_peak_memory() - before
    compute, (act, scale) = ("quantized", (2, 2)) if mac else ("float32", (4, 4))
    setup = mp.Setup(batch_size=batch, seq_len=width, rank=rank, grad_checkpoint=ckpt,
                     grad_accumulation=1, compute=compute, act_bytes=act, scale_bytes=scale,
                     bits=4, group_size=64, loss_chunk=resolve_loss_chunk(cfg.loss_chunk, mac),
                     dropout=0.0, lean=lean_ops(mac, ckpt), compiled=cfg.compile)  # fmt: skip
    return measured, mp.plan(Shape.from_config(config), setup)


@pytest.mark.path("cpu")
@pytest.mark.parametrize("name", SHAPES)
def test_plan_predicts_measured_peak(name, tmp_path, monkeypatch):
    measured, plan = measure(*SHAPES[name], tmp_path, monkeypatch)
    ratio = plan.mlx_peak / measured
    print(f"{name}: predicted {plan.mlx_peak / 1e6:.1f} MB, measured {measured / 1e6:.1f} MB")
    assert 0.85 <= ratio <= 1.15, f"{name}: predicted/measured = {ratio:.3f}"


# The Mac's path on this CPU: MLX's quantized matmuls in bfloat16 run at ~0.4 GFLOP/s here, so
# only the small shapes. The plan may over-predict a real Mac, whose fused norm keeps less.
MAC_SHAPES = ["h64-b4-t128", "h64-b4-t128-ckpt", "h256-b2-t256", "h128-b1-t512-r32"]


@pytest.mark.path("mac")
@pytest.mark.parametrize("name", MAC_SHAPES)
def test_plan_predicts_measured_peak_on_the_mac_path(name, tmp_path, monkeypatch):
    measured, plan = measure(*SHAPES[name], tmp_path, monkeypatch, mac=True)
    ratio = plan.mlx_peak / measured
    print(f"{name}: predicted {plan.mlx_peak / 1e6:.1f} MB, measured {measured / 1e6:.1f} MB")
    # within 15%, or (the 64-wide toys) within 3 MB: the quantized path has a few MB of fixed
    # costs a plan for real models need not count
    assert 0.85 <= ratio <= 1.15 or abs(plan.mlx_peak - measured) < 3e6, f"{name}: {ratio:.3f}"


def test_plan_parts_respond_to_the_recipe():
    shape = catalog.CATALOG["llama-3.1-8b"].shape
    # one row of 2048 with checkpointing: full logits, eager, no dropout
    base = mp.Setup(batch_size=1, seq_len=2048, grad_checkpoint=True, loss_chunk=0,
                    compiled=False, dropout=0.0)  # fmt: skip
    p = mp.plan(shape, base)
    assert 4.0e9 < p.parts["weights"] < 5.0e9  # 8B at 4 bits with bf16 scales and biases
    assert p.total < 16e9  # an 8B QLoRA at 2048 tokens plans under 16 GB
    no_ckpt = mp.plan(shape, replace(base, grad_checkpoint=False))
    assert no_ckpt.parts["activations"] > 5 * p.parts["activations"]
    chunked = mp.plan(shape, replace(base, loss_chunk=64))
    assert chunked.parts["logits"] < p.parts["logits"] / 4
    fewer = mp.plan(shape, replace(base, lora_layers=8))
    assert fewer.parts["lora"] < p.parts["lora"]


@pytest.mark.parametrize("name", [n for n in shipped_recipes() if n.endswith("gb")])
def test_shipped_recipe_validates_and_fits(name):
    recipe, _ = load_recipe(name)
    entry = catalog.lookup(recipe["model"]["path"])
    tier = int(name.rsplit("-", 1)[1].removesuffix("gb"))
    assert entry is not None and name == catalog.recipe_name(entry.alias, tier)
    lo, t = recipe["lora"], recipe["train"]
    # A mixture of experts trains its attention only: adapters on every expert do not fit.
    targets = "attention" if entry.shape.experts else "all-linear"
    assert (lo["rank"], lo["alpha"], lo["targets"]) == (16, 32, targets)
    assert t["learning_rate"] == 2e-4 and t["schedule"] == "cosine"
    assert 16 <= t["batch_size"] * t["grad_accumulation"] <= 32
    seq = width_bucket(recipe["data"]["max_seq_length"] - 1)  # data that fills every row
    plan = planning.make_plan(recipe, entry.shape, seq, mp.usable_for(tier * 1e9), True)
    assert plan.fits, f"{name}: {mp.gb(plan.total)} > {mp.gb(plan.usable)}"
    assert (shipped_recipes()[name].read_text().splitlines()[0]).startswith(f"# {entry.alias}")


def test_every_catalog_model_has_a_recipe_where_its_weights_fit():
    names = set(shipped_recipes())
    for alias, entry in catalog.CATALOG.items():
        for tier in (24, 32):
            weights = mp.plan(entry.shape, mp.Setup()).parts["weights"]
            fits = weights < mp.usable_for(tier * 1e9)
            assert (catalog.recipe_name(alias, tier) in names) == fits, (alias, tier, weights)


def test_default_recipe_follows_usable_memory(monkeypatch):
    monkeypatch.setattr(device, "usable_memory_bytes", lambda: int(16e9))
    assert planning.default_recipe("llama-3.1-8b") == "llama-3.1-8b-24gb"
    monkeypatch.setattr(device, "usable_memory_bytes", lambda: int(21.3e9))
    assert planning.default_recipe("qwen3-8b") == "qwen3-8b-32gb"
    assert planning.default_recipe("path/to/folder") is None


def write_data(path, n=20, words=400):
    with path.open("w") as f:
        for i in range(n):
            msgs = [
                {"role": "user", "content": "show bgp summary " * (words if i == 3 else 5)},
                {"role": "assistant", "content": "show bgp summary"},
            ]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return path


def test_plan_command_catalog_model_without_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = write_data(tmp_path / "d.jsonl")
    args = ["plan", "--model", "llama-3.1-8b", "--data", str(data), "--memory", "24GB"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert "estimated at 3.5 characters a token" in r.output and "fits" in r.output
    assert "16.0 GB" in r.output  # a 24 GB Mac's working set

    # Batch 8 without checkpointing at 2048 tokens does not fit; --fit says what does.
    too_big = ["--set", "train.batch_size=8", "--set", "train.grad_checkpoint=false",
               "--set", "data.max_seq_length=2048"]  # fmt: skip
    long_data = write_data(tmp_path / "long.jsonl", words=2000)
    args = ["plan", "--model", "llama-3.1-8b", "--data", str(long_data), "--memory", "24GB"]
    r = CliRunner().invoke(cli, [*args, *too_big, "--fit"])
    assert r.exit_code == 0, r.output
    assert "does not fit" in r.output
    assert "--set train.batch_size=1 --set train.grad_accumulation=64" in r.output
    fitted = yaml.safe_load(r.output.split("adjusted recipe:\n", 1)[1])
    assert fitted["train"]["batch_size"] == 1 and fitted["train"]["grad_accumulation"] == 64


def test_plan_command_local_model_tokenizes(tmp_path):
    folder = save_tiny_model_dir(tmp_path / "tiny")
    data = write_data(tmp_path / "d.jsonl")
    r = CliRunner().invoke(cli, ["plan", "--model", str(folder), "--data", str(data)])
    assert r.exit_code == 0, r.output
    assert "tokens, tokenized" in r.output and "weights" in r.output and "activations" in r.output


def test_models_and_recipes_commands():
    r = CliRunner().invoke(cli, ["models"])
    assert r.exit_code == 0
    for alias in ("llama-3.1-8b", "qwen3-8b", "gemma-3-4b", "phi-3.5-mini", "smollm2-135m"):
        assert alias in r.output
    r = CliRunner().invoke(cli, ["recipes"])
    assert r.exit_code == 0 and "mistral-7b-24gb" in r.output and "24 GB" in r.output
    r = CliRunner().invoke(cli, ["recipes", "show", "qwen3-8b-32gb"])
    assert r.exit_code == 0 and r.output.startswith("# qwen3-8b") and "path: qwen3-8b" in r.output
    r = CliRunner().invoke(cli, ["recipes", "show", "nope"])
    assert r.exit_code == 1 and "Error: no recipe file nope" in r.output
