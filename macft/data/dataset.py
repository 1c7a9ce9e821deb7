"""A data file or folder -> checked, split, tokenized and cut examples, and a report of it all."""

import hashlib
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from macft.data.batches import example_tokens
from macft.data.encode import Example, Pair, encode_pair, encode_record
from macft.data.jsonl import FORMAT_NAMES, read_jsonl_numbered
from macft.errors import DataError


@dataclass
class DataReport:
    format: str  # "chat" | "completion" | "text" | "preference"
    n_train: int
    n_valid: int
    n_truncated: int  # examples cut to max_seq_length
    n_dropped: int  # examples with no target token left after truncation
    train_tokens: int
    train_target_tokens: int
    lengths: list[int]  # per train row, after truncation (a memory planner reads these)
    sources: dict  # {"train": path, "valid": path or "held out from <file>: N lines" or "none"}


def _clip(record: dict, limit: int) -> dict:
    """Cut strings far beyond max_seq_length (a 10 MB line) before the slow tokenizer sees them.

    At <= 64 chars per token the cut part is past max_seq_length anyway: the example is still
    truncated (and counted) and keeps the same tokens."""

    def cut(s):
        return s[:limit] if isinstance(s, str) else s

    if "messages" in record:
        return {"messages": [{**m, "content": cut(m["content"])} for m in record["messages"]]}
    return {k: cut(v) for k, v in record.items()}


