"""Read a .jsonl data file and check every line, collecting all problems into one DataError."""

import json
from pathlib import Path

from macft.errors import DataError

ROLES = ("system", "user", "assistant")
FORMAT_NAMES = {
    "chat": '{"messages": [...]}',
    "completion": '{"prompt", "completion"}',
    "text": '{"text"}',
}
HOW = (
    'each line needs one of: {"messages": [{"role": "user", "content": ...}, ...]}, '
    '{"prompt": ..., "completion": ...} or {"text": ...}'
)


def _kind(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "true/false"}.get(
        type(value), "null" if value is None else "a number"
    )


def detect_format(rec: dict) -> str | None:
    if "messages" in rec:
        return "chat"
    if "prompt" in rec or "completion" in rec:
        return "completion"
    if "text" in rec:
        return "text"
    return None


def _check_chat(msgs) -> str | None:
    if not isinstance(msgs, list) or not msgs:
        kind = "an empty list" if msgs == [] else _kind(msgs)
        return f"'messages' is {kind}; it must be a non-empty list of {{role, content}} objects"
    prev = None
    for n, m in enumerate(msgs, 1):
        if not isinstance(m, dict):
            return f'message {n} is {_kind(m)}; write it as {{"role": ..., "content": ...}}'
        role, content = m.get("role"), m.get("content")
        if "role" not in m or "content" not in m:
            missing = "role" if "role" not in m else "content"
            return f"message {n} has no '{missing}'; each message needs 'role' and 'content'"
        if not isinstance(role, str):
            return f"message {n}: 'role' is {_kind(role)}; it must be a string"
        if role not in ROLES:
            return f"message {n}: unknown role {role!r}; use one of {', '.join(ROLES)}"
        if not isinstance(content, str):
            return f"message {n} ({role}): 'content' is {_kind(content)}; it must be a string"
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


def _check_fields(rec: dict, fmt: str) -> str | None:
    if fmt == "chat":
        return _check_chat(rec["messages"])
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
    try:
        rec = json.loads(text)
    except json.JSONDecodeError as e:
        near = text[max(0, e.pos - 15) : e.pos + 15]
        return None, (
            f"bad JSON: {e.msg} at column {e.colno} (near {near!r}); each line must be one JSON object"
        )
    if not isinstance(rec, dict):
        return None, f"expected a JSON object {{...}}, got {_kind(rec)}; {HOW}"
    return rec, None


def _raise(problems: list[str]) -> None:
    more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
    raise DataError(problems[0] + more)


def read_jsonl(path: Path) -> tuple[list[dict], str]:
    """Return the records of a .jsonl file and their format ("chat", "completion" or "text")."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror}") from e
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]  # a UTF-8 BOM, as Windows editors write it
    records, problems = [], []
    fmt = first_line = None
    for n, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue  # blank lines carry nothing
        rec, problem = _parse_line(raw)
        if rec is not None:
            line_fmt = detect_format(rec)
            if line_fmt is None:
                keys = ", ".join(list(rec)[:8]) or "none"
                problem = f"no known keys (found: {keys}); {HOW}"
            elif fmt is not None and line_fmt != fmt:
                problem = (
                    f"line {n} is {FORMAT_NAMES[line_fmt]} while line {first_line} was "
                    f"{FORMAT_NAMES[fmt]}; use one format per file"
                )
            else:
                fmt, first_line = fmt or line_fmt, first_line or n
                problem = _check_fields(rec, line_fmt)
        if problem:
            problems.append(f"{path}:{n}: {problem}")
        else:
            records.append(rec)
    if problems:
        _raise(problems)
    if not records:
        _raise([f"{path}:1: no data (the file is empty or has only blank lines); {HOW}"])
    return records, fmt
