"""The bad-input corpus: every case exits non-zero with one `Error:` line that names the file
(and line or key) and says how to fix it, shows no traceback, and changes no file."""

import contextlib
import gzip
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from helpers import save_tiny_model_dir, train_args, write_chat

from macft.cli import cli
from macft.runs.folder import RunDir

GOOD = json.dumps(
    {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
)


def chat_line(*turns) -> str:
    return json.dumps({"messages": [{"role": r, "content": c} for r, c in turns]})


@dataclass
class World:
    """Good files every case must leave untouched."""

    root: Path
    model: Path
    data: Path
    run: Path  # a finished run: adapters (rank 4), checkpoints, best


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("good")
    model = save_tiny_model_dir(root / "tiny")
    data = write_chat(root / "net.jsonl", n=8)
    run = root / "run"
    args = train_args(model, data, run, "--set", "train.iters=2", "--set", "train.save_every=1")
    result = CliRunner().invoke(cli, args + ["--set", "train.eval_every=1"])
    assert result.exit_code == 0, result.output
    return World(root, model, data, run)


def train(w: World, d: Path, *sets: str, model=None, data=None, out=None) -> list[str]:
    out = out or d / "out"
    args = train_args(model or w.model, data or w.data, out, "--set", "train.iters=1")
    return args + [x for s in sets for x in ("--set", s)]


def put(path: Path, content) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return path


def copy_run(w: World, d: Path, name="run") -> Path:
    return Path(shutil.copytree(w.run, d / name))


def edit_recipe(run: Path, section: str, key: str, value) -> None:
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe[section][key] = value
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))


def write_gguf(path: Path, arch: str) -> Path:
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


CASES = []


def case(name):
    def register(build):
        CASES.append(pytest.param(build, id=name))
        return build

    return register


# --- data files ------------------------------------------------------------------------------
def data_case(name, content, line, *hints, sets=()):
    @case(f"data-{name}")
    def build(w, d):
        p = put(d / f"{name}.jsonl", content)
        where = f"{p}:{line}" if line else str(p)
        return train(w, d, *sets, data=p), [where, *hints]


# preference pairs (train.method dpo / orpo)
def pair_line(prompt="q", **sides) -> str:
    return json.dumps({"prompt": prompt, **sides})


DPO = ("train.method=dpo",)
data_case("pair-identical", pair_line(chosen="a", rejected=" a"), 1, "the same answer", sets=DPO)
data_case("pair-missing-side", pair_line(chosen="a"), 1, "no 'rejected'", sets=DPO)
data_case("pair-no-prompt", '{"chosen": "a", "rejected": "b"}', 1, "no 'prompt'", sets=DPO)
data_case(
    "pair-answer-kind", pair_line(chosen=3, rejected="b"), 1, "'chosen' is a number", sets=DPO
)
data_case(
    "pair-prompt-too-long",
    pair_line("q" * 40, chosen="a", rejected="b"),
    1,
    "nothing of the answer fits in data.max_seq_length=16",
    sets=(*DPO, "data.max_seq_length=16"),
)
data_case("pairs-with-sft", pair_line(chosen="a", rejected="b"), 0, "train.method: dpo or orpo")
data_case("sft-with-dpo", GOOD, 0, "train.method is dpo", "not pairs", sets=DPO)