def _split(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic held-out indices; both lists keep file order."""
    if fraction <= 0 or n < 2:
        return list(range(n)), []
    k = min(n - 1, max(1, round(n * fraction)))
    held = set(np.random.default_rng(seed).permutation(n)[:k].tolist())
    return [i for i in range(n) if i not in held], sorted(held)


def _listing(folder: Path) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    shown = ", ".join(names[:12]) + (f", ... ({len(names)} entries)" if len(names) > 12 else "")
    return shown or "nothing (it is empty)"


def _kind(path: Path) -> str:
    mode = path.stat().st_mode
    return "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "not a file"


def _regular(path: Path, fix: str) -> Path:
    """`path` if it is a regular file: reading a FIFO or a device would hang or never end."""
    if not path.is_file():
        raise DataError(f"{path} is {_kind(path)}, not a regular file; {fix}")
    return path


def _find_files(path: Path) -> tuple[Path, Path | None]:
    if path.is_dir():
        train, valid = path / "train.jsonl", path / "valid.jsonl"
        if not train.exists():
            raise DataError(
                f"{path}: no train.jsonl in this folder (it has: {_listing(path)}); "
                "put the training lines in train.jsonl (and optionally valid.jsonl)"
            )
        fix = "put the lines in a .jsonl file of that name"
        return _regular(train, fix), _regular(valid, fix) if valid.exists() else None
    if path.exists():
        return _regular(path, "give a .jsonl file or a folder with train.jsonl"), None
    parent = path.parent if path.parent.is_dir() else None
    there = (
        f"; {parent} has: {_listing(parent)}"
        if parent
        else f"; {path.parent} does not exist either"
    )
    raise DataError(
        f"{path} does not exist{there}. Give a .jsonl file or a folder with train.jsonl"
    )


def data_digest(path: str | Path) -> str:
    """A digest of the data files' bytes (train.jsonl and valid.jsonl of a folder): a resumed
    run compares it, so edited data is noticed before it mixes into the run."""
    train, valid = _find_files(Path(path))
    h = hashlib.sha256()
    for name, file in (("train", train), ("valid", valid)):
        if file is not None:
            h.update(name.encode() + b"\0")
            try:
                with open(file, "rb") as f:
                    while chunk := f.read(1 << 20):
                        h.update(chunk)
            except OSError as e:
                raise DataError(f"{file}: cannot read: {e.strerror}") from None
    return "sha256:" + h.hexdigest()


def _records(train_file: Path, valid_file: Path | None, fraction: float, seed: int):
    """(train, valid, format, where valid came from): [(file, line, record)] each."""
    numbered, fmt = read_jsonl_numbered(train_file)
    records = [(train_file, n, rec) for n, rec in numbered]
    if valid_file is not None:
        valid, valid_fmt = read_jsonl_numbered(valid_file)
        if valid_fmt != fmt:
            raise DataError(
                f"{valid_file}: the lines are {valid_fmt} format while {train_file} is {fmt}; "
                "use the same format in both files"
            )
        return records, [(valid_file, n, rec) for n, rec in valid], fmt, str(valid_file)
    train_idx, valid_idx = _split(len(records), fraction, seed)
    source = f"held out from {train_file}: {len(valid_idx)} lines" if valid_idx else "none"
    return [records[i] for i in train_idx], [records[i] for i in valid_idx], fmt, source


def held_out_records(path, fraction: float, seed: int) -> tuple[list[dict], str, str]:
    """(records, format, where from): the validation lines of a data path as training split
    them, or its training lines when it has none."""
    train_file, valid_file = _find_files(Path(path))
    train, valid, fmt, source = _records(train_file, valid_file, fraction, seed)
    if valid:
        return [rec for _, _, rec in valid], fmt, f"validation: {source}"
    return [rec for _, _, rec in train], fmt, f"training lines of {train_file} (no validation)"


def _too_long(file, what: str, max_seq_length: int, longest: int) -> DataError:
    return DataError(
        f"{file}: every {what} example is longer than data.max_seq_length={max_seq_length} "
        f"before its first target token (the longest has {longest} tokens); raise "
        "data.max_seq_length"
    )


def _cut_pair(pair: Pair, max_seq_length: int, counts) -> Pair:
    """Both answers cut to max_seq_length; a prompt that leaves no answer token is an error
    (a pair cannot be dropped quietly: it would leave its answers unjudged)."""
    sides = []
    for ex in (pair.chosen, pair.rejected):
        counts["longest"] = max(counts["longest"], len(ex.ids))
        if len(ex.ids) > max_seq_length:
            first = int(np.argmax(ex.mask))  # the first answer token
            if first >= max_seq_length:
                raise DataError(
                    f"the prompt is {first} tokens, so nothing of the answer fits in "
                    f"data.max_seq_length={max_seq_length}; raise data.max_seq_length or "
                    "shorten the prompt"
                )
            counts["truncated"] += 1
            ex = Example(ex.ids[:max_seq_length], ex.mask[:max_seq_length])
        sides.append(ex)
    return Pair(*sides)


def prepare_pairs(records, tokenizer, max_seq_length, system, counts) -> list[Pair]:
    """Pairs encoded and cut, from [(file, line, record)]; errors name the file and line."""
    out = []
    for file, line, rec in records:
        try:
            pair = encode_pair(_clip(rec, 64 * max_seq_length), tokenizer, system)
            out.append(_cut_pair(pair, max_seq_length, counts))
        except DataError as e:
            raise DataError(f"{file}:{line}: {e}") from e
    return out


def _prepare(records, fmt, tokenizer, max_seq_length, system, counts) -> list[Example]:
    """Tokenized, masked and cut examples; an example with nothing left to learn is dropped."""
    if fmt == "preference":
        return prepare_pairs(records, tokenizer, max_seq_length, system, counts)
    out = []
    for file, line, rec in records:
        try:
            ex = encode_record(_clip(rec, 64 * max_seq_length), fmt, tokenizer, system)
        except DataError as e:
            raise DataError(f"{file}:{line}: {e}") from e
        counts["longest"] = max(counts["longest"], len(ex.ids))
        if len(ex.ids) > max_seq_length:
            counts["truncated"] += 1
            ex = Example(ex.ids[:max_seq_length], ex.mask[:max_seq_length])
        if not ex.mask.any():
            counts["dropped"] += 1  # nothing left to learn from after the cut
            continue
        out.append(ex)
    return out


def check_method(method: str, pairs: bool, where: str) -> None:
    """Preference pairs train with train.method dpo or orpo, and those methods only on pairs."""
    if method == "sft" and pairs:
        raise DataError(
            f"{where}: the lines are preference pairs {FORMAT_NAMES['preference']} but "
            "train.method is sft; set train.method: dpo or orpo (--set train.method=dpo)"
        )
    if method != "sft" and not pairs:
        raise DataError(
            f"{where}: train.method is {method}, which trains on preference pairs, but the "
            f"lines are not pairs; give {FORMAT_NAMES['preference']} lines or set "
            "train.method: sft"
        )


def _targets(ex) -> int:
    sides = (ex.chosen, ex.rejected) if isinstance(ex, Pair) else (ex,)
    return sum(int(e.mask.sum()) for e in sides)


def load_data(
    path: str | Path,
    tokenizer,
    max_seq_length: int,
    valid_fraction: float,
    seed: int,
    system: str | None = None,
    method: str = "sft",
) -> tuple[list[Example], list[Example], DataReport]:
    """Read, check, split, tokenize and truncate; the report counts every cut and drop.

    Preference data ({"prompt", "chosen", "rejected"}) gives Pairs; `method` (train.method)
    must be one that trains on them, and sft must not be."""
    train_file, valid_file = _find_files(Path(path))
    records, valid_records, fmt, valid_source = _records(
        train_file, valid_file, valid_fraction, seed
    )
    check_method(method, fmt == "preference", str(train_file))
    counts = {"truncated": 0, "dropped": 0, "longest": 0}
    args = (fmt, tokenizer, max_seq_length, system, counts)
    train_set = _prepare(records, *args)
    if not train_set:
        raise _too_long(train_file, "training", max_seq_length, counts["longest"])
    valid_set = _prepare(valid_records, *args)
    if valid_records and not valid_set:  # training would go on with no validation at all
        raise _too_long(valid_file or train_file, "validation", max_seq_length, counts["longest"])
    # a pair's two answers are rows of their own: the planner counts the longer one, twice
    lengths = [
        max(len(ex.chosen.ids), len(ex.rejected.ids)) if isinstance(ex, Pair) else len(ex.ids)
        for ex in train_set
    ]
    report = DataReport(
        format=fmt,
        n_train=len(train_set),
        n_valid=len(valid_set),
        n_truncated=counts["truncated"],
        n_dropped=counts["dropped"],
        train_tokens=sum(example_tokens(ex) for ex in train_set),
        train_target_tokens=int(sum(_targets(ex) for ex in train_set)),
        lengths=lengths,
        sources={"train": str(train_file), "valid": valid_source},
    )
    return train_set, valid_set, report
