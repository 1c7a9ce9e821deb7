"""macft fuse: merged weights equal base + adapters, MLX/PEFT/Modelfile outputs, atomic errors."""

import errno
import json
import os
import re
import shlex
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from helpers import (
    CHATML,
    TINY_CONFIG,
    build_tiny_hf_tokenizer,
    build_tiny_model,
    save_tiny_model_dir,
    train_for_fuse,
    write_chat,
)
from mlx.utils import tree_flatten
from mlx_lm.tokenizer_utils import TokenizerWrapper

from macft.cli import cli
from macft.config.schema import LoraConfig
from macft.export import ollama, staging
from macft.export.merge import fused_model
from macft.lora.apply import apply_lora, lora_layers
from macft.lora.layers import LoRALinear
from macft.models import quant
from macft.runs.model import load_run_model

QA = [
    ("show bgp summary in junos?", "show bgp summary"),
    ("list interfaces on cisco ios?", "show ip interface brief"),
]
X = mx.array([[5, 17, 42, 99, 3, 250, 7, 64]])
F32_TOL = 1e-4  # float32 everywhere: only summation order differs


def randomize(model, dora: bool, seed: int = 1):
    """Non-zero adapters (training starts at B = 0, which would make every test trivial)."""
    mx.random.seed(seed)
    for _, m in lora_layers(model):
        m.lora_b = 0.05 * mx.random.normal(m.lora_b.shape)
        if dora:
            m.m = m.m * (1 + 0.3 * mx.random.uniform(shape=m.m.shape))
    mx.eval(model.parameters())


def max_diff(a, b) -> float:
    return mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max().item()


# --- the merge itself ------------------------------------------------------------------


@pytest.mark.parametrize("dora", [False, True])
def test_fused_float_model_gives_the_adapted_logits(dora):
    model = build_tiny_model()
    apply_lora(model, LoraConfig(rank=4, alpha=8, dora=dora, dropout=0.0))
    randomize(model, dora)
    expected = model(X)
    assert max_diff(expected, build_tiny_model()(X)) > 0.05  # the adapters do change the output
    fused = fused_model(model, TINY_CONFIG, mx.float32)
    assert not any("lora" in k or k.endswith(".m") for k, _ in tree_flatten(fused.parameters()))
    assert max_diff(fused(X), expected) < F32_TOL


@pytest.mark.parametrize("dora", [False, True])
def test_fused_4bit_base_equals_dequantized_base_plus_adapters(dora):
    """4-bit base + adapters == the fused float model (float32 fuse; 1e-4 on logits).

    The LoRA forward uses the quantized matmul, the fused model a float matmul of the
    dequantized weights plus the merged update: the same numbers up to float32 rounding.
    """
    model = build_tiny_model()
    nn.quantize(model, group_size=64, bits=4)
    apply_lora(model, LoraConfig(rank=4, alpha=8, dora=dora, dropout=0.0))
    randomize(model, dora)
    expected = model(X)
    lora = model.layers[0].self_attn.o_proj
    q = lora.linear
    w = np.array(mx.dequantize(q.weight, q.scales, q.biases, q.group_size, q.bits))
    by_hand = w + lora.scale * np.array(lora.lora_b).T @ np.array(lora.lora_a).T
    if dora:
        by_hand = (np.array(lora.m) / np.linalg.norm(by_hand, axis=1))[:, None] * by_hand
    fused = fused_model(model, TINY_CONFIG, mx.float32)
    assert not any(isinstance(m, nn.QuantizedLinear | LoRALinear) for _, m in fused.named_modules())
    assert max_diff(fused(X), expected) < F32_TOL
    # the update went into the dequantized values, never into the packed 4-bit integers
    assert np.allclose(np.array(fused.layers[0].self_attn.o_proj.weight), by_hand, atol=1e-5)


def test_merged_weight_is_the_lora_formula_with_bias():
    linear = nn.Linear(16, 8, bias=True)
    layer = LoRALinear(linear, rank=2, scale=3.0)
    layer.lora_b = mx.random.normal((2, 8))
    w = layer.merged_weight()
    by_hand = np.array(linear.weight) + 3.0 * np.array(layer.lora_b).T @ np.array(layer.lora_a).T
    assert np.allclose(np.array(w), by_hand, atol=1e-5)
    x = mx.random.normal((3, 16))
    fused = nn.Linear(16, 8)
    fused.weight, fused.bias = w, linear.bias
    assert max_diff(fused(x), layer(x)) < 1e-5


