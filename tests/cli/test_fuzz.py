"""Fuzzing with hypothesis: thousands of random mutations of valid data lines, recipes and GGUF
headers. Each one loads, or is refused with one clean line (a MacftError, which the CLI prints
as `Error: ...`); never another exception, never a hang. Derandomized: CI sees the same cases."""

import contextlib
import json
import math
import signal
from pathlib import Path

import gguf
import pytest
import yaml
from helpers import TINY_CONFIG, build_tiny_hf_tokenizer, build_tiny_model, write_gguf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlx_lm.tokenizer_utils import TokenizerWrapper

from macft.config.recipes import apply_override, parse_set, read_recipe_file
from macft.config.validate import validate
from macft.data.dataset import load_data
from macft.errors import MacftError
from macft.models import load_base
from macft.models.gguf import gguf_config, gguf_tokenizer

SECONDS = 10  # one case taking longer is a hang


def fuzz(examples: int):
    return settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )


@contextlib.contextmanager
def time_limit(seconds: float = SECONDS):
    def hung(*_):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def loads_or_one_clean_line(work) -> None:
    """work() returns, or raises a MacftError of one short line; anything else fails the test."""
    with time_limit():
        try:
            work()
        except MacftError as e:
            message = str(e)
            assert message and "\n" not in message and len(message) < 2000, message


# --- data lines ------------------------------------------------------------------------------
VALID_LINES = {  # by format: a file holds one
    "chat": [
        {"messages": [{"role": "user", "content": "show bgp summary?"},
                      {"role": "assistant", "content": "show bgp summary"}]},
        {"messages": [{"role": "system", "content": "terse"}, {"role": "user", "content": "q"},
                      {"role": "assistant", "content": "a"}, {"role": "user", "content": "q2"},
                      {"role": "assistant", "content": [{"type": "text", "text": "a2"}]}]},
    ],
    "completion": [{"prompt": "list interfaces?", "completion": "show ip interface brief"}],
    "text": [{"text": "Q: how many? A: SELECT COUNT(*) FROM t"}],
}  # fmt: skip
HOSTILE_BYTES = [b"NaN", b"-Infinity", b"\\ud800", b"[" * 3000, b"\x00", b"\r", b"\xef\xbb\xbf",
                 b'"', b"{", b"}", b",", b"9" * 5000, b"\\u0000", b"\n", b"\xff\xfe", b"\xc3",
                 b'"role"', b'"content"', b"null", b"[]", b"{}", b"\t"]  # fmt: skip
# JSON text Python's json.loads takes but no data line should hold, put in place of a value
RAW_VALUES = [b"NaN", b"-Infinity", b"9" * 5000, b"[" * 3000 + b"]" * 3000, b'"caf\\ud800e"',
              b'{"a": 1, "a": 2}', b'"a\\u0000b"', b'"\\udfff"', b"1e999",
              b'[{"type": "image_url"}]', b'[{"type": "text", "text": "x"}]']  # fmt: skip
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**30), 10**30)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)  # fmt: skip


