"""Data loading: formats, loss masks, truncation, splits, and one clear error per bad file."""

import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT, SHARED_DATA, build_tiny_hf_tokenizer
from mlx_lm.tokenizer_utils import TokenizerWrapper

from macft.data.dataset import DataReport, load_data
from macft.data.encode import Example, encode_record
from macft.data.heldout import make_case
from macft.data.jsonl import read_jsonl
from macft.errors import DataError

SYS = "You are terse."


def write(path: Path, lines) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n"
    path.write_text(text, encoding="utf-8")
    return path


def chat(*turns, system=None):
    msgs = [{"role": "system", "content": system}] if system else []
    roles = ["user", "assistant"]
    return {"messages": msgs + [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]}


def runs(tok, ex: Example) -> list[str]:
    """Decode each contiguous run of target tokens."""
    out, start = [], None
    for i, m in enumerate([*ex.mask.tolist(), False]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            out.append(tok.decode(ex.ids[start:i].tolist()))
            start = None
    return out


def no_template_tokenizer():
    hf = build_tiny_hf_tokenizer()
    hf.chat_template = None
    return TokenizerWrapper(hf)


# ---------------------------------------------------------------- masks


def test_chat_multi_turn_masks_every_assistant_turn(tiny_tokenizer):
    rec = chat("Q one", "A one", "Q two", "A two", system="S here")
    ex = encode_record(rec, "chat", tiny_tokenizer)
    assert ex.ids.dtype == np.int32 and ex.mask.dtype == np.bool_ and len(ex.ids) == len(ex.mask)
    assert runs(tiny_tokenizer, ex) == ["A one<|im_end|>", "A two<|im_end|>"]
    full = tiny_tokenizer.apply_chat_template(rec["messages"], tokenize=False)
    assert tiny_tokenizer.decode(ex.ids.tolist()) == full
    masked = tiny_tokenizer.decode(ex.ids[ex.mask].tolist())
    for never in ("S here", "Q one", "Q two", "user", "system", "<|im_start|>"):
        assert never not in masked


def test_chat_ids_match_mlx_lm_tokenization(tiny_tokenizer):
    rec = chat("hi", "hello")
    ex = encode_record(rec, "chat", tiny_tokenizer)
    assert ex.ids.tolist() == list(tiny_tokenizer.apply_chat_template(rec["messages"]))


def test_system_argument_inserted_only_when_missing(tiny_tokenizer):
    ex = encode_record(chat("q", "a"), "chat", tiny_tokenizer, system=SYS)
    assert tiny_tokenizer.decode(ex.ids.tolist()).startswith(f"<|im_start|>system\n{SYS}<|im_end|>")
    own = encode_record(chat("q", "a", system="mine"), "chat", tiny_tokenizer, system=SYS)
    text = tiny_tokenizer.decode(own.ids.tolist())
    assert "mine" in text and SYS not in text


def test_completion_through_chat_template(tiny_tokenizer):
    ex = encode_record({"prompt": "What?", "completion": "That."}, "completion", tiny_tokenizer)
    assert "<|im_start|>user\nWhat?" in tiny_tokenizer.decode(ex.ids.tolist())
    assert runs(tiny_tokenizer, ex) == ["That.<|im_end|>"]


class NoFlag:
    """A tokenizer with a chat template but no has_chat_template flag to say so."""

    def __init__(self, tokenizer):
        self._tok = tokenizer

    def __getattr__(self, name):
        if name == "has_chat_template":
            raise AttributeError(name)
        return getattr(self._tok, name)


@pytest.mark.parametrize("flag", [True, False])
def test_eval_prompts_are_the_prompts_training_saw(flag):
    """Train and eval decide alike whether completion data goes through the chat template: the
    eval prompt is exactly the tokens before the first target of the training example."""
    tok = TokenizerWrapper(build_tiny_hf_tokenizer())
    tok = tok if flag else NoFlag(tok)
    rec = {"prompt": "show routes in junos?", "completion": "show route"}
    ex = encode_record(rec, "completion", tok)
    case = make_case(1, rec, "completion", tok, "A: ")
    first = int(np.argmax(ex.mask))
    assert case.prompt.endswith("<|im_start|>assistant\n")  # through the template
    assert list(ex.ids[:first]) == case.prompt_ids


def test_completion_without_chat_template_is_plain_text():
    tok = no_template_tokenizer()
    ex = encode_record({"prompt": "Q: 2+2\nA:", "completion": " 4"}, "completion", tok)
    assert tok.decode(ex.ids.tolist()) == "Q: 2+2\nA: 4<|im_end|>"
    assert runs(tok, ex) == [" 4<|im_end|>"]


def test_text_masks_everything_but_the_first_token(tiny_tokenizer):
    ex = encode_record({"text": "hello"}, "text", tiny_tokenizer)
    assert tiny_tokenizer.decode(ex.ids.tolist()) == "hello<|im_end|>"
    assert not ex.mask[0] and ex.mask[1:].all()


def test_chat_needs_a_chat_template():
    with pytest.raises(DataError, match="chat template"):
        encode_record(chat("q", "a"), "chat", no_template_tokenizer())


def test_template_that_rewrites_history_falls_back_to_offsets():
    # Like Qwen3: only the last assistant turn gets an (empty) think block.
    hf = build_tiny_hf_tokenizer()
    hf.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' and loop.last %}<think></think>{% endif %}"
        "{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tok = TokenizerWrapper(hf)
    ex = encode_record(chat("Q1", "A1", "Q2", "A2"), "chat", tok)
    assert runs(tok, ex) == ["A1<|im_end|>", "A2<|im_end|>"]


class Counted:
    """Counts the chat-template renders and the tokenizations of an HF tokenizer."""

    def __init__(self, hf):
        self.renders = self.encodes = 0
        render, encode = hf.apply_chat_template, hf._encode_plus

        def counted_render(*a, **kw):
            self.renders += 1
            return render(*a, **kw)

        def counted_encode(*a, **kw):
            self.encodes += 1
            return encode(*a, **kw)

        hf.apply_chat_template, hf._encode_plus = counted_render, counted_encode


def long_chat(turns: int) -> dict:
    return chat(
        *(f"question {i} about bgp?" if i % 2 == 0 else f"answer {i}" for i in range(turns))
    )


def test_a_conversation_of_thousands_of_turns_encodes_in_linear_time():
    hf = build_tiny_hf_tokenizer()
    counted, tok = Counted(hf), TokenizerWrapper(hf)
    ex = encode_record(long_chat(200), "chat", tok)
    # a few renders and one tokenization, however many turns (each turn's prefix: 2 x 100)
    assert counted.renders <= 6 and counted.encodes <= 2, (counted.renders, counted.encodes)
    assert runs(tok, ex) == [f"answer {i}<|im_end|>" for i in range(1, 200, 2)]
    t = time.perf_counter()
    ex = encode_record(long_chat(4000), "chat", tok)
    assert time.perf_counter() - t < 5 and len(runs(tok, ex)) == 2000


@pytest.mark.parametrize(
    "record",
    [chat("q", "a"), chat("q", "a", "q2", "a2", system=SYS), chat(" héllo ", "wörld \n", "x", " y"),
     long_chat(60), chat("<|im_end|>", "a<|im_start|>b")],
    ids=["one-turn", "system", "spaces-and-accents", "60-turns", "special-tokens-in-text"],
)  # fmt: skip
def test_one_render_gives_the_masks_of_rendering_each_prefix(tiny_tokenizer, record):
    from macft.data.encode import _encode_chat_by_prefixes

    fast = encode_record(record, "chat", tiny_tokenizer)
    slow = _encode_chat_by_prefixes(tiny_tokenizer, record["messages"])
    assert fast.ids.tolist() == slow.ids.tolist() and fast.mask.tolist() == slow.mask.tolist()


def test_template_that_rejects_system_gives_data_error(tmp_path):
    hf = build_tiny_hf_tokenizer()
    hf.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}" + hf.chat_template
    )
    path = write(tmp_path / "d.jsonl", [chat("q", "a", system="s")])
    with pytest.raises(DataError, match=r"d\.jsonl:1: .*System role not supported"):
        load_data(path, TokenizerWrapper(hf), 64, 0.0, 0)


