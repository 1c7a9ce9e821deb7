"""Read a .jsonl data file and check every line, collecting all problems into one DataError."""

import json
from pathlib import Path

from macft.config.validate import shown
from macft.errors import DataError

ROLES = ("system", "user", "assistant")
TOOL_ROLES = ("tool", "function", "ipython")  # OpenAI's and Llama's tool messages
FORMAT_NAMES = {
    "chat": '{"messages": [...]}',
    "completion": '{"prompt", "completion"}',
    "text": '{"text"}',
    "preference": '{"prompt", "chosen", "rejected"}',
}
HOW = (
    'each line needs one of: {"messages": [{"role": "user", "content": ...}, ...]}, '
    '{"prompt": ..., "completion": ...} or {"text": ...} (preference pairs: '
    '{"prompt": ..., "chosen": ..., "rejected": ...})'
)
SIDES = ("chosen", "rejected")


def _kind(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "true/false"}.get(
        type(value), "null" if value is None else "a number"
    )


def detect_format(rec: dict) -> str | None:
    if "chosen" in rec or "rejected" in rec:
        return "preference"
    if "messages" in rec:
        return "chat"
    if "prompt" in rec or "completion" in rec:
        return "completion"
    if "text" in rec:
        return "text"
    return None


def _text_parts(content) -> bool:
    """OpenAI's content parts that are all text: [{"type": "text", "text": "..."}, ...]."""
    return (
        isinstance(content, list)
        and bool(content)
        and all(isinstance(p, dict) and p.get("type") == "text" for p in content)
        and all(isinstance(p.get("text"), str) for p in content)
    )


def _flatten(rec: dict) -> None:
    """Text-only content parts become the one string they carry, as chat templates join them."""
    msgs = rec.get("messages")
    for m in msgs if isinstance(msgs, list) else ():
        if isinstance(m, dict) and _text_parts(m.get("content")):
            m["content"] = "".join(p["text"] for p in m["content"])


def _content_problem(n: int, role: str, content) -> str:
    if isinstance(content, list) and content and all(isinstance(p, dict) for p in content):
        i, part = next(
            (i, p)
            for i, p in enumerate(content, 1)
            if p.get("type") != "text" or not isinstance(p.get("text"), str)
        )
        kind = str(part.get("type"))[:40]
        what = "has no 'text' string" if kind == "text" else f"is {kind!r}, not text"
        return f"message {n} ({role}): content part {i} {what}; only text trains: remove that part"
    return (
        f"message {n} ({role}): 'content' is {_kind(content)}; it must be a string (or "
        'OpenAI\'s text parts [{"type": "text", "text": ...}])'
    )


def _check_chat(msgs) -> str | None:
    if not isinstance(msgs, list) or not msgs:
        kind = "an empty list" if msgs == [] else _kind(msgs)
        return f"'messages' is {kind}; it must be a non-empty list of {{role, content}} objects"
    prev = None
    for n, m in enumerate(msgs, 1):
        if not isinstance(m, dict):
            return f'message {n} is {_kind(m)}; write it as {{"role": ..., "content": ...}}'
        role, content = m.get("role"), m.get("content")
        if m.get("tool_calls") or role in TOOL_ROLES:
            return (
                f"message {n}: tool calls ({'tool_calls' if m.get('tool_calls') else role!r}) "
                "cannot train here; drop those messages, or write each call and its result as "
                "text in the assistant's and the user's content"
            )
        if "role" not in m or "content" not in m:
            missing = "role" if "role" not in m else "content"
            return f"message {n} has no '{missing}'; each message needs 'role' and 'content'"
        if not isinstance(role, str):
            return f"message {n}: 'role' is {_kind(role)}; it must be a string"
        if role not in ROLES:
            return f"message {n}: unknown role {role[:40]!r}; use one of {', '.join(ROLES)}"
        if not isinstance(content, str):
            return _content_problem(n, role, content)
        if not content.strip():
            return f"message {n} ({role}): empty content; write the text or remove the message"
        if role == "system" and n != 1:
            return f"message {n}: a system message must come first"
        # Plain alternation is what every chat template accepts.
        want = "user" if prev in (None, "system", "assistant") else "assistant"
        if role != "system" and role != want:
            return f"message {n}: expected '{want}' after '{prev or 'start'}'; turns must alternate user, assistant"
        prev = role
    if not any(m["role"] == "assistant" for m in msgs):
        return "no assistant message; add the reply the model should learn"
    if prev != "assistant":
        return f"the last message is '{prev}'; a conversation must end with an assistant reply"
    return None