def _nodes(obj, path=()):
    yield path
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _nodes(v, (*path, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _nodes(v, (*path, i))


def _replace(obj, path, value):
    if not path:
        return value
    out = json.loads(json.dumps(obj))
    node = out
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    return out


@st.composite
def mutated_line(draw, fmt: str) -> bytes:
    rec = draw(st.sampled_from(VALID_LINES[fmt]))
    path = draw(st.sampled_from(list(_nodes(rec))))
    kind = draw(st.sampled_from(["value", "raw", "none"]))
    if kind == "value":  # a value somewhere replaced by any JSON value, NaN and huge ones too
        rec = _replace(rec, path, draw(json_values))
    raw = json.dumps(_replace(rec, path, "@RAW@") if kind == "raw" else rec, allow_nan=True)
    raw = bytearray(raw.encode().replace(b'"@RAW@"', draw(st.sampled_from(RAW_VALUES))))
    for _ in range(draw(st.integers(0, 3))):  # then the bytes themselves
        pos = draw(st.integers(0, len(raw)))
        kind = draw(st.sampled_from(["insert", "replace", "delete", "truncate"]))
        if kind == "insert":
            raw[pos:pos] = draw(st.sampled_from(HOSTILE_BYTES) | st.binary(max_size=4))
        elif kind == "replace" and pos < len(raw):
            raw[pos] = draw(st.integers(0, 255))
        elif kind == "delete":
            del raw[pos : pos + draw(st.integers(1, 8))]
        else:
            del raw[pos:]
    return bytes(raw)


@st.composite
def data_file(draw) -> bytes:
    fmt = draw(st.sampled_from(sorted(VALID_LINES)))
    valid = st.sampled_from(VALID_LINES[fmt]).map(lambda r: json.dumps(r).encode())
    lines = draw(st.lists(mutated_line(fmt) | valid, min_size=1, max_size=6))
    text = draw(st.sampled_from([b"\n", b"\r\n", b"\r"])).join(lines)
    if draw(st.integers(0, 9)) == 0:
        text = b"\xef\xbb\xbf" + text
    if draw(st.integers(0, 19)) == 0:
        text = text.decode("utf-8", "replace").encode("utf-16")
    return text


@pytest.fixture(scope="module")
def tokenizer():
    return TokenizerWrapper(build_tiny_hf_tokenizer())


@pytest.mark.once
@fuzz(1500)
@given(data=data_file())
def test_mutated_data_files_load_or_get_one_clean_line(tmp_path, tokenizer, data):
    path = tmp_path / "d.jsonl"
    path.write_bytes(data)
    loads_or_one_clean_line(lambda: load_data(path, tokenizer, 64, 0.2, 0, system=None))


# --- recipes ---------------------------------------------------------------------------------
RECIPE = {
    "model": {"path": "m", "bits": 4, "compute": "float32"},
    "lora": {"rank": 8, "alpha": 16.0, "targets": ["q_proj", "v_proj"]},
    "data": {"path": "d.jsonl", "max_seq_length": 512, "system": "terse"},
    "train": {"iters": 10, "batch_size": 2, "learning_rate": 1e-4, "seed": 3},
    "out": "runs/x",
}
KEYS = [(s, k) for s, keys in RECIPE.items() if isinstance(keys, dict) for k in keys]
KEYS += [("train", "epochs"), ("train", "max_grad_norm"), ("lora", "layers"), ("zz", "top")]
any_value = json_values | st.sampled_from([math.nan, math.inf, -math.inf, 10**400, 0, -1, ""])


@st.composite
def mutated_recipe(draw) -> dict:
    recipe = json.loads(json.dumps(RECIPE))
    for _ in range(draw(st.integers(1, 4))):
        section, key = draw(st.sampled_from(KEYS))
        if draw(st.integers(0, 5)) == 0:
            recipe[section] = draw(any_value)  # a whole section of the wrong kind
        else:
            node = recipe.setdefault(section, {})
            if isinstance(node, dict):
                node[draw(st.sampled_from([key, key + "x", "unknown"]))] = draw(any_value)
    return recipe


@pytest.mark.once
@fuzz(1500)
@given(recipe=mutated_recipe(), sets=st.lists(st.text(max_size=30), max_size=3))
def test_mutated_recipes_validate_or_get_one_clean_line(recipe, sets):
    def work():
        raw = json.loads(json.dumps(recipe, allow_nan=True))
        for item in sets:
            apply_override(raw, *parse_set(item))
        validate(raw, "r.yaml")

    loads_or_one_clean_line(work)


@pytest.mark.once
@fuzz(500)
@given(
    edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=6),
    cut=st.none() | st.integers(0, 10**6),
)
def test_mutated_recipe_files_read_or_get_one_clean_line(tmp_path, edits, cut):
    raw = bytearray(yaml.safe_dump(RECIPE).encode())
    for pos, byte in edits:
        raw[pos % len(raw)] = byte
    path = tmp_path / "r.yaml"
    path.write_bytes(bytes(raw[: cut % len(raw)] if cut is not None else raw))
    loads_or_one_clean_line(lambda: validate(read_recipe_file(path), str(path)))


# --- GGUF headers ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[bytes, int]:
    """A tiny llama GGUF (F16/F32 tensors) and where its tensor data starts."""
    path = write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", build_tiny_model(),
                      TINY_CONFIG)  # fmt: skip
    return path.read_bytes(), gguf.GGUFReader(str(path)).data_offset


@fuzz(800)
@given(
    edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=6),
    cut=st.none() | st.integers(0, 10**6),
    load=st.integers(0, 3),
)
def test_mutated_gguf_headers_load_or_get_one_clean_line(tmp_path, tiny_gguf, edits, cut, load):
    good, header = tiny_gguf
    raw = bytearray(good)
    for pos, byte in edits:  # the magic, counts, metadata keys, types, values, tensor infos
        raw[pos % header] = byte
    path = tmp_path / "m.gguf"
    path.write_bytes(bytes(raw[: cut % len(raw)] if cut is not None else raw))
    loads_or_one_clean_line(lambda: (gguf_config(path), gguf_tokenizer(path)))
    if load == 0:  # the whole model too, a quarter of the time (slower)
        loads_or_one_clean_line(lambda: load_base(str(path), compute="float32"))


def test_the_fuzz_starts_from_files_that_load(tmp_path, tokenizer, tiny_gguf):
    """The unmutated inputs work: the mutations, not the seeds, make the errors."""
    for fmt, lines in VALID_LINES.items():
        path = tmp_path / f"{fmt}.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in lines))
        assert load_data(path, tokenizer, 64, 0.2, 0)[2].format == fmt
    assert validate(json.loads(json.dumps(RECIPE)), "r.yaml")["train"]["iters"] == 10
    good, _ = tiny_gguf
    Path(tmp_path / "m.gguf").write_bytes(good)
    assert load_base(str(tmp_path / "m.gguf"), compute="float32").config["num_hidden_layers"] == 2