def test_system_argument_applies_to_completion_data(tiny_tokenizer):
    ex = encode_record({"prompt": "p", "completion": "c"}, "completion", tiny_tokenizer, system=SYS)
    assert SYS in tiny_tokenizer.decode(ex.ids.tolist())
    assert runs(tiny_tokenizer, ex) == ["c<|im_end|>"]


# ---------------------------------------------------------------- formats and load_data


@pytest.mark.parametrize(
    "record, fmt",
    [
        (chat("q", "a"), "chat"),
        ({"prompt": "p", "completion": "c", "id": 7}, "completion"),
        ({"text": "t", "meta": {"x": 1}}, "text"),
    ],
)
def test_every_format_parses(tmp_path, tiny_tokenizer, record, fmt):
    path = write(tmp_path / "d.jsonl", [record, record, record])
    records, got = read_jsonl(path)
    assert got == fmt and len(records) == 3
    train, valid, rep = load_data(path, tiny_tokenizer, 512, 0.0, 0)
    assert isinstance(rep, DataReport) and rep.format == fmt
    assert (rep.n_train, rep.n_valid, len(train), len(valid)) == (3, 0, 3, 0)
    assert rep.train_tokens == sum(rep.lengths) == sum(len(e.ids) for e in train)
    assert rep.train_target_tokens == sum(int(e.mask.sum()) for e in train)


