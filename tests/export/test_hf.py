"""Exports checked by the programs that consume them: `macft fuse --hf` loaded by transformers,
`--peft` by transformers + peft on the float base; logits against macft's own fused MLX export."""

import json

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import (
    CHATML,
    MOE_CONFIGS,
    TINY_CONFIG,
    build_moe,
    build_tiny_hf_tokenizer,
    build_tiny_model,
    save_tiny_model_dir,
    train_for_fuse,
    write_chat,
    write_gguf,
)
from mlx.utils import tree_flatten
from mlx_lm.tokenizer_utils import TokenizerWrapper
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from macft.cli import cli
from macft.config.schema import LoraConfig
from macft.errors import ExportError
from macft.export.hf_folder import check_hf, write_hf_folder
from macft.lora.apply import apply_lora, lora_layers
from macft.models import Base, mlx_lm_compat
from macft.runs.model import load_run_model

X = [[5, 17, 42, 99, 3, 250, 7, 64, 11, 130, 21, 8]]
# float32 on both sides: only the order of summation differs (measured: ~1e-6 on logits ~3)
F32_TOL = 1e-4
ADAPTED = 1e-3  # the adapters must move the logits by more than this, or nothing is tested
TEXT = "show bgp summary in junos? <|im_start|>héllo"
GENERATION = {"temperature": 0.3, "eos_token_id": 0}

QA = [
    ("show bgp summary in junos?", "show bgp summary"),
    ("list interfaces on cisco ios?", "show ip interface brief"),
]


