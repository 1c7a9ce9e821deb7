"""A micro-batch split over CPU streams gives the unsplit loss and gradients; when it is split."""

import ctypes
import os
from dataclasses import replace

import mlx.core as mx
import mlx.nn as nn
import pytest
from helpers import (
    PAD,
    assert_same,
    build_tiny_model,
    counting_examples,
    lora_model,
    train_config,
    trained_lora,
)

from macft import device
from macft.config.schema import LoraConfig
from macft.cpu import streams as cpu_streams
from macft.cpu.blas import blas_threads
from macft.cpu.streams import stream_count
from macft.lora.apply import apply_lora
from macft.train.lean_ops import lean_training
from macft.train.loss import batch_loss
from macft.train.speed import Speed
from macft.train.step import CompiledStep, accumulate


def _sums(model, step, batches, streams, pack):
    loss, grads, n_targets, n_inputs = accumulate(
        step, model, batches, PAD, seeds=[1] * len(batches), pack=pack, loss_chunk=16,
        streams=streams,
    )  # fmt: skip
    return (loss, grads), n_targets, n_inputs


@pytest.mark.parametrize("compiled,pack", [(True, True), (False, True), (True, False)])
def test_split_over_streams_gives_the_same_sums(compiled, pack):
    model = trained_lora()
    eager = nn.value_and_grad(model, batch_loss)
    # 5 examples over 2 streams (3 + 2), then a micro-batch of 1 that is not split
    batches = [counting_examples(5, seed=3), counting_examples(1, seed=4)]
    streams = [mx.new_stream(mx.cpu) for _ in range(2)]
    with lean_training(model):
        step = CompiledStep(eager, model) if compiled else eager
        one, n1, i1 = _sums(model, step, batches, None, pack)
        two, n2, i2 = _sums(model, step, batches, streams, pack)
    assert (n1, i1) == (n2, i2) and n1 > 0
    assert_same(two, one)
    if compiled:  # a trace per stream it ran on, and one for the unsplit batches
        assert len({key[1] for key in step.functions}) == 3


@pytest.mark.path("cpu")
def test_examples_are_split_only_when_every_core_gets_one(monkeypatch):
    monkeypatch.delenv(cpu_streams.NO_CPU_STREAMS_ENV, raising=False)
    monkeypatch.setattr(device, "metal_available", lambda: False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0, 1})
    assert cpu_streams.cpu_streams(4) == 2
    assert cpu_streams.cpu_streams(1) == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(8)))
    assert cpu_streams.cpu_streams(4) == 1  # a threaded BLAS on one stream does better there
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0, 1})
    monkeypatch.setenv(cpu_streams.NO_CPU_STREAMS_ENV, "1")
    assert cpu_streams.cpu_streams(4) == 1
    monkeypatch.delenv(cpu_streams.NO_CPU_STREAMS_ENV)
    monkeypatch.setattr(device, "metal_available", lambda: True)
    assert cpu_streams.cpu_streams(4) == 1


def test_no_split_with_checkpointing_a_quantized_base_or_several_processes(monkeypatch):
    monkeypatch.setattr(cpu_streams, "cpu_streams", lambda examples: 2)
    assert stream_count(train_config(batch_size=4)) == 2
    assert stream_count(train_config(batch_size=4, grad_checkpoint=True)) == 1
    assert stream_count(train_config(batch_size=4), quantized=True) == 1
    assert stream_count(train_config(batch_size=4), world_size=2) == 1


def test_blas_threads_is_restored():
    lib = ctypes.CDLL(None)
    get = getattr(lib, "openblas_get_num_threads", None)
    with blas_threads(None):
        pass
    if get is None:
        pytest.skip("no OpenBLAS in this process")
    before = get()
    with blas_threads(1):
        assert get() == 1
    assert get() == before


def test_the_speed_line_names_the_split_only_when_the_trainer_makes_it(monkeypatch):
    monkeypatch.setattr(cpu_streams, "cpu_streams", lambda examples: 2)
    monkeypatch.setattr(device, "metal_available", lambda: False)
    model, _ = lora_model()
    cfg = train_config(batch_size=4)

    def line(cfg, model, world_size=1, compute="float32"):
        return Speed.choose(cfg, model, world_size).describe(cfg, "llama", compute)

    assert "split over 2 CPU streams" in line(cfg, model)
    assert "CPU streams" not in line(cfg, model, world_size=2)
    assert "CPU streams" not in line(replace(cfg, grad_checkpoint=True), model)
    quantized = build_tiny_model()
    nn.quantize(quantized, group_size=32)
    apply_lora(quantized, LoraConfig(rank=4, alpha=8, dropout=0.0))
    assert "CPU streams" not in line(cfg, quantized, compute="quantized")
