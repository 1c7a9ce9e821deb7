"""Memory over a long run on the Mac's path: does a 1,000-step `macft train` hold still?

    python bench/bench_long_run.py                  # 1,000 steps, batch 2, rows up to 512 tokens
    python bench/bench_long_run.py --steps 300

`macft train` with MACFT_MAC_PATH=1 (the 4-bit base, bfloat16 activations, compiled steps, the
plan's cache limit) on a small random llama (hidden 64, 2 layers) with a byte-level tokenizer,
on WikiSQL rows joined 1 to 8 at a time, so the micro-batches take many widths. MLX's quantized
matmul in bfloat16 is slow on a CPU; a small model keeps 1,000 steps to minutes. Prints, at each
report: MLX active and cache memory, process RSS, tokens/s and the compiled shapes so far; then
steps 100 and the last side by side.
"""

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WIKISQL = ROOT.parent / "shared" / "data" / "wikisql" / "train.jsonl"
CONFIG = {
    "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
    "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "vocab_size": 259,
    "rope_theta": 10000.0, "tie_word_embeddings": False, "max_position_embeddings": 1024,
}  # fmt: skip


def byte_tokenizer():
    """Bytes as tokens, with ChatML specials: a tokenizer that needs no download."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True) for s in specials])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )


def setup(work: Path) -> tuple[Path, Path]:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from macft.models.mlx_lm_compat import build_model

    model_dir, data = work / "model", work / "data.jsonl"
    model_dir.mkdir(parents=True)
    mx.random.seed(0)
    model = build_model(CONFIG)
    mx.save_safetensors(
        str(model_dir / "model.safetensors"), dict(tree_flatten(model.parameters()))
    )
    (model_dir / "config.json").write_text(json.dumps(CONFIG))
    byte_tokenizer().save_pretrained(str(model_dir))
    rng = random.Random(0)
    rows = [json.loads(line)["text"] for line in WIKISQL.read_text().splitlines()]
    texts = ["\n".join(rng.choice(rows) for _ in range(rng.choice([1, 1, 2, 3, 4, 8])))
             for _ in range(2000)]  # fmt: skip
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return model_dir, data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1000)
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="macft-long-run-"))
    model_dir, data = setup(work)
    run = work / "run"
    sets = {"train.iters": a.steps, "train.batch_size": 2, "train.grad_accumulation": 1,
            "train.eval_every": 0, "train.save_every": 0, "train.report_every": 50,
            "data.max_seq_length": 512, "data.valid_fraction": 0.0, "lora.rank": 8,
            "model.group_size": 32}  # fmt: skip
    cmd = [sys.executable, "-m", "macft", "train", "--model", str(model_dir), "--data", str(data)]
    cmd += ["--out", str(run)] + [x for k, v in sets.items() for x in ("--set", f"{k}={v}")]
    env = {**os.environ, "MACFT_MAC_PATH": "1"}
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=ROOT
    )
    rss: dict[int, float] = {}
    threading.Thread(target=watch_rss, args=(proc, run, rss), daemon=True).start()
    out = proc.stdout.read().decode()
    if proc.wait() != 0:
        sys.exit(f"macft train failed:\n{out[-3000:]}")
    report(run, rss)


def watch_rss(proc, run: Path, rss: dict) -> None:
    """The process's RSS, sampled, keyed by the step its metrics last reported."""
    while proc.poll() is None:
        try:
            pages = int(Path(f"/proc/{proc.pid}/statm").read_text().split()[1])
            lines = (run / "metrics.jsonl").read_text().splitlines() if run.exists() else []
            step = json.loads(lines[-1])["step"] if lines else 0
            rss[step] = max(rss.get(step, 0.0), pages * os.sysconf("SC_PAGE_SIZE") / 1e9)
        except (OSError, ValueError, IndexError):
            pass
        time.sleep(0.2)


def report(run: Path, rss: dict) -> None:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    print("step  tok/s  MLX active+cache GB  peak GB  RSS GB  compiled shapes")
    for r in rows:
        mem = r.get("active_memory_gb", 0) + r.get("cache_memory_gb", 0)
        print(f"{r['step']:>4} {r['tokens_per_s']:>6.0f} {mem:>20.4f} {r['peak_memory_gb']:>8.4f} "
              f"{rss.get(r['step'], 0):>7.3f} {r.get('compiled_shapes', '-'):>16}")  # fmt: skip
    first = next(r for r in rows if r["step"] >= 100)
    last = rows[-1]
    for key in ("active_memory_gb", "cache_memory_gb"):
        print(f"{key}: step {first['step']} {first.get(key, 0):.4f}, step {last['step']} "
              f"{last.get(key, 0):.4f}")  # fmt: skip
    print(f"RSS: step {first['step']} {rss.get(first['step'], 0):.3f} GB, step {last['step']} "
          f"{rss.get(last['step'], 0):.3f} GB; tokens/s {first['tokens_per_s']:.0f} -> "
          f"{last['tokens_per_s']:.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