def fuse(*args):
    return CliRunner().invoke(cli, ["fuse", *map(str, args)])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A float32 HF folder, a GGUF of another tiny llama, and LoRA/DoRA runs trained on them."""
    root = tmp_path_factory.mktemp("hf")
    model_dir = save_tiny_model_dir(root / "tiny")
    # its sampling defaults and a second end token, which the HF export keeps
    (model_dir / "generation_config.json").write_text(json.dumps(GENERATION))
    gguf = write_gguf(root / "tiny.gguf", build_tiny_model(seed=3), TINY_CONFIG)
    data = write_chat(root / "net.jsonl", 16, QA)
    return {
        "base": model_dir,
        "lora": train_for_fuse(model_dir, data, root / "lora"),
        "dora": train_for_fuse(model_dir, data, root / "dora", "lora.dora=true"),
        "gguf": train_for_fuse(gguf, data, root / "gguf"),
    }


def torch_logits(model, ids=X) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


def mlx_logits(model, ids=X) -> np.ndarray:
    return np.array(model(mx.array(ids)).astype(mx.float32))


def mlx_export(run, out):
    """macft's own fused float32 MLX export of the run, loaded: the reference. Not checked:
    fuse's check is the tests' subject only where they say so."""
    result = fuse(run, "--dtype", "f32", "--out", out, "--no-check")
    assert result.exit_code == 0, result.output
    return mlx_lm.load(str(out / "mlx"))


def max_diff(a, b) -> float:
    return float(np.abs(a - b).max())


# --- --hf: the fused model in transformers ----------------------------------------------


@pytest.mark.parametrize("kind", ["lora", "dora", "gguf"])
def test_hf_folder_gives_the_fused_logits_in_transformers(runs, kind, tmp_path):
    expected = mlx_logits(mlx_export(runs[kind], tmp_path / "mlx")[0])
    out = tmp_path / "export"
    result = fuse(runs[kind], "--hf", "--dtype", "f32", "--out", out)
    assert result.exit_code == 0, result.output
    folder = out / "hf"
    assert "Hugging Face f32 (llama)" in result.output
    hint = f"transformers: AutoModelForCausalLM.from_pretrained({str(folder)!r})"
    assert hint in result.output.strip().splitlines()
    assert "fidelity: hf: " in result.output  # and the check read it back with mlx_lm
    assert not (out / "mlx").exists()  # the HF folder replaces the MLX one

    model = AutoModelForCausalLM.from_pretrained(str(folder))
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    got = torch_logits(model)
    print(f"{kind}: transformers vs MLX max |logit diff| {max_diff(got, expected):.2e}")
    assert max_diff(got, expected) < F32_TOL
    if kind != "gguf":  # the adapters matter: the float base alone gives other logits
        base = torch_logits(AutoModelForCausalLM.from_pretrained(str(runs["base"])))
        assert max_diff(base, expected) > ADAPTED

    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["dtype"] == config["torch_dtype"] == "float32"
    assert "quantization" not in config and "quantization_config" not in config
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == model.generation_config.eos_token_id
    if kind == "gguf":
        assert generation == {"bos_token_id": 0, "eos_token_id": 2}  # the GGUF's ids
    else:  # the HF base's sampling defaults, and both end tokens
        assert generation["temperature"] == 0.3 and generation["eos_token_id"] == [0, 2]


def test_hf_folder_default_dtype_and_tokenizer(runs, tmp_path):
    """The MLX export's default dtype (f16 for a float32 source); the run's tokenizer: same
    ids, specials and chat template."""
    out = tmp_path / "export"
    result = fuse(runs["gguf"], "--hf", "--out", out)
    assert result.exit_code == 0, result.output
    folder = out / "hf"
    model = AutoModelForCausalLM.from_pretrained(str(folder))
    assert model.dtype == torch.float16
    assert json.loads((folder / "config.json").read_text())["dtype"] == "float16"

    theirs = AutoTokenizer.from_pretrained(str(folder))
    ours = mlx_lm_compat.load_folder_tokenizer(folder)  # what mlx-lm reads from the same files
    run_tok = load_run_model(str(runs["gguf"])).tokenizer  # built from the GGUF's metadata
    assert theirs.chat_template == CHATML
    assert theirs.encode(TEXT) == run_tok.encode(TEXT) == ours.encode(TEXT)
    assert theirs.convert_ids_to_tokens(2) == "<|im_end|>" and theirs.eos_token_id == 2
    msgs = [{"role": "user", "content": QA[0][0]}]
    want = run_tok.apply_chat_template(msgs, add_generation_prompt=True)
    got = theirs.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    assert list(getattr(got, "input_ids", got)) == list(want)


def randomize(model, seed=1):
    """Non-zero adapters and norms away from their init (Gemma's 1 + w must survive the trip)."""
    mx.random.seed(seed)
    for _, m in lora_layers(model):
        m.lora_b = 0.05 * mx.random.normal(m.lora_b.shape)
    norms = [(k, v) for k, v in tree_flatten(model.parameters()) if k.endswith("norm.weight")]
    model.load_weights([(k, v + 0.2 * mx.random.normal(v.shape)) for k, v in norms], strict=False)
    mx.eval(model.parameters())


DENSE = {k: v for k, v in TINY_CONFIG.items() if k != "model_type"}
ARCHS = {
    "mistral": {**DENSE, "model_type": "mistral"},
    "qwen2": {**DENSE, "model_type": "qwen2", "tie_word_embeddings": True},  # q/k/v biases
    "qwen3": {**DENSE, "model_type": "qwen3", "head_dim": 16},  # q/k norms
    "phi3": {**DENSE, "model_type": "phi3"},  # fused qkv and gate_up
    "gemma3_text": {**DENSE, "model_type": "gemma3_text", "head_dim": 16,
                    "query_pre_attn_scalar": 16, "sliding_window": 4,
                    "sliding_window_pattern": 2, "tie_word_embeddings": True},
    "gemma2": {**DENSE, "model_type": "gemma2", "head_dim": 16, "query_pre_attn_scalar": 16,
               "tie_word_embeddings": True},  # soft-capped logits
    "qwen2_moe": {**DENSE, "model_type": "qwen2_moe", "num_experts": 4, "num_experts_per_tok": 2,
                  "moe_intermediate_size": 32, "shared_expert_intermediate_size": 64,
                  "decoder_sparse_step": 1, "mlp_only_layers": []},  # a shared expert too
}  # fmt: skip


def build(kind):
    if kind in MOE_CONFIGS:
        return build_moe(kind), MOE_CONFIGS[kind][1]
    mx.random.seed(0)
    model = mlx_lm_compat.build_model(ARCHS[kind])
    if ARCHS[kind]["tie_word_embeddings"] and "lm_head" in model:
        model.sanitize({})  # gemma3_text drops its head only when the weights have none
    return model, ARCHS[kind]


@pytest.mark.parametrize("kind", [*ARCHS, *MOE_CONFIGS])
def test_each_architecture_reads_back_in_transformers(kind, tmp_path):
    """mlx-lm's names and layouts are HF's, but for the experts it stacks (MoE): split back."""
    model, config = build(kind)
    apply_lora(model, LoraConfig(rank=4, alpha=8, dropout=0.0))
    randomize(model)
    ids = [list(range(3, 23))]  # longer than gemma's sliding window
    expected = mlx_logits(model, ids)
    tokenizer = TokenizerWrapper(build_tiny_hf_tokenizer())
    write_hf_folder(tmp_path, Base(model, tokenizer, config, {}), "f32")
    got = torch_logits(AutoModelForCausalLM.from_pretrained(str(tmp_path)), ids)
    assert max_diff(got, expected) < F32_TOL, kind


def test_hf_refuses_what_transformers_would_not_read_back():
    for config, needle in [
        ({"model_type": "gemma3", "text_config": {}}, "multimodal"),
        ({"model_type": "starcoder2"}, "does not support model_type 'starcoder2'"),
    ]:
        with pytest.raises(ExportError, match=needle) as e:
            check_hf(config)
        assert "\n" not in str(e.value) and "--peft" in str(e.value)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--hf", "--quantize", "4"], "--hf writes float weights"),
        (["--hf", "--gguf"], "--hf and --gguf"),
        (["--hf", "--gguf", "--quant", "q8_0"], "--hf and --gguf"),
        (["--hf", "--adapter-only", "--peft"], "for the adapters alone use --peft"),
    ],
)
def test_hf_with_options_it_cannot_take_is_one_line(runs, args, needle, tmp_path):
    out = tmp_path / "export"
    result = fuse(runs["lora"], *args, "--out", out)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert result.output.strip().splitlines() == [f"Error: {result.output.strip()[7:]}"]
    assert needle in result.output and not out.exists()