data_case("bad-json", GOOD + '\n{"messages": [\n', 2, "bad JSON", "each line must be one JSON")
data_case(
    "bom-mid-file", (GOOD + "\n") * 2 + "\ufeff" + GOOD + "\n", 3, "byte order mark", "delete it"
)
data_case(
    "non-utf8", (GOOD + "\n").encode() + b'{"text": "caf\xe9"}\n', 2, "save the file as UTF-8"
)
data_case("empty-file", b"", 1, "no data", "each line needs one of")
data_case("only-blank-lines", "\n \n\t\n", 1, "no data", "each line needs one of")
data_case(
    "wrong-keys", '{"question": "a", "answer": "b"}\n', 1, "found: question, answer", "needs one of"
)
data_case(
    "wrong-role", chat_line(("human", "q"), ("assistant", "a")), 1, "'human'", "use one of system"
)
data_case(
    "empty-turn",
    chat_line(("user", " "), ("assistant", "a")),
    1,
    "empty content",
    "remove the message",
)
data_case("mixed-formats", GOOD + '\n{"text": "hello"}\n', 2, "use one format per file")
data_case(
    "10mb-line-torn",
    GOOD + '\n{"messages": [{"role": "user", "content": "' + "x" * 10_000_000 + "\n",
    2,
    "bad JSON",
    "one JSON object",
)
data_case("no-assistant-turn", chat_line(("user", "q")), 1, "no assistant message", "add the reply")
data_case(
    "ends-with-user",
    chat_line(("user", "q"), ("assistant", "a"), ("user", "b")),
    1,
    "must end with an assistant",
)
data_case(
    "turns-not-alternating",
    chat_line(("user", "q"), ("user", "r"), ("assistant", "a")),
    1,
    "turns must alternate",
)
data_case(
    "system-not-first",
    chat_line(("user", "q"), ("system", "s"), ("assistant", "a")),
    1,
    "must come first",
)
data_case("array-not-object", "[1, 2]\n", 1, "expected a JSON object", "needs one of")
data_case("prompt-without-completion", '{"prompt": "a"}\n', 1, "no 'completion'", "needs one of")
data_case(
    "completion-not-text",
    '{"prompt": "a", "completion": 3}\n',
    1,
    "'completion' is a number",
    "must be a string",
)
data_case(
    "content-is-list",
    '{"messages": [{"role": "user", "content": ["a"]}]}\n',
    1,
    "'content' is a list",
    "must be a string",
)
data_case("empty-messages", '{"messages": []}\n', 1, "an empty list", "non-empty list")
data_case(
    "all-longer-than-max-seq-length",
    "\n".join(chat_line(("user", "q" * 200), ("assistant", "a")) for _ in range(4)),
    None,
    "data.max_seq_length=16",
    "raise data.max_seq_length",
    sets=("data.max_seq_length=16",),
)


# the file as a whole: encodings, binary formats, one array
data_case("utf16-with-bom", (GOOD + "\n").encode("utf-16"), 1, "UTF-16 text", "save it as UTF-8")
data_case("utf16-no-bom", (GOOD + "\n").encode("utf-16-le"), 1, "UTF-16", "iconv -f UTF-16")
data_case("utf32", (GOOD + "\n").encode("utf-32"), 1, "UTF-32 text", "save it as UTF-8")
data_case("gzip", gzip.compress((GOOD + "\n").encode()), 1, "gzip-compressed", "gunzip")
data_case("binary", bytes(range(256)) * 8, 1, "binary (it holds NUL bytes)", "each line needs")
data_case("json-array", f"[{GOOD},\n{GOOD}]\n", 1, "one JSON array", "jq -c '.[]' json-array.jsonl")
# one line: JSON that parses in Python but is no data
data_case("nan-literal", GOOD + '\n{"text": NaN}\n', 2, "NaN is not valid JSON", "write null")
data_case(
    "infinity-literal",
    GOOD + '\n{"prompt": "a", "completion": "b", "w": -Infinity}\n',
    2,
    "-Infinity is not valid JSON",
)
data_case(
    "deep-nesting", '{"text": "a", "x": ' + "[" * 50_000 + "]" * 50_000 + "}\n", 1, "nested more"
)
data_case("huge-integer", '{"text": "a", "n": ' + "9" * 5000 + "}\n", 1, "thousands of digits")
data_case("lone-surrogate", '{"text": "caf\\ud800e"}\n', 1, "lone surrogate", "fix or remove")
data_case(
    "duplicate-keys",
    '{"prompt": "a", "prompt": "b", "completion": "c"}\n',
    1,
    "'prompt' appears twice",
    "keep one",
)
data_case(
    "tool-calls",
    json.dumps({"messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function"}]},
        {"role": "tool", "tool_call_id": "1", "content": "sunny"},
        {"role": "assistant", "content": "sunny"},
    ]}),
    1,
    "message 2: tool calls",
    "write each call and its result as text",
)  # fmt: skip
data_case(
    "image-content-part",
    json.dumps({"messages": [
        {"role": "user", "content": [{"type": "text", "text": "what is it?"},
                                     {"type": "image_url", "image_url": {"url": "x.png"}}]},
        {"role": "assistant", "content": "a cat"},
    ]}),
    1,
    "content part 2 is 'image_url', not text",
    "remove that part",
)  # fmt: skip