def test_truncation_is_counted(tmp_path, tiny_tokenizer):
    path = write(tmp_path / "d.jsonl", [{"text": "x" * 100}, {"text": "short"}])
    train, _, rep = load_data(path, tiny_tokenizer, 20, 0.0, 0)
    assert rep.n_truncated == 1 and rep.n_dropped == 0
    assert sorted(rep.lengths) == [6, 20] and max(len(e.ids) for e in train) == 20


def test_examples_without_targets_after_cut_are_dropped(tmp_path, tiny_tokenizer):
    long_prompt = {"prompt": "p" * 200, "completion": "c"}
    path = write(tmp_path / "d.jsonl", [long_prompt, {"prompt": "p", "completion": "c"}])
    train, _, rep = load_data(path, tiny_tokenizer, 64, 0.0, 0)
    assert (rep.n_train, rep.n_truncated, rep.n_dropped) == (1, 1, 1)


def test_all_too_long_names_the_key(tmp_path, tiny_tokenizer):
    path = write(tmp_path / "d.jsonl", [{"prompt": "p" * 300, "completion": "c"}] * 2)
    with pytest.raises(DataError, match=r"data\.max_seq_length") as e:
        load_data(path, tiny_tokenizer, 64, 0.0, 0)
    longest = int(re.search(r"longest has (\d+) tokens", str(e.value)).group(1))
    assert longest > 300


def make_lines(n):
    return [{"text": f"line {i}"} for i in range(n)]


def test_file_holds_out_valid_split(tmp_path, tiny_tokenizer):
    path = write(tmp_path / "d.jsonl", make_lines(50))
    train, valid, rep = load_data(path, tiny_tokenizer, 64, 0.1, 0)
    assert (rep.n_train, rep.n_valid) == (45, 5)
    assert rep.sources == {"train": str(path), "valid": f"held out from {path}: 5 lines"}


def test_split_is_deterministic_by_seed(tmp_path, tiny_tokenizer):
    path = write(tmp_path / "d.jsonl", make_lines(50))

    def valid_texts(seed):
        _, valid, _ = load_data(path, tiny_tokenizer, 64, 0.2, seed)
        return [tiny_tokenizer.decode(e.ids.tolist()) for e in valid]

    assert valid_texts(1) == valid_texts(1)
    assert valid_texts(1) != valid_texts(2)


def test_small_file_still_gets_one_valid_example(tmp_path, tiny_tokenizer):
    _, valid, rep = load_data(
        write(tmp_path / "d.jsonl", make_lines(2)), tiny_tokenizer, 64, 0.01, 0
    )
    assert (rep.n_train, rep.n_valid, len(valid)) == (1, 1, 1)
    _, _, rep = load_data(write(tmp_path / "e.jsonl", make_lines(1)), tiny_tokenizer, 64, 0.1, 0)
    assert (rep.n_train, rep.n_valid) == (1, 0)


def test_folder_with_valid_file(tmp_path, tiny_tokenizer):
    write(tmp_path / "ds" / "train.jsonl", make_lines(10))
    write(tmp_path / "ds" / "valid.jsonl", make_lines(3))
    _, _, rep = load_data(tmp_path / "ds", tiny_tokenizer, 64, 0.1, 0)
    assert (rep.n_train, rep.n_valid) == (10, 3)
    assert rep.sources["valid"] == str(tmp_path / "ds" / "valid.jsonl")


def test_folder_without_valid_file_holds_out(tmp_path, tiny_tokenizer):
    write(tmp_path / "ds" / "train.jsonl", make_lines(10))
    _, _, rep = load_data(str(tmp_path / "ds"), tiny_tokenizer, 64, 0.2, 0)
    assert (rep.n_train, rep.n_valid) == (8, 2)
    assert rep.sources["valid"].startswith("held out from")


