"""The float32 speed ceiling: only the matmuls that any LoRA trainer must run, nothing else.

    python bench/bench_ceiling.py                 # SmolLM2-135M shapes, 384 tokens a micro-batch
    python bench/bench_ceiling.py --tokens 519

LoRA on every layer needs, per layer, each frozen linear forwards (x @ W.T) and its input
gradient backwards (d @ W), and the LM head both ways for every target token. This times
exactly those matmuls with OpenBLAS (if preloaded) and prints the tokens/s no trainer on
this machine can beat: mlx_lm lora's and macft's tokens/s can be read against it.
"""

import argparse
import time

import mlx.core as mx

from macft.cpu.process import describe as describe_backend

# SmolLM2-135M: hidden 576, 9 heads / 3 kv heads of 64, MLP 1536, 30 layers, vocabulary 49152
LINEARS = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]
LAYERS, HIDDEN, VOCAB = 30, 576, 49152


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=384, help="tokens in a micro-batch")
    p.add_argument("--loss-chunk", type=int, default=64)
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args()
    n = a.tokens
    ws = [mx.random.normal((o, i)) * 0.02 for i, o in LINEARS]
    xs = {d: mx.random.normal((n, d)) for d in (576, 192, 1536)}
    head = mx.random.normal((VOCAB, HIDDEN)) * 0.02
    h, d = mx.random.normal((a.loss_chunk, HIDDEN)), mx.random.normal((a.loss_chunk, VOCAB))
    mx.eval(ws, list(xs.values()), head, h, d)

    def layer():
        return [m for (i, o), w in zip(LINEARS, ws, strict=True) for m in (xs[i] @ w.T, xs[o] @ w)]

    mx.eval(layer())  # warm up
    t0 = time.perf_counter()
    for _ in range(a.repeat):
        for _ in range(LAYERS):
            mx.eval(layer())
    layers = (time.perf_counter() - t0) / a.repeat
    t0 = time.perf_counter()
    for _ in range(a.repeat):
        for _ in range(-(-n // a.loss_chunk)):
            mx.eval(h @ head.T, d @ head)
    head_s = (time.perf_counter() - t0) / a.repeat
    total = layers + head_s
    print(f"backend: {describe_backend()}")
    print(f"{n} tokens: layers' matmuls {layers:.2f} s + LM head {head_s:.2f} s = {total:.2f} s")
    print(f"ceiling: {n / total:.0f} tokens/s (matmuls only; a trainer also runs everything else)")


if __name__ == "__main__":
    main()