@case("data-train-jsonl-is-a-folder")
def _(w, d):
    (d / "data" / "train.jsonl").mkdir(parents=True)
    return train(w, d, data=d / "data"), [f"{d}/data/train.jsonl is a folder", "a .jsonl file"]


@case("data-train-jsonl-is-a-fifo")
def _(w, d):
    (d / "data").mkdir()
    os.mkfifo(d / "data" / "train.jsonl")  # reading it would wait forever
    return train(w, d, data=d / "data"), [f"{d}/data/train.jsonl is a FIFO", "a .jsonl file"]


@case("data-file-is-a-fifo")
def _(w, d):
    os.mkfifo(d / "f.jsonl")
    return train(w, d, data=d / "f.jsonl"), [f"{d}/f.jsonl is a FIFO", "give a .jsonl file"]


@case("data-valid-jsonl-empty")
def _(w, d):
    put(d / "data/train.jsonl", GOOD + "\n")
    p = put(d / "data/valid.jsonl", "\n")
    return train(w, d, data=d / "data"), [f"{p}:1: no data", "each line needs one of"]


@case("data-valid-jsonl-all-dropped")
def _(w, d):
    put(d / "data/train.jsonl", GOOD + "\n")
    p = put(d / "data/valid.jsonl", chat_line(("user", "q" * 200), ("assistant", "a")) + "\n")
    sets = ("data.max_seq_length=32",)
    return train(w, d, *sets, data=d / "data"), [
        f"{p}: every validation example is longer than data.max_seq_length=32",
        "raise data.max_seq_length",
    ]


@case("data-valid-jsonl-line-the-template-rejects")
def _(w, d):
    template = model_copy(w, d) / "chat_template.jinja"
    refuse = "{% for x in messages %}{% if 'FORBIDDEN' in x['content'] %}"
    put(template, refuse + "{{ raise_exception('no FORBIDDEN here') }}{% endif %}{% endfor %}"
        + template.read_text())  # fmt: skip
    m = template.parent
    put(d / "data/train.jsonl", GOOD + "\n")
    p = put(
        d / "data/valid.jsonl", GOOD + "\n" + chat_line(("user", "FORBIDDEN"), ("assistant", "a"))
    )
    return train(w, d, model=m, data=d / "data"), [f"{p}:2: ", "no FORBIDDEN here"]


@case("data-folder-without-train-jsonl")
def _(w, d):
    (d / "data").mkdir()
    return train(w, d, data=d / "data"), [str(d / "data"), "put the training lines in train.jsonl"]


@case("data-valid-in-other-format")
def _(w, d):
    put(d / "data/train.jsonl", GOOD + "\n")
    p = put(d / "data/valid.jsonl", '{"text": "x"}\n')
    return train(w, d, data=d / "data"), [str(p), "use the same format in both files"]


@case("data-missing")
def _(w, d):
    return train(w, d, data=d / "nope.jsonl"), [f"{d}/nope.jsonl", "--data", "give a .jsonl file"]


# --- recipes ---------------------------------------------------------------------------------
def recipe_case(name, section, key, value, *hints):
    @case(f"recipe-{name}")
    def build(w, d):
        recipe = {
            "model": {"path": str(w.model), "compute": "float32"},
            "data": {"path": str(w.data)},
            "lora": {"rank": 4},
            "train": {"iters": 1, "batch_size": 2, "grad_checkpoint": False},
        }
        recipe[section][key] = value
        p = put(d / "r.yaml", yaml.safe_dump(recipe))
        return ["train", "--recipe", str(p), "--out", str(d / "out")], [str(p), *hints]


recipe_case("typo", "lora", "rnak", 4, "lora.rnak: unknown key; did you mean lora.rank?")
recipe_case("wrong-type", "lora", "rank", "four", "lora.rank: expected a whole number, got 'four'")
recipe_case("negative-rank", "lora", "rank", -4, "lora.rank: must be >= 1, got -4")
recipe_case("alpha-0", "lora", "alpha", 0, "lora.alpha: must be > 0, got 0")
recipe_case(
    "unknown-target", "lora", "targets", ["q_prj"], "lora.targets", "valid names: down_proj"
)
recipe_case("iters-and-epochs", "train", "epochs", 1, "set one of them, not both")
recipe_case("bad-choice", "train", "schedule", "linear", "train.schedule: must be one of cosine")
recipe_case("bits-7", "model", "bits", 7, "model.bits: must be one of 2, 3, 4, 5, 6, 8")