def test_folder_valid_in_another_format(tmp_path, tiny_tokenizer):
    write(tmp_path / "ds" / "train.jsonl", make_lines(3))
    write(tmp_path / "ds" / "valid.jsonl", [{"prompt": "p", "completion": "c"}])
    with pytest.raises(DataError, match="valid.jsonl: .*same format"):
        load_data(tmp_path / "ds", tiny_tokenizer, 64, 0.1, 0)


def test_missing_paths_name_what_is_there(tmp_path, tiny_tokenizer):
    write(tmp_path / "ds" / "data.jsonl", make_lines(3))
    with pytest.raises(DataError, match="no train.jsonl.*data.jsonl"):
        load_data(tmp_path / "ds", tiny_tokenizer, 64, 0.1, 0)
    with pytest.raises(DataError, match="does not exist.*ds/"):
        load_data(tmp_path / "nope.jsonl", tiny_tokenizer, 64, 0.1, 0)


# ---------------------------------------------------------------- bad files


def test_utf8_bom_blank_lines_and_crlf_are_fine(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "a"}\r\n\r\n   \n{"text": "b"}\r\n\n')
    records, fmt = read_jsonl(path)
    assert fmt == "text" and [r["text"] for r in records] == ["a", "b"]


def test_lone_cr_line_endings_are_lines(tmp_path):
    """Old Mac files end lines with CR alone; a raw CR cannot sit inside a JSON string."""
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "a"}\r{"text": "b\\rc"}\r\r')
    records, fmt = read_jsonl(path)
    assert fmt == "text" and [r["text"] for r in records] == ["a", "b\rc"]


def test_openai_text_parts_are_the_text_they_carry(tiny_tokenizer, tmp_path):
    parts = [{"type": "text", "text": "show bgp "}, {"type": "text", "text": "summary?"}]
    line = {"messages": [{"role": "user", "content": parts},
                         {"role": "assistant", "content": [{"type": "text", "text": "ok"}]}]}  # fmt: skip
    path = write(tmp_path / "d.jsonl", [line])
    records, _ = read_jsonl(path)
    assert records[0] == chat("show bgp summary?", "ok")
    train, _, _ = load_data(path, tiny_tokenizer, 64, 0.0, 0)
    assert runs(tiny_tokenizer, train[0]) == ["ok<|im_end|>"]


def bad(tmp_path, lines) -> DataError:
    path = tmp_path / "bad.jsonl"
    if isinstance(lines, bytes):
        path.write_bytes(lines)
    else:
        write(path, lines)
    with pytest.raises(DataError) as e:
        read_jsonl(path)
    return e.value


OK = chat("q", "a")
BAD_CASES = {
    "bad_json": ([OK, '{"text": "x",}'], 2, "bad JSON: .* column 14"),
    "not_object": ([OK, "[1, 2]"], 2, "expected a JSON object"),
    "missing_keys": ([{"question": "q"}], 1, "no known keys .*question.*prompt"),
    "missing_completion": ([{"prompt": "q"}], 1, "no 'completion'"),
    "wrong_type": ([{"prompt": "q", "completion": 5}], 1, "'completion' is a number"),
    "messages_not_list": ([{"messages": "hi"}], 1, "non-empty list"),
    "unknown_role": (
        [{"messages": [{"role": "bot", "content": "x"}]}],
        1,
        "unknown role 'bot'; use one of system, user, assistant",
    ),
    # a mutated file's role of 5,000 characters: the line names the start of it, not all of it
    "huge_role": (
        [{"messages": [{"role": "[" * 5000 + "user", "content": "x"}]}],
        1,
        "unknown role '\\[{40}'; use one of",
    ),
    "empty_content": ([chat("q", "  ")], 1, "message 2 \\(assistant\\): empty content"),
    "content_not_str": (
        [{"messages": [{"role": "user", "content": ["x"]}]}],
        1,
        "'content' is a list",
    ),
    "system_not_first": (
        [{"messages": [*OK["messages"], {"role": "system", "content": "s"}]}],
        1,
        "system message must come first",
    ),
    "no_assistant": ([{"messages": [{"role": "user", "content": "q"}]}], 1, "no assistant message"),
    "ends_with_user": ([chat("q", "a", "q2")], 1, "must end with an assistant"),
    "no_alternation": (
        [{"messages": [{"role": "user", "content": "q"}] * 2}],
        1,
        "expected 'assistant' after 'user'",
    ),
    "assistant_first": (
        [{"messages": [{"role": "assistant", "content": "a"}]}],
        1,
        "expected 'user' after 'start'",
    ),
    "mixed_formats": (
        [OK, "", {"text": "t"}],
        3,
        'line 3 is {"text"} while line 1 was {"messages"',
    ),
    "empty_text": ([{"text": ""}], 1, "empty 'text'"),
    "empty_file": ([""], 1, "no data"),
    "only_blank": (["", "  ", ""], 1, "no data"),
}