def test_fuse_to_float16_stays_close():
    model = build_tiny_model()
    apply_lora(model, LoraConfig(rank=4, alpha=8, dropout=0.0))
    randomize(model, False)
    expected = model(X)
    fused = fused_model(model, TINY_CONFIG, mx.float16)
    assert {v.dtype for _, v in tree_flatten(fused.parameters())} == {mx.float16}
    logits = fused(X)
    assert max_diff(logits, expected) < 2e-2 * mx.abs(expected).max().item()
    assert (logits.argmax(-1) == expected.argmax(-1)).all().item()


# --- the command on trained tiny runs -------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A float32 HF folder, and a LoRA and a DoRA run trained 4 steps on it."""
    root = tmp_path_factory.mktemp("fuse")
    model_dir = save_tiny_model_dir(root / "tiny")
    data = write_chat(root / "net.jsonl", 16, QA)
    lora = train_for_fuse(model_dir, data, root / "net")
    dora = train_for_fuse(model_dir, data, root / "dora", "lora.dora=true", "lora.layers=1")
    return {"base": model_dir, "lora": lora, "dora": dora}


def fuse(*args):
    return CliRunner().invoke(cli, ["fuse", *map(str, args)])


def assert_clean_error(result, *needles):
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("Error: "), result.output
    for needle in needles:
        assert needle in result.output, (needle, result.output)


def logits_of(model):
    return model(X).astype(mx.float32)


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_fuse_into_the_float_source_matches_mlx_lm_with_adapters(runs, kind, tmp_path):
    out = tmp_path / "export"
    result = fuse(runs[kind], "--dtype", "f32", "--out", out)
    assert result.exit_code == 0, result.output
    assert f"full-precision weights in {runs['base']}" in result.output
    assert "MLX f32" in result.output
    fused, _ = mlx_lm.load(str(out / "mlx"))
    # mlx-lm's own LoRA/DoRA layers over the same float base: an independent reference
    reference, _ = mlx_lm.load(str(runs["base"]), adapter_path=str(runs[kind]))
    expected = logits_of(reference)
    assert max_diff(expected, logits_of(mlx_lm.load(str(runs["base"]))[0])) > 1e-3
    assert max_diff(logits_of(fused), expected) < F32_TOL
    config = json.loads((out / "mlx" / "config.json").read_text())
    assert "quantization" not in config and config["torch_dtype"] == "float32"


def test_fuse_into_the_quantized_base_is_what_training_saw(runs, tmp_path):
    out = tmp_path / "export"
    result = fuse(runs["lora"], "--base-weights", "quantized", "--dtype", "f32", "--out", out)
    assert result.exit_code == 0, result.output
    assert "4-bit weights dequantized" in result.output
    # the run's 4-bit base (its scales as training had them) + its adapters, computed in
    # float32 as the fused model is
    trained = load_run_model(str(runs["lora"]))
    quant.cast_floats(trained.model, mx.float32, lambda name: True)
    fused, _ = mlx_lm.load(str(out / "mlx"))
    assert max_diff(logits_of(fused), logits_of(trained.model)) < F32_TOL