recipe_case("nan-learning-rate", "train", "learning_rate", float("nan"), "train.learning_rate:",
            "expected a finite number, got nan")  # fmt: skip
recipe_case("nan-grad-norm", "train", "max_grad_norm", float("nan"), "train.max_grad_norm:",
            "finite number")  # fmt: skip
recipe_case("inf-epochs", "train", "epochs", float("inf"), "expected a finite number, got inf")
recipe_case("huge-seed", "train", "seed", 10**30, "train.seed: must be <= 4294967295")
recipe_case("huge-integer-alpha", "lora", "alpha", 10**400, "lora.alpha: expected a finite")
recipe_case("huge-batch", "train", "batch_size", 10**12, "train.batch_size: must be <= 4096")
recipe_case("zero-learning-rate", "train", "learning_rate", 0, "train.learning_rate: must be > 0")
recipe_case("zero-batch-size", "train", "batch_size", 0, "train.batch_size: must be >= 1")
recipe_case("unknown-data-key", "data", "max_seq_len", 64, "did you mean data.max_seq_length?")


@case("recipe-unknown-section")
def _(w, d):
    p = put(d / "r.yaml", yaml.safe_dump({"model": {"path": str(w.model)}, "optimizer": {}}))
    return ["train", "--recipe", str(p)], [str(p), "optimizer: unknown key", "valid keys: model"]


@case("recipe-deep-nesting")
def _(w, d):
    p = put(d / "deep.yaml", "model:\n  path: " + "[" * 20_000 + "]" * 20_000 + "\n")
    return ["train", "--recipe", str(p)], [str(p), "nested too deeply", "fix the file"]


@case("recipe-bad-yaml")
def _(w, d):
    p = put(d / "bad.yaml", "model:\n  path: [x\n")
    return ["train", "--recipe", str(p)], [f"{p}:3", "not valid YAML", "fix the syntax"]


@case("recipe-not-a-mapping")
def _(w, d):
    p = put(d / "list.yaml", "- a\n- b\n")
    return ["train", "--recipe", str(p)], [str(p), "a recipe is a mapping with sections"]


@case("recipe-missing-file")
def _(w, d):
    return ["train", "--recipe", str(d / "nope.yaml")], [f"{d}/nope.yaml", "pass a path to a .yaml"]


# --- models ----------------------------------------------------------------------------------
def model_copy(w: World, d: Path) -> Path:
    return Path(shutil.copytree(w.model, d / "model"))


@case("model-missing-folder")
def _(w, d):
    return train(w, d, model=d / "nomodel"), [f"{d}/nomodel does not exist", "give a GGUF file"]


@case("model-truncated-safetensors")
def _(w, d):
    f = model_copy(w, d) / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return train(w, d, model=d / "model"), [f"{f}: truncated", "download the model again"]


@case("model-garbage-safetensors-header")
def _(w, d):
    f = put(model_copy(w, d) / "model.safetensors", b"\x05\x00")
    return train(w, d, model=d / "model"), [
        str(f),
        "not a readable safetensors",
        "download it again",
    ]


@case("model-config-bad-json")
def _(w, d):
    f = put(model_copy(w, d) / "config.json", "{")
    return train(w, d, model=d / "model"), [f"{f}: not valid JSON", "fix or replace the file"]


@case("model-unsupported-model-type")
def _(w, d):
    f = model_copy(w, d) / "config.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), "model_type": "nosuch"}))
    return train(w, d, model=d / "model"), ["'nosuch' is not supported", "pip install -U mlx-lm"]


@case("model-no-tokenizer-files")
def _(w, d):
    m = model_copy(w, d)
    for f in m.iterdir():
        if "token" in f.name:
            f.unlink()
    return train(w, d, model=m), [f"{m}: no tokenizer files", "copy tokenizer.json"]


@case("model-mismatched-tokenizer")
def _(w, d):
    m = save_tiny_model_dir(d / "model", vocab_size=100)  # the tokenizer has 259 tokens
    return train(w, d, model=m), [str(m), "has 259 tokens", "only 100 rows", "copy tokenizer.json"]


