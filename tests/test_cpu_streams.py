"""A micro-batch split over CPU streams gives the unsplit loss and gradients; when it is split."""

import ctypes
import os
from dataclasses import replace
from types import SimpleNamespace

import mlx.core as mx
import mlx.nn as nn
import pytest
from test_compiled_step import assert_same
from test_packing import trained_lora
from test_trainer import PAD, counting_examples, lora_model

from macft import backend
from macft.batches import accumulate, batch_loss
from macft.compiled_step import CompiledStep
from macft.lean_ops import lean_training
from macft.train import describe_speed
from macft.trainer import TrainConfig, stream_count


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
    with lean_training(model, True):
        step = CompiledStep(eager, model) if compiled else eager
        one, n1, i1 = _sums(model, step, batches, None, pack)
        two, n2, i2 = _sums(model, step, batches, streams, pack)
    assert (n1, i1) == (n2, i2) and n1 > 0
    assert_same(two, one)
    if compiled:  # a trace per stream it ran on, and one for the unsplit batches
        assert len({key[1] for key in step.functions}) == 3


def test_examples_are_split_only_when_every_core_gets_one(monkeypatch):
    monkeypatch.delenv(backend.NO_CPU_STREAMS_ENV, raising=False)
    monkeypatch.setattr(backend, "metal_available", lambda: False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0, 1})
    assert backend.cpu_streams(4) == 2
    assert backend.cpu_streams(1) == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(8)))
    assert backend.cpu_streams(4) == 1  # a threaded BLAS on one stream does better there
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0, 1})
    monkeypatch.setenv(backend.NO_CPU_STREAMS_ENV, "1")
    assert backend.cpu_streams(4) == 1
    monkeypatch.delenv(backend.NO_CPU_STREAMS_ENV)
    monkeypatch.setattr(backend, "metal_available", lambda: True)
    assert backend.cpu_streams(4) == 1


def test_no_split_with_checkpointing_a_quantized_base_or_several_processes(monkeypatch):
    monkeypatch.setattr(backend, "cpu_streams", lambda examples: 2)
    assert stream_count(TrainConfig(batch_size=4)) == 2
    assert stream_count(TrainConfig(batch_size=4, grad_checkpoint=True)) == 1
    assert stream_count(TrainConfig(batch_size=4), quantized=True) == 1
    assert stream_count(TrainConfig(batch_size=4), world_size=2) == 1


def test_blas_threads_is_restored():
    lib = ctypes.CDLL(None)
    get = getattr(lib, "openblas_get_num_threads", None)
    with backend.blas_threads(None):
        pass
    if get is None:
        pytest.skip("no OpenBLAS in this process")
    before = get()
    with backend.blas_threads(1):
        assert get() == 1
    assert get() == before


def test_the_speed_line_names_the_split_only_when_the_trainer_makes_it(monkeypatch):
    monkeypatch.setattr(backend, "cpu_streams", lambda examples: 2)
    monkeypatch.setattr(backend, "metal_available", lambda: False)
    model, _ = lora_model()
    base = SimpleNamespace(model=model, config={"model_type": "llama"}, source={})
    cfg = TrainConfig(batch_size=4)
    base.source["compute"] = "float32"
    assert "split over 2 CPU streams" in describe_speed(cfg, base)
    assert "CPU streams" not in describe_speed(cfg, base, world_size=2)
    assert "CPU streams" not in describe_speed(replace(cfg, grad_checkpoint=True), base)
    base.source["compute"] = "quantized"
    assert "CPU streams" not in describe_speed(cfg, base)