# --- --peft: the adapters in transformers + peft, on the float base -----------------------


def dora_rescale(model) -> float:
    """The most DoRA rescales a row of a merged weight: max |m / ||W + s B A|| - 1|."""
    worst = 0.0
    for module in model.modules():
        if not getattr(module, "lora_magnitude_vector", None):
            continue
        a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
        merged = module.base_layer.weight + module.scaling["default"] * b @ a
        m = module.lora_magnitude_vector["default"].weight
        worst = max(worst, (m / merged.norm(dim=1) - 1).abs().max().item())
    return worst


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_peft_folder_on_the_float_base_gives_the_fused_logits(runs, kind, tmp_path):
    """PEFT's LoRA (DoRA: use_dora) over the HF float base computes macft's fused model."""
    expected = mlx_logits(mlx_export(runs[kind], tmp_path / "mlx")[0])
    out = tmp_path / "export"
    result = fuse(runs[kind], "--peft", "--out", out)
    assert result.exit_code == 0, result.output
    base = AutoModelForCausalLM.from_pretrained(str(runs["base"]))
    assert max_diff(torch_logits(base), expected) > ADAPTED
    model = PeftModel.from_pretrained(base, str(out / "peft")).eval()
    assert model.peft_config["default"].use_dora == (kind == "dora")
    if kind == "dora":  # the magnitudes are not the merged rows' norms: DoRA is tested, not LoRA
        assert dora_rescale(model) > ADAPTED
    got = torch_logits(model)
    print(f"PEFT {kind}: max |logit diff| vs macft's fused model {max_diff(got, expected):.2e}")
    assert max_diff(got, expected) < F32_TOL


# --- the real SmolLM2-135M GGUF -----------------------------------------------------------


@pytest.mark.real
@pytest.mark.path("cpu")  # float32 on the CPU's path; the Mac's path adds nothing here
def test_real_gguf_run_as_hf_folder_gives_mlx_logits(smollm2_gguf, tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"prompt": q, "completion": a}) + "\n" for q, a in QA))
    sets = ["model.compute=float32", "train.iters=2", "train.batch_size=2", "lora.layers=4",
            "data.valid_fraction=0.0", "train.learning_rate=2.0e-3"]  # fmt: skip
    run = train_for_fuse(smollm2_gguf, data, tmp_path / "net", *sets)
    mlx_model, tokenizer = mlx_export(run, tmp_path / "mlx")
    msgs = [{"role": "user", "content": QA[0][0]}]
    ids = [tokenizer.apply_chat_template(msgs, add_generation_prompt=True)]
    expected = mlx_logits(mlx_model, ids)

    result = fuse(run, "--hf", "--dtype", "f32", "--no-check")  # transformers checks it here
    assert result.exit_code == 0, result.output
    folder = run / "export" / "hf"
    theirs = AutoTokenizer.from_pretrained(str(folder))
    got_ids = theirs.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    assert list(getattr(got_ids, "input_ids", got_ids)) == ids[0]
    got = torch_logits(AutoModelForCausalLM.from_pretrained(str(folder)), ids)
    diff = max_diff(got, expected)
    print(f"SmolLM2-135M: transformers vs MLX max |logit diff| {diff:.2e}")
    # float32 through 30 layers: summation order moves the last digits (measured: 1e-4)
    assert diff < 1e-3
    assert (got.argmax(-1) == expected.argmax(-1)).all()