def gguf_meta(path: Path, **meta) -> Path:
    """A GGUF of llama metadata alone (about 450 bytes, no tensors), `meta` overriding it."""
    w = gguf.GGUFWriter(str(path), "llama")
    values = {"context_length": 64, "embedding_length": 64, "block_count": 1,
              "feed_forward_length": 128, "head_count": 4, "head_count_kv": 2, **meta}  # fmt: skip
    for key, value in values.items():
        getattr(w, f"add_{key}")(value)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["a", "b"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def gguf_case(name, meta, *hints):
    for command in ("train", "plan"):

        @case(f"{command}-gguf-{name}")
        def build(w, d, command=command):
            p = gguf_meta(d / "m.gguf", **meta)
            if command == "plan":
                return ["plan", "--model", str(p), "--data", str(w.data)], [str(p), *hints]
            return train(w, d, model=p), [str(p), *hints]


gguf_case("block-count-3000000", {"block_count": 3_000_000}, "llama.block_count is 3000000",
          "download it again")  # fmt: skip
gguf_case("block-count-1000-without-tensors", {"block_count": 1000},
          "llama.block_count is 1,000 but the weights hold 0 layers")  # fmt: skip
gguf_case("head-count-0", {"head_count": 0}, "llama.attention.head_count is 0, not a whole number")
gguf_case("vocab-size-4e9", {"vocab_size": 4_000_000_000}, "llama.vocab_size is 4000000000")
gguf_case("heads-not-a-multiple", {"head_count_kv": 3}, "is not a multiple of",
          "llama.attention.head_count_kv 3")  # fmt: skip


@case("gguf-tensor-data-truncated")
def _(w, d):
    from helpers import TINY_CONFIG, build_tiny_model
    from helpers import write_gguf as write_model_gguf

    p = write_model_gguf(d / "tiny.gguf", build_tiny_model(), TINY_CONFIG)
    p.write_bytes(p.read_bytes()[: p.stat().st_size - 5000])
    return train(w, d, model=p), [str(p), "download it again"]


def config_case(name, change, *hints):
    for command in ("train", "plan"):

        @case(f"{command}-config-{name}")
        def build(w, d, command=command):
            f = model_copy(w, d) / "config.json"
            text = change(f.read_text())
            put(f, text if isinstance(text, str) else json.dumps(text))
            if command == "plan":
                return ["plan", "--model", str(f.parent), "--data", str(w.data)], [str(f), *hints]
            return train(w, d, model=f.parent), [str(f), *hints]


def config_with(**values):
    return lambda text: {**json.loads(text), **values}


config_case("layers-3000000", config_with(num_hidden_layers=3_000_000),
            "num_hidden_layers is 3000000", "download it again")  # fmt: skip
config_case("heads-0", config_with(num_attention_heads=0), "num_attention_heads is 0")
config_case("vocab-4e9", config_with(vocab_size=4e9), "vocab_size is 4000000000.0")
config_case("deep-nesting", lambda t: t[:-1] + ', "x": ' + "[" * 50_000 + "]" * 50_000 + "}",
            "not valid JSON (nested too deeply)")  # fmt: skip
config_case("huge-integer", lambda t: t[:-1] + ', "x": ' + "9" * 5000 + "}", "not valid JSON")
config_case("a-list", lambda t: "[1, 2]", "not a JSON object", "fix or replace")


@case("train-config-layers-beyond-the-weights")
def _(w, d):
    f = model_copy(w, d) / "config.json"
    put(f, json.dumps({**json.loads(f.read_text()), "num_hidden_layers": 40}))
    return train(w, d, model=f.parent), [str(f), "is 40 but the weights hold 2 layers"]


@case("gguf-unsupported-architecture")
def _(w, d):
    p = write_gguf(d / "mamba.gguf", "mamba")
    return train(w, d, model=p), [str(p), "architecture 'mamba' is not supported"]


@case("gguf-corrupted-magic")
def _(w, d):
    p = write_gguf(d / "m.gguf", "llama")
    p.write_bytes(b"GGML" + p.read_bytes()[4:])
    return train(w, d, model=p), [str(p), "not a GGUF file", "download it again"]


@case("gguf-truncated-header")
def _(w, d):
    p = write_gguf(d / "m.gguf", "llama")
    p.write_bytes(p.read_bytes()[:20])
    return train(w, d, model=p), [str(p), "truncated GGUF", "download it again"]


@case("gguf-truncated-metadata")
def _(w, d):
    p = write_gguf(d / "m.gguf", "llama")
    p.write_bytes(p.read_bytes()[:60])
    return train(w, d, model=p), [str(p), "cannot read GGUF", "download it again"]


@case("plan-gguf-truncated-metadata")
def _(w, d):
    p = write_gguf(d / "m.gguf", "llama")
    p.write_bytes(p.read_bytes()[:60])
    return ["plan", "--model", str(p), "--data", str(w.data)], [str(p), "download it again"]


# --- adapters --------------------------------------------------------------------------------
def chat(target, *extra) -> list[str]:
    return ["chat", str(target), "--prompt", "hi", "--max-tokens", "2", *extra]


@case("adapters-from-another-base")
def _(w, d):
    other = save_tiny_model_dir(d / "other", hidden_size=32, intermediate_size=64)
    args = chat(w.run, "--model", str(other))
    return args, [f"{w.run}/adapters.safetensors does not fit", "--model PATH"]


@case("adapters-wrong-rank-in-recipe")
def _(w, d):
    run = copy_run(w, d)
    edit_recipe(run, "lora", "rank", 8)
    return chat(run), [f"{run}/recipe.yaml says lora.rank 8", "rank-4", "set lora.rank"]


@case("adapters-wrong-rank-in-adapter-config")
def _(w, d):
    folder = d / "mlx_lm_adapters"
    folder.mkdir()
    shutil.copy(w.run / "adapters.safetensors", folder)
    keys = ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"]
    config = {"num_layers": 2, "lora_parameters": {"rank": 8, "scale": 2.0, "keys": keys}}
    put(folder / "adapter_config.json", json.dumps(config))
    args = chat(folder, "--model", str(w.model))
    return args, [f"{folder}/adapter_config.json says lora_parameters.rank 8", "rank-4"]


@case("adapters-config-bad-json")
def _(w, d):
    folder = d / "adapters"
    folder.mkdir()
    shutil.copy(w.run / "adapters.safetensors", folder)
    f = put(folder / "adapter_config.json", "{oops")
    return chat(folder, "--model", str(w.model)), [f"{f}: not readable JSON", "fix it"]


@case("adapters-config-deep-nesting")
def _(w, d):
    folder = d / "adapters"
    folder.mkdir()
    shutil.copy(w.run / "adapters.safetensors", folder)
    f = put(folder / "adapter_config.json", "[" * 50_000 + "]" * 50_000)
    return chat(folder, "--model", str(w.model)), [f"{f}: not readable JSON", "copy the"]


@case("run-recipe-yaml-damaged")
def _(w, d):
    run = copy_run(w, d)
    put(run / "recipe.yaml", "model: {path: [\n")
    return chat(run), [f"{run}/recipe.yaml:", "not valid YAML", "fix the syntax"]


@case("run-state-json-damaged")
def _(w, d):
    run = copy_run(w, d)
    put(run / "state.json", "[" * 50_000 + "]" * 50_000)
    return ["train", "--resume", "--out", str(run)], [f"{run}/state.json: damaged", "delete it"]


@case("adapters-truncated")
def _(w, d):
    f = copy_run(w, d) / "adapters.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    return chat(f.parent), [f"{f}: cannot read the adapters", "--checkpoint best"]


@case("adapters-no-such-checkpoint")
def _(w, d):
    return chat(w.run, "--checkpoint", "step-99"), [str(w.run), "'step-99'", "--checkpoint best"]


# --- eval, plan, report ----------------------------------------------------------------------
@case("eval-data-missing")
def _(w, d):
    return ["eval", str(w.run), "--data", str(d / "t.jsonl")], [f"{d}/t.jsonl", "give a held-out"]


@case("eval-unknown-metric")
def _(w, d):
    return ["eval", str(w.run), "--data", str(w.data), "--metric", "bleu"], [
        "--metric",
        "use loss, exact",
    ]


@case("eval-not-a-run")
def _(w, d):
    return ["eval", str(w.model), "--data", str(w.data)], [str(w.model), "give the --out folder"]


@case("report-not-a-run")
def _(w, d):
    return ["report", str(d / "nothing")], [f"{d}/nothing", "give the --out folder"]


@case("plan-bad-memory")
def _(w, d):
    args = ["plan", "--model", str(w.model), "--data", str(w.data), "--memory", "lots"]
    return args, ["--memory 'lots'", "write it like 24GB"]


# --- command line ----------------------------------------------------------------------------
@case("cli-unknown-option")
def _(w, d):
    return ["train", "--itres", "5"], ["No such option '--itres'"]


@case("cli-set-without-equals")
def _(w, d):
    return train(w, d, "train.iters"), ["--set train.iters: expected KEY=VALUE"]


@case("cli-set-unknown-key")
def _(w, d):
    return train(w, d, "train.itres=5"), ["train.itres: unknown key; did you mean train.iters?"]


@case("cli-set-into-a-value")
def _(w, d):
    return train(w, d, "train.iters.x=5"), ["--set train.iters.x", "iters is not a section"]


@case("cli-negative-iters")
def _(w, d):
    return train(w, d, "train.iters=-3"), ["train.iters: must be >= 1, got -3"]


@case("cli-resume-folder-without-run")
def _(w, d):
    return ["train", "--resume", "--out", str(d)], [str(d), "no run to resume", "macft train"]


@case("cli-resume-without-out")
def _(w, d):
    return ["train", "--resume"], ["--resume needs the run folder", "--out runs/NAME"]


@case("cli-out-is-a-file")
def _(w, d):
    return train(w, d, out=w.data), [str(w.data), "is a file", "pick another --out"]


@case("cli-out-holds-a-run")
def _(w, d):
    return train(w, d, out=w.run), [str(w.run), "already holds a run", "--resume"]


@case("cli-resume-with-changed-rank")
def _(w, d):
    args = ["train", "--resume", "--out", str(w.run), "--set", "lora.rank=8"]
    return args, [str(w.run), "changed lora.rank", "another --out"]


@case("cli-resume-with-changed-data")
def _(w, d):
    run = copy_run(w, d)
    data = put(d / "net.jsonl", w.data.read_text() + GOOD + "\n")
    edit_recipe(run, "data", "path", str(data))
    args = ["train", "--resume", "--out", str(run)]
    return args, [str(run), "cannot resume: the data (its files' contents) changed", "--force"]


@case("cli-resume-with-changed-seed-and-split")
def _(w, d):
    sets = ["--set", "train.seed=7", "--set", "data.valid_fraction=0.3"]
    return ["train", "--resume", "--out", str(w.run), *sets], [
        "train.seed (0 -> 7)",
        "data.valid_fraction (0.1 -> 0.3)",
        "add --force",
    ]


@case("cli-resume-a-busy-run")
def _(w, d):
    hold = RunDir(w.run).lock()  # another training holds the run
    return ["train", "--resume", "--out", str(w.run)], [str(w.run), "is busy", "wait for it"], hold


@case("cli-resume-damaged-checkpoint")
def _(w, d):
    run = copy_run(w, d)
    latest = RunDir(run).latest_checkpoint()
    put(latest / "optimizer.safetensors", b"\x00" * 8)
    return ["train", "--resume", "--out", str(run)], [str(latest), "delete it to use an older one"]


@case("cli-chat-nothing-to-chat-with")
def _(w, d):
    return ["chat", "--prompt", "hi"], ["nothing to chat with", "macft chat --model"]


@case("cli-runs-missing-folder")
def _(w, d):
    return ["runs", str(d / "nope")], [f"{d}/nope does not exist", "give a run folder"]


def snapshot(*folders: Path) -> dict:
    """Every file and folder: content hash and modification time."""
    out = {}
    for folder in folders:
        for p in sorted(folder.rglob("*")):
            st = p.stat()
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            out[str(p)] = (digest, st.st_mtime_ns if p.is_file() else None)
    return out


@pytest.mark.parametrize("build", CASES)
def test_bad_input_is_refused_cleanly(world, tmp_path, build):
    made = build(world, tmp_path)
    args, needles = made[0], made[1]
    hold = made[2] if len(made) > 2 else contextlib.nullcontext()
    before = snapshot(world.root, tmp_path)
    with hold:
        result = CliRunner().invoke(cli, args)
    out = result.output
    assert result.exit_code not in (0, None), out
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    assert "Traceback" not in out
    last = out.rstrip().splitlines()[-1]
    assert last.startswith("Error: "), out
    assert sum(line.startswith("Error:") for line in out.splitlines()) == 1, out
    assert len(last) < 600, last[:600]  # a 10 MB line is not echoed back
    for needle in needles:
        assert needle in last, f"{needle!r} not in {last!r}"
    assert snapshot(world.root, tmp_path) == before


def test_the_corpus_is_large():
    assert len(CASES) >= 110