def test_default_export_chats_and_requantized_loads(runs, tmp_path):
    run = shutil.copytree(runs["lora"], tmp_path / "net")
    result = fuse(run)
    assert result.exit_code == 0, result.output
    folder = run / "export" / "mlx"
    assert "macft chat --model" in result.output and "MLX f16" in result.output
    for col in ("file", "size", "type", "tensors", "time"):
        assert col in result.output
    answer = CliRunner().invoke(
        cli,
        ["chat", "--model", str(folder), "--prompt", QA[0][0], "--temp", "0", "--max-tokens", "8"],
    )
    assert answer.exit_code == 0, answer.output
    assert answer.stdout.rstrip("\n")  # an answer (a tiny model's may be blanks)
    f16 = logits_of(mlx_lm.load(str(folder))[0])

    result = fuse(run, "--quantize", "4")
    assert result.exit_code == 0, result.output
    model, _ = mlx_lm.load(str(folder))
    assert isinstance(model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    assert json.loads((folder / "config.json").read_text())["quantization"]["bits"] == 4
    q4 = logits_of(model)
    # 4-bit noise on a tiny random model is large for single logits (it depends on the random
    # draw), so judge the whole logit tensor: a wrong merge or layout gives unrelated logits,
    # rel ~1.4 (sqrt 2). Measured: 0.3-0.5 (on the Mac's path the f16 model is itself a 4-bit
    # base with the adapters merged, so requantizing it moves more).
    rel = (mx.sqrt(mx.mean((q4 - f16) ** 2)) / mx.sqrt(mx.mean(f16**2))).item()
    assert rel < 0.7, rel
    assert not [p.name for p in (run / "export").iterdir() if p.name.startswith(".")]


def test_export_table_is_plain_whole_rows_without_a_terminal(runs, tmp_path):
    out = tmp_path / ("an-export-folder-with-a-long-name-" * 3)
    result = fuse(runs["lora"], "--out", out, "--peft")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    table = lines[lines.index(f"export in {out}") + 1 :]
    assert table[0].split() == ["file", "size", "type", "tensors", "time"]
    config = json.loads((out / "peft" / "adapter_config.json").read_text())
    assert table[1].startswith("peft/ ") and f"PEFT LoRA r={config['r']}, base " in table[1]
    assert table[1].endswith(" s") and "\x1b" not in result.output
    assert f"PEFT: PeftModel.from_pretrained(base_model, {str(out / 'peft')!r})" in lines
    assert lines[-1].startswith("fidelity: peft: ")  # the check's one line, whole


# --- PEFT -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_peft_folder_follows_the_peft_formula(runs, kind, tmp_path):
    """Names, shapes and lora_alpha such that PEFT's W + (alpha/r) B A (DoRA: rows scaled to
    m / norm) equals macft's fused weights; test_hf.py loads the folder with `peft` itself."""
    out = tmp_path / "export"
    assert fuse(runs[kind], "--peft", "--out", out).exit_code == 0
    assert fuse(runs[kind], "--dtype", "f32", "--out", out).exit_code == 0
    config = json.loads((out / "peft" / "adapter_config.json").read_text())
    tensors = mx.load(str(out / "peft" / "adapter_model.safetensors"))
    recipe = yaml.safe_load((runs[kind] / "recipe.yaml").read_text())
    r, alpha = recipe["lora"]["rank"], recipe["lora"]["alpha"]
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["r"] == r and config["lora_alpha"] == alpha
    assert config["use_dora"] == (kind == "dora")
    assert config["base_model_name_or_path"] == str(runs["base"].resolve())
    assert "self_attn.q_proj" in config["target_modules"]
    if kind == "dora":
        assert config["layers_to_transform"] == [1] and config["layers_pattern"] == "layers"

    base = dict(tree_flatten(mlx_lm.load(str(runs["base"]))[0].parameters()))
    fused = mx.load(str(out / "mlx" / "model.safetensors"))
    prefix = "base_model.model."
    modules = {k[len(prefix) :].rsplit(".lora_A", 1)[0] for k in tensors if ".lora_A." in k}
    assert modules and all(re.match(r"model\.layers\.\d+\.(self_attn|mlp)\.", m) for m in modules)
    for mod in modules:
        a = np.array(tensors[f"{prefix}{mod}.lora_A.weight"])
        b = np.array(tensors[f"{prefix}{mod}.lora_B.weight"])
        w = np.array(base[f"{mod}.weight"])
        assert a.shape == (r, w.shape[1]) and b.shape == (w.shape[0], r)
        merged = w + (alpha / r) * b @ a
        if kind == "dora":
            mag = np.array(tensors[f"{prefix}{mod}.lora_magnitude_vector"])
            merged = (mag / np.linalg.norm(merged, axis=1))[:, None] * merged
        assert np.allclose(np.array(fused[f"{mod}.weight"]), merged, atol=1e-5), mod


# --- Ollama Modelfile ---------------------------------------------------------------------


def render_go(template: str, messages: list[dict]) -> str:
    """Go text/template, the subset the Modelfile templates use: range .Messages, if / else if /
    else, eq, strings, $var := and $var =. Enough to check what Ollama would render."""
    tokens = [t for t in re.split(r"({{.*?}})", template, flags=re.S) if t]

    def parse(i):
        nodes = []
        while i < len(tokens):
            t = tokens[i]
            if not t.startswith("{{"):
                nodes.append(("text", t))
                i += 1
                continue
            a = t[2:-2].strip()
            if a == "end" or a.startswith("else"):
                return nodes, i
            if a.startswith("range "):
                body, i = parse(i + 1)
                nodes.append(("range", a[6:].strip(), body))
            elif a.startswith("if "):
                branches, cond = [], a[3:]
                while True:
                    body, i = parse(i + 1)
                    branches.append((cond, body))
                    a = tokens[i][2:-2].strip()
                    if a == "end":
                        break
                    cond = a[8:] if a.startswith("else if ") else "true"
                nodes.append(("if", branches))
            else:
                nodes.append(("expr", a))
            i += 1
        return nodes, i

    def value(tok, dot, env):
        if tok.startswith('"'):
            return json.loads(tok)
        if tok == "true":
            return True
        if tok.startswith("$"):
            return env[tok]
        return dot[tok[1:]]

    def run(nodes, dot, env):
        out = ""
        for node in nodes:
            if node[0] == "text":
                out += node[1]
            elif node[0] == "range":
                for item in value(node[1], dot, env):
                    out += run(node[2], item, env)
            elif node[0] == "if":
                for cond, body in node[1]:
                    parts = re.findall(r'"[^"]*"|\S+', cond)
                    ok = (
                        value(parts[1], dot, env) == value(parts[2], dot, env)
                        if parts[0] == "eq"
                        else bool(value(parts[0], dot, env))
                    )
                    if ok:
                        out += run(body, dot, env)
                        break
            else:
                m = re.match(r"(\$\w+) :?= (.+)$", node[1])
                if m:
                    env[m[1]] = value(m[2], dot, env)
                else:
                    out += str(value(node[1], dot, env))
        return out

    nodes, _ = parse(0)
    return run(nodes, {"Messages": messages}, {})


CONVERSATION = [
    {"Role": "system", "Content": "Be brief."},
    {"Role": "user", "Content": "Hi?"},
    {"Role": "assistant", "Content": "Hello."},
    {"Role": "user", "Content": "Routes?"},
]
EXPECTED = {
    "llama3": "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nHi?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nRoutes?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "mistral": "[INST] Be brief.\n\nHi?[/INST] Hello.</s>[INST] Routes?[/INST]",
    "gemma": "<start_of_turn>user\nBe brief.\n\nHi?<end_of_turn>\n<start_of_turn>model\n"
    "Hello.<end_of_turn>\n<start_of_turn>user\nRoutes?<end_of_turn>\n<start_of_turn>model\n",
    "phi3": "<|system|>\nBe brief.<|end|>\n<|user|>\nHi?<|end|>\n<|assistant|>\nHello.<|end|>\n"
    "<|user|>\nRoutes?<|end|>\n<|assistant|>\n",
}


def test_chatml_template_renders_what_the_hf_chat_template_renders():
    tok = build_tiny_hf_tokenizer()
    hf_msgs = [{"role": m["Role"], "content": m["Content"]} for m in CONVERSATION]
    expected = tok.apply_chat_template(hf_msgs, add_generation_prompt=True, tokenize=False)
    assert render_go(ollama.TEMPLATES["chatml"], CONVERSATION) == expected


@pytest.mark.parametrize("fmt", sorted(EXPECTED))
def test_templates_render_each_chat_format(fmt):
    assert render_go(ollama.TEMPLATES[fmt], CONVERSATION) == EXPECTED[fmt]
    no_system = render_go(ollama.TEMPLATES[fmt], CONVERSATION[1:])
    assert "Be brief." not in no_system and "Routes?" in no_system


@pytest.mark.parametrize(
    ("marker", "fmt"),
    [
        ("<|im_start|>", "chatml"),
        ("<|start_header_id|>", "llama3"),
        ("[INST]", "mistral"),
        ("<start_of_turn>", "gemma"),
        ("<|user|>{{ x }}<|end|><|assistant|>", "phi3"),
    ],
)
def test_modelfile_per_chat_format(marker, fmt):
    tok = TokenizerWrapper(build_tiny_hf_tokenizer())
    tok._tokenizer.chat_template = "{% for m in messages %}" + marker + "{% endfor %}"
    assert ollama.detect_format(tok) == fmt
    text = ollama.modelfile("./net-q4_k_m.gguf", fmt, system="Be brief.")
    lines = text.splitlines()
    assert lines[0] == "FROM ./net-q4_k_m.gguf"
    assert f'TEMPLATE """{ollama.TEMPLATES[fmt]}"""' in text
    stops = [line.split(" ", 2)[2] for line in lines if line.startswith("PARAMETER stop")]
    assert stops == [json.dumps(s) for s in ollama.STOPS[fmt]]
    rendered = render_go(ollama.TEMPLATES[fmt], CONVERSATION)  # stops are the format's markers
    assert all(s in rendered or s in ("</s>", "<|endoftext|>") for s in ollama.STOPS[fmt])
    assert text.endswith('SYSTEM """Be brief."""\n')


def test_format_from_the_catalog_and_default_system():
    tok = TokenizerWrapper(build_tiny_hf_tokenizer())
    tok._tokenizer.chat_template = None
    assert ollama.detect_format(tok, "smollm2-135m") == "chatml"
    assert ollama.detect_format(tok, "/some/model") is None
    assert "TEMPLATE" not in ollama.modelfile("./m.gguf", None)
    smol = TokenizerWrapper(build_tiny_hf_tokenizer())
    smol._tokenizer.chat_template = (
        "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are SmolLM.<|im_end|>\n"
        "{% endif %}" + CHATML
    )
    assert ollama.default_system(smol, "chatml") == "You are SmolLM."
    assert ollama.default_system(TokenizerWrapper(build_tiny_hf_tokenizer()), "chatml") is None
    with pytest.raises(Exception, match='"""'):
        ollama.modelfile("./m.gguf", "chatml", system='say """')


def test_names():
    assert ollama.default_name("runs/My Net_v2") == "my-net_v2"
    assert ollama.check_name("me/net:v1") == "me/net:v1"
    with pytest.raises(Exception, match="not a valid Ollama model name"):
        ollama.check_name("Net Model")


# --- errors -------------------------------------------------------------------------------


def test_run_without_adapters_and_bad_options(runs, tmp_path):
    empty = shutil.copytree(runs["lora"], tmp_path / "empty")
    (empty / "adapters.safetensors").unlink()
    shutil.rmtree(empty / "checkpoints")
    assert_clean_error(fuse(empty), "no adapters yet", "macft train --resume")
    assert not (empty / "export").exists()
    assert_clean_error(fuse(tmp_path / "nope"), "does not exist", "macft train")
    (tmp_path / "plain").mkdir()
    assert_clean_error(fuse(tmp_path / "plain"), "holds no run")
    assert_clean_error(fuse(runs["lora"], "--adapter-only"), "--gguf", "--peft")
    assert_clean_error(fuse(runs["lora"], "--quant", "q4_k_m"), "add --gguf")
    assert_clean_error(fuse(runs["lora"], "--name", "Bad Name"), "Ollama model name")
    assert_clean_error(fuse(runs["lora"], "--checkpoint", "step-9"), "step-000002", "best")
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("adapters.safetensors", "adapter_config.json"):
        shutil.copy(runs["lora"] / name, bare / name)
    assert_clean_error(fuse(bare), "no recipe.yaml", "--base-weights PATH")
    ok = fuse(bare, "--base-weights", runs["base"], "--out", tmp_path / "bare-out")
    assert ok.exit_code == 0 and "full-precision weights" in ok.output


def test_disk_full_mid_write_keeps_the_previous_export(runs, tmp_path, monkeypatch):
    run = shutil.copytree(runs["lora"], tmp_path / "net")
    assert fuse(run, "--peft").exit_code == 0
    assert fuse(run).exit_code == 0
    export = run / "export"
    before = {p: p.read_bytes() for p in export.rglob("*") if p.is_file()}

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mx, "save_safetensors", full)
    for args in ([], ["--peft"], ["--quantize", "8"]):
        assert_clean_error(fuse(run, *args), "disk is full", "nothing there was replaced")
        after = {p: p.read_bytes() for p in export.rglob("*") if p.is_file()}
        assert after == before
        assert not [p.name for p in export.iterdir() if p.name.startswith(".")]
    # a fresh --out that failed leaves no folder behind either
    assert_clean_error(fuse(run, "--out", tmp_path / "new"), "disk is full")
    assert not (tmp_path / "new").exists()