@pytest.mark.parametrize("name", BAD_CASES)
def test_bad_lines_name_file_and_line(tmp_path, name):
    lines, line_no, pattern = BAD_CASES[name]
    err = bad(tmp_path, lines)
    msg = str(err)
    assert msg.startswith(f"{tmp_path / 'bad.jsonl'}:{line_no}: "), msg
    assert re.search(pattern, msg), msg
    assert "\n" not in msg


def test_non_utf8_bytes_report_the_line(tmp_path):
    err = bad(tmp_path, b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    assert str(err).startswith(f"{tmp_path / 'bad.jsonl'}:2: not UTF-8")


def test_all_problems_collected(tmp_path):
    err = bad(tmp_path, [OK, "nope", OK, "[]", {"x": 1}])
    # the first problem in full (file:line), the count of the others
    assert str(err).startswith(f"{tmp_path / 'bad.jsonl'}:2: ")
    assert str(err).endswith("(and 2 more problems)")


def test_huge_line_neither_crashes_nor_hangs(tmp_path, tiny_tokenizer):
    path = write(tmp_path / "d.jsonl", [{"text": "word " * 2_000_000}, {"text": "short"}])
    t = time.perf_counter()
    train, _, rep = load_data(path, tiny_tokenizer, 128, 0.0, 0)
    assert time.perf_counter() - t < 20
    assert rep.n_truncated == 1 and rep.lengths[0] == 128


# ---------------------------------------------------------------- shipped and shared data


def test_shipped_net_example_loads(tiny_tokenizer):
    path = ROOT / "examples" / "net.jsonl"
    records, fmt = read_jsonl(path)
    assert fmt == "chat" and len(records) >= 250
    assert any(
        m["content"] == "show bgp summary"
        for r in records
        for m in r["messages"]
        if m["role"] == "assistant"
    )
    train, valid, rep = load_data(path, tiny_tokenizer, 1024, 0.1, 0)
    assert rep.n_truncated == 0 and rep.n_dropped == 0
    assert rep.n_train + rep.n_valid == len(records) and rep.n_valid >= 25


def shared(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"{path} is not here (only in the development checkout)")
    return path


def test_shared_wikisql_loads_fast(tiny_tokenizer):
    path = shared("wikisql")
    t = time.perf_counter()
    train, valid, rep = load_data(path / "train.jsonl", tiny_tokenizer, 2048, 0.1, 0)
    assert time.perf_counter() - t < 30
    assert rep.format == "text" and (rep.n_train, rep.n_valid) == (900, 100)
    _, _, rep = load_data(path, tiny_tokenizer, 2048, 0.1, 0)
    assert (rep.n_train, rep.n_valid) == (1000, 100)


def test_shared_superbowl_loads(tiny_tokenizer):
    train, valid, rep = load_data(shared("superbowl"), tiny_tokenizer, 4096, 0.1, 0)
    assert rep.format == "completion" and (rep.n_train, rep.n_valid) == (1800, 144)
    assert rep.n_truncated == 0
    assert all(not e.mask[:10].any() for e in train[:20])  # the prompt carries no loss


@pytest.mark.real
def test_one_render_gives_the_prefix_masks_with_smollm2s_tokenizer(smollm2_gguf):
    """SmolLM2's template adds a default system prompt and its BPE merges across spaces."""
    from macft.data.encode import _encode_chat_by_prefixes
    from macft.models.gguf import gguf_tokenizer

    tok = gguf_tokenizer(smollm2_gguf)
    records, _ = read_jsonl(ROOT / "macft" / "examples" / "net.jsonl")
    for record in [*records[:20], long_chat(40), chat(" a ", " b\n", "c", "d", system=SYS)]:
        fast = encode_record(record, "chat", tok)
        slow = _encode_chat_by_prefixes(tok, record["messages"])
        assert fast.ids.tolist() == slow.ids.tolist() and fast.mask.tolist() == slow.mask.tolist()