def _answer(value) -> str | None:
    """A preference answer as text: a string, an assistant message or a list of one (TRL)."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict) and value.get("role") == "assistant":
        value = value.get("content")
        value = "".join(p["text"] for p in value) if _text_parts(value) else value
    return value if isinstance(value, str) else None


def _check_preference(rec: dict) -> str | None:
    """A pair: a prompt (text, or messages ending with the user's), two different answers.
    The answers become plain text in place, as _flatten does for messages."""
    for side in SIDES:
        if side not in rec:
            other = SIDES[1 - SIDES.index(side)]
            return f"has '{other}' but no '{side}'; a preference pair needs both answers"
    if "prompt" not in rec:
        return "no 'prompt'; a preference pair needs the prompt both answers reply to"
    prompt = rec["prompt"]
    if isinstance(prompt, list):
        _flatten({"messages": prompt})
        # the prompt is a conversation waiting for the reply: checked as one with a reply
        problem = _check_chat([*prompt, {"role": "assistant", "content": "-"}])
        if problem:
            return f"'prompt': {problem}"
    elif not isinstance(prompt, str):
        return f"'prompt' is {_kind(prompt)}; it must be a string or a list of messages"
    elif not prompt.strip():
        return "empty 'prompt'; write the question both answers reply to"
    for side in SIDES:
        text = _answer(rec[side])
        if text is None:
            return (
                f"'{side}' is {_kind(rec[side])}; it must be a string or an assistant message "
                '{"role": "assistant", "content": ...}'
            )
        if not text.strip():
            return f"empty '{side}'; a preference pair needs two answers"
        rec[side] = text
    if rec["chosen"].strip() == rec["rejected"].strip():
        return "'chosen' and 'rejected' are the same answer; a pair teaches nothing: remove it"
    return None


def _check_fields(rec: dict, fmt: str) -> str | None:
    if fmt == "chat":
        return _check_chat(rec["messages"])
    if fmt == "preference":
        return _check_preference(rec)
    keys = ("prompt", "completion") if fmt == "completion" else ("text",)
    for key in keys:
        if key not in rec:
            return f"has '{keys[0] if key == keys[1] else keys[1]}' but no '{key}'; {HOW}"
        if not isinstance(rec[key], str):
            return f"'{key}' is {_kind(rec[key])}; it must be a string"
    last = keys[-1]
    if not rec[last].strip():
        return f"empty '{last}'; there is nothing to learn from this line"
    return None


class _Refused(ValueError):
    """A JSON line that parses but is no data: a duplicate key, NaN or Infinity."""


def _no_duplicates(pairs: list) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = set()
        key = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _Refused(f"the key {key[:40]!r} appears twice in one object; keep one")
    return out


def _no_constant(token: str):
    raise _Refused(f"{token} is not valid JSON (and no text to train on); write null or a number")


def _json(text: str) -> tuple[object, str | None]:
    """json.loads, strict: every way a line can fail is a problem string, never a traceback."""
    try:
        rec = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        near = text[max(0, e.pos - 15) : e.pos + 15]
        return None, (
            f"bad JSON: {e.msg} at column {e.colno} (near {near!r}); each line must be one JSON object"
        )
    except _Refused as e:
        return None, str(e)
    except ValueError:  # Python refuses integers of more than 4300 digits
        return None, "a number of thousands of digits; no data line holds one: remove it"
    except RecursionError:
        return None, "nested more than ~1000 levels deep; no data line is: fix the line"
    if "\\u" in text and _lone_surrogate(rec):
        return None, (
            "holds a lone surrogate (a \\ud800-\\udfff escape without its pair), which is not "
            "text; fix or remove that escape"
        )
    return rec, None


def _lone_surrogate(rec) -> bool:
    try:
        json.dumps(rec, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _parse_line(raw: bytes) -> tuple[dict | None, str | None]:
    """One line -> (record, None) or (None, problem)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, (
            f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
            "save the file as UTF-8"
        )
    if text.startswith("\ufeff"):
        return None, (
            "starts with a byte order mark (U+FEFF), as when files are joined; "
            "delete it (only the file's very first line may have one)"
        )
    rec, problem = _json(text)
    if problem is None and not isinstance(rec, dict):
        problem = f"expected a JSON object {{...}}, got {_kind(rec)}; {HOW}"
    return (rec, None) if problem is None else (None, problem)


# Files that are not JSON lines text at all: (leading bytes, what it is, how to fix it).
MAGIC = (
    (b"\x1f\x8b", "gzip-compressed", "decompress it first (gunzip)"),
    (b"PK\x03\x04", "a zip archive", "unzip it and give the .jsonl inside"),
    (b"BZh", "bzip2-compressed", "decompress it first (bunzip2)"),
    (b"\xfd7zXZ\x00", "xz-compressed", "decompress it first (unxz)"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed", "decompress it first (unzstd)"),
    (b"PAR1", "a Parquet file", "convert it to JSON lines (e.g. pandas: df.to_json(lines=True))"),
)
UTF16_32 = (  # byte order marks, longest first
    (b"\x00\x00\xfe\xff", "UTF-32"),
    (b"\xff\xfe\x00\x00", "UTF-32"),
    (b"\xfe\xff", "UTF-16"),
    (b"\xff\xfe", "UTF-16"),
)


def _encoding(data: bytes) -> str | None:
    """UTF-16 or UTF-32 text, by its byte order mark or by the NUL bytes beside ASCII ones."""
    for bom, name in UTF16_32:
        if data.startswith(bom):
            return name
    head = data[:400]
    if len(head) >= 8 and head.count(0) * 4 >= len(head) * 3 - 4:
        return "UTF-32"
    if len(head) >= 4 and (
        head[1::2].count(0) * 2 >= len(head) // 2 or head[::2].count(0) * 2 >= len(head) // 2
    ):
        return "UTF-16"
    return None


def _file_problem(path: Path, data: bytes) -> str | None:
    """What makes a whole file unreadable as JSON lines: its encoding, a binary format, one array."""
    if enc := _encoding(data):
        return f"the file is {enc} text; save it as UTF-8 (e.g. iconv -f {enc} -t UTF-8)"
    for magic, what, fix in MAGIC:
        if data.startswith(magic):
            return f"the file is {what}, not JSON lines text; {fix}"
    if b"\x00" in data[: 1 << 16]:
        return f"the file is binary (it holds NUL bytes), not JSON lines text; {HOW}"
    if data.lstrip().startswith(b"["):
        whole, _ = _json(data.decode("utf-8", errors="replace"))
        if isinstance(whole, list) and any(isinstance(x, dict) for x in whole):
            return (
                "the file is one JSON array, not one JSON object per line (JSON Lines); "
                f"write each element on a line of its own, e.g. jq -c '.[]' {path.name}"
            )
    return None


def _raise(problems: list[str]) -> None:
    more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
    raise DataError(problems[0] + more)


def _lines(data: bytes) -> list[bytes]:
    # Old Mac files end lines with a lone CR; a raw CR cannot be inside a JSON string.
    return data.split(b"\r" if b"\n" not in data else b"\n")


def _problem(rec: dict, fmt: str | None, first_line: int | None, n: int) -> str | None:
    """What is wrong with a parsed line given the file's format so far (None: nothing)."""
    line_fmt = detect_format(rec)
    if line_fmt is None:
        keys = ", ".join(shown(k)[:40] for k in list(rec)[:8]) or "none"
        return f"no known keys (found: {keys}); {HOW}"
    if fmt is not None and line_fmt != fmt:
        return (
            f"line {n} is {FORMAT_NAMES[line_fmt]} while line {first_line} was "
            f"{FORMAT_NAMES[fmt]}; use one format per file"
        )
    _flatten(rec)
    return _check_fields(rec, line_fmt)


def read_jsonl_numbered(path: Path) -> tuple[list[tuple[int, dict]], str]:
    """(line number, record) for each line of a .jsonl file, and their format."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror}") from e
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]  # a UTF-8 BOM, as Windows editors write it
    elif problem := _file_problem(path, data):
        _raise([f"{path}:1: {problem}"])
    records, problems = [], []
    fmt = first_line = None
    for n, raw in enumerate(_lines(data), 1):
        if not raw.strip():
            continue  # blank lines carry nothing
        rec, problem = _parse_line(raw)
        if rec is not None:
            problem = _problem(rec, fmt, first_line, n)
            if fmt is None and detect_format(rec) is not None:
                fmt, first_line = detect_format(rec), n
        if problem:
            problems.append(f"{path}:{n}: {problem}")
        else:
            records.append((n, rec))
    if problems:
        _raise(problems)
    if not records:
        _raise([f"{path}:1: no data (the file is empty or has only blank lines); {HOW}"])
    return records, fmt


def read_jsonl(path: Path) -> tuple[list[dict], str]:
    """Return the records of a .jsonl file and their format ("chat", "completion" or "text")."""
    numbered, fmt = read_jsonl_numbered(path)
    return [rec for _, rec in numbered], fmt