def test_too_little_free_space_is_refused_before_writing(runs, tmp_path, monkeypatch):
    real = shutil.disk_usage

    def small(path):
        return real(path)._replace(free=10_000)

    monkeypatch.setattr(staging.shutil, "disk_usage", small)
    result = fuse(runs["lora"], "--out", tmp_path / "x")
    assert_clean_error(result, "free on", "for the export, have 10.0 KB", "another disk")
    assert not (tmp_path / "x").exists()


# --- an export folder: whose files, and what a crash or a power cut leaves ------------------
def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_an_export_never_replaces_files_macft_did_not_write(runs, tmp_path):
    out = tmp_path / "models"
    (out / "mlx").mkdir(parents=True)
    (out / "mlx" / "notes.txt").write_text("my own model")
    (out / "Modelfile").write_text("FROM llama3\n")
    before = snapshot(out)
    result = fuse(runs["lora"], "--out", out)
    assert_clean_error(result, f"{out / 'mlx'} is already there and macft did not write it",
                       "--force to replace mlx")  # fmt: skip
    assert snapshot(out) == before
    # --gguf writes a Modelfile: the user's is named
    assert_clean_error(fuse(runs["lora"], "--out", out, "--gguf"), "--force to replace Modelfile")
    assert snapshot(out) == before
    forced = fuse(runs["lora"], "--out", out, "--force")
    assert forced.exit_code == 0, forced.output
    assert (out / "mlx" / "config.json").is_file() and not (out / "mlx" / "notes.txt").exists()
    # macft wrote mlx/ there now: exporting again replaces it without --force
    again = fuse(runs["lora"], "--out", out, "--dtype", "f32")
    assert again.exit_code == 0, again.output
    assert (out / "Modelfile").read_text() == "FROM llama3\n"  # never asked for: left alone


def test_a_folder_a_killed_export_moved_aside_comes_back_whatever_its_pid(runs, tmp_path):
    run = shutil.copytree(runs["lora"], tmp_path / "net")
    assert fuse(run).exit_code == 0
    export = run / "export"
    good = snapshot(export / "mlx")
    # killed between `mlx -> .old-mlx-PID` and the new mlx's rename; the PID now belongs to a
    # live process (this one), as after a reboot
    shutil.move(export / "mlx", export / f".old-mlx-{os.getpid()}")
    result = fuse(run, "--peft")
    assert result.exit_code == 0, result.output
    assert snapshot(export / "mlx") == good
    assert not [p.name for p in export.iterdir() if p.name.startswith(".")]


def test_every_file_is_on_disk_before_the_export_is_renamed_into_place(runs, tmp_path, monkeypatch):
    synced, renames, real_fsync, real_replace = set(), [], os.fsync, os.replace

    def fsync(fd):
        synced.add(os.path.realpath(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    def replace(src, dst):
        src = os.path.realpath(src)
        if "/export/" in src and ".tmp-" in os.path.basename(src):  # new files taking their name
            files = [str(p) for p in Path(src).rglob("*") if p.is_file()] or [src]
            renames.append((src, [f for f in files if f not in synced]))
        return real_replace(src, dst)

    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name the files fsync sees")
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    run = shutil.copytree(runs["lora"], tmp_path / "net")
    assert fuse(run, "--peft").exit_code == 0 and fuse(run).exit_code == 0
    assert fuse(run, "--quantize", "8").exit_code == 0
    assert len(renames) >= 3
    assert [(src, unsynced) for src, unsynced in renames if unsynced] == []


def test_the_ollama_create_line_is_one_shell_command():
    path = Path("/tmp/my runs/it's $(here)/export/Modelfile")
    line = ollama.create_command("net", path)
    assert shlex.split(line) == ["ollama", "create", "net", "-f", str(path)]
