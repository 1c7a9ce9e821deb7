"""Data parallel over mx.distributed: 2 ranks on 127.0.0.1 train like 1 process on the global batch."""

import inspect
import json
import os
import signal
import subprocess
import sys
import time

import mlx.core as mx
import pytest
from click.testing import CliRunner
from helpers import build_tiny_model, save_tiny_model_dir, train_config

from macft.cli import cli
from macft.errors import MacftError, RunError
from macft.runs.folder import RunDir
from macft.train.parallel import hosts
from macft.train.parallel.peer_run import PeerRun
from macft.train.parallel.world import World

QA = [
    ("show bgp summary in junos?", "show bgp summary"),
    ("list interfaces on cisco ios?", "show ip interface brief"),
    ("save the config on cisco ios?", "copy running-config startup-config"),
    ("show routes in junos?", "show route"),
    ("ping from a vrf on cisco ios?", "ping vrf NAME 10.0.0.1"),
]
# Constant learning rate: a run resumed with more iters follows the same schedule as one
# started with them. No dropout: both sides must draw nothing at random.
TRAIN = [
    *("--set", "model.compute=float32", "--set", "train.grad_accumulation=1"),
    *("--set", "train.grad_checkpoint=false", "--set", "lora.rank=4", "--set", "lora.dropout=0"),
    *("--set", "train.learning_rate=1e-3", "--set", "train.warmup=0"),
    *("--set", "train.schedule=constant", "--set", "train.report_every=1"),
]


def write_data(folder, n_train=13, n_valid=5):
    """13 training examples: global batches of 4, 4, 4 and 1, so rank 1's last share is empty."""
    folder.mkdir()
    for name, n in (("train", n_train), ("valid", n_valid)):
        with (folder / f"{name}.jsonl").open("w") as f:
            for i in range(n):
                q, a = QA[(i + len(name)) % len(QA)]
                msgs = [{"role": "user", "content": q + "?" * (i % 4)},
                        {"role": "assistant", "content": a}]  # fmt: skip
                f.write(json.dumps({"messages": msgs}) + "\n")
    return folder


def env(**extra):
    # One BLAS thread per process: two ranks share the 2 cores without fighting over them.
    return {**os.environ, "OPENBLAS_NUM_THREADS": "1", **extra}


def start_ranks(tmp_path, cwds, args, **extra):
    """One `macft train` per cwd, connected by the ring backend as mlx.launch would do it."""
    port = hosts._free_port(len(cwds))
    ring = tmp_path / "ring.json"
    ring.write_text(json.dumps([[f"127.0.0.1:{port + r}"] for r in range(len(cwds))]))
    procs = []
    for rank, cwd in enumerate(cwds):
        cwd.mkdir(exist_ok=True)
        log = open(tmp_path / f"rank{rank}.log", "w")  # noqa: SIM115 (closed with the process)
        e = env(MLX_RANK=str(rank), MLX_HOSTFILE=str(ring), **extra)
        procs.append(subprocess.Popen([sys.executable, "-m", "macft", *args], cwd=cwd, env=e,
                                      stdout=log, stderr=subprocess.STDOUT))  # fmt: skip
    return procs


def finish(procs, timeout=120):
    try:
        return [p.wait(timeout=timeout) for p in procs]
    finally:
        stop(procs)


def stop(procs):
    for p in procs:
        if p.poll() is None:
            p.kill()  # SIGKILL ends a stopped (SIGSTOP) process too
            p.wait()


def metrics(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_ranks_train_like_one_process_on_the_global_batch(tmp_path, monkeypatch):
    model, data = save_tiny_model_dir(tmp_path / "tiny"), write_data(tmp_path / "data")
    common = ["train", "--model", str(model), "--data", str(data), *TRAIN,
              "--set", "train.eval_every=3"]  # fmt: skip
    # 2 ranks of batch 2 for 4 steps; rank 1 runs in its own folder: a relative --out would
    # land there if it wrote anything.
    rank0, rank1 = tmp_path / "rank0", tmp_path / "rank1"
    args = [*common, "--out", "run", "--set", "train.batch_size=2", "--set", "train.iters=4",
            "--set", "train.save_every=2"]  # fmt: skip
    assert finish(start_ranks(tmp_path, [rank0, rank1], args)) == [0, 0], (
        tmp_path / "rank0.log"
    ).read_text() + (tmp_path / "rank1.log").read_text()
    assert list(rank1.iterdir()) == []
    assert [p.name for p in rank0.iterdir()] == ["run"]
    two = rank0 / "run"
    assert [r["step"] for r in metrics(two)][-1] == 4

    # Resumed to 6 steps through --hosts and mlx.launch: rank 1 gets rank 0's checkpoint.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")
    result = CliRunner().invoke(
        cli,
        [
            "train",
            "--resume",
            "--out",
            str(two),
            "--set",
            "train.iters=6",
            "--hosts",
            "127.0.0.1,127.0.0.1",
        ],  # fmt: skip
    )
    assert result.exit_code == 0, result.output
    assert json.loads((two / "state.json").read_text())["status"] == "finished"

    # One process on the global batch (2 x 2) for 6 steps, in a process like the ranks.
    one = tmp_path / "one"
    args = [*common, "--out", str(one), "--set", "train.batch_size=4", "--set", "train.iters=6"]
    single = subprocess.run([sys.executable, "-m", "macft", *args], env=env(),
                            capture_output=True, text=True)  # fmt: skip
    assert single.returncode == 0, single.stdout + single.stderr

    a, b = mx.load(str(one / "adapters.safetensors")), mx.load(str(two / "adapters.safetensors"))
    assert a.keys() == b.keys()
    moved = max(mx.abs(a[k]).max().item() for k in a if k.endswith("lora_b"))
    assert moved > 2e-3  # training did move the adapters: the comparison means something
    for k in a:
        # The ranks sum the same tokens in other groupings. That float32 rounding alone moves
        # the adapters by ~1e-5 after 6 steps (as much as another BLAS thread count does);
        # at lr 1e-2 this tiny model's training is chaotic and either grows to ~1e-1.
        assert mx.allclose(a[k], b[k], atol=5e-5, rtol=0), (k, mx.abs(a[k] - b[k]).max())
    ma, mb = metrics(one), metrics(two)
    assert [r["step"] for r in ma] == [r["step"] for r in mb] == [0, 1, 2, 3, 4, 5, 6]
    for ra, rb in zip(ma, mb, strict=True):
        assert rb["trained_tokens"] == ra["trained_tokens"]  # the global batch, not rank 0's
        for key in ("train_loss", "val_loss"):
            if ra.get(key) is not None:
                assert rb[key] == pytest.approx(ra[key], rel=1e-5), (ra["step"], key)
    # Nothing else appeared: one run folder per training, none from rank 1 or the launcher.
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "data", "one", "rank0", "rank0.log", "rank1", "rank1.log", "ring.json", "tiny"
    ]  # fmt: skip


@pytest.mark.once
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "frozen"])
def test_a_lost_rank_stops_the_other_with_a_clear_message(tmp_path, sig):
    model, data = save_tiny_model_dir(tmp_path / "tiny"), write_data(tmp_path / "data")
    args = ["train", "--model", str(model), "--data", str(data), "--out", "run", *TRAIN,
            "--set", "train.batch_size=2", "--set", "train.iters=100000",
            "--set", "train.eval_every=0", "--set", "train.save_every=0"]  # fmt: skip
    cwd = tmp_path / "work"
    # A killed peer closes its sockets: rank 0 must see that, not wait out the watchdog (a
    # loaded machine can take over 4 s for a step). A frozen one only the watchdog catches.
    timeout = "60" if sig == signal.SIGKILL else "4"
    procs = start_ranks(tmp_path, [cwd, cwd], args, MACFT_PEER_TIMEOUT=timeout)
    try:
        deadline = time.monotonic() + 90
        while not ((cwd / "run" / "metrics.jsonl").exists() and len(metrics(cwd / "run")) >= 2):
            assert time.monotonic() < deadline and procs[0].poll() is None, "training never ran"
            time.sleep(0.2)
        os.kill(procs[1].pid, sig)
        code = procs[0].wait(timeout=90)  # a frozen peer: the 4 s watchdog, not forever
    finally:
        stop(procs)
    log = (tmp_path / "rank0.log").read_text()
    state = json.loads((cwd / "run" / "state.json").read_text())
    assert code != 0 and state["status"] == "failed"
    if sig == signal.SIGKILL:
        assert "Error: rank 0 stopped: lost rank 1 during step" in log, log
        # Rank 0 saved the last whole step: the run resumes from there.
        assert (cwd / "run" / "checkpoints" / f"step-{state['step']:06d}").is_dir()
        assert "lost rank 1" in state["error"]
    else:
        assert "Error: rank 0 stopped: no answer from rank 1 for 4 s during step" in log, log
        assert "no answer from rank 1" in state["error"]


@pytest.mark.once
def test_a_rank_that_fails_to_start_stops_them_all(tmp_path):
    model = save_tiny_model_dir(tmp_path / "tiny")
    rank0, rank1 = tmp_path / "rank0", tmp_path / "rank1"
    rank0.mkdir()
    write_data(rank0 / "data")
    # The data path is relative: rank 1's folder has no data.
    args = ["train", "--model", str(model), "--data", "data", "--out", "run", *TRAIN]
    codes = finish(start_ranks(tmp_path, [rank0, rank1], args, MACFT_PEER_TIMEOUT="30"))
    assert codes[0] != 0 and codes[1] != 0
    log0, log1 = (tmp_path / "rank0.log").read_text(), (tmp_path / "rank1.log").read_text()
    assert "Error: rank 1 stopped: " in log1 and "data" in log1, log1
    assert "Error: rank 0 stopped: lost rank 1 while starting" in log0, log0
    assert not (rank0 / "run").exists() and list(rank1.iterdir()) == []


# --- the pieces, without processes ---------------------------------------------------------
def test_ring_hostfile_resolves_names_to_ips(monkeypatch):
    spec = hosts.ring_hostfile(["localhost", "127.0.0.1"])
    assert spec["backend"] == "ring"
    assert [(h["ssh"], h["ips"]) for h in spec["hosts"]] == [
        ("127.0.0.1", ["127.0.0.1"]), ("127.0.0.1", ["127.0.0.1"])
    ]  # fmt: skip
    monkeypatch.setattr(hosts.socket, "gethostbyname", lambda h: {"mac2": "192.0.2.7"}[h])
    spec = hosts.ring_hostfile(["192.0.2.6", "mac2"])
    assert [(h["ssh"], h["ips"]) for h in spec["hosts"]] == [
        ("192.0.2.6", ["192.0.2.6"]), ("mac2", ["192.0.2.7"])
    ]  # fmt: skip
    with pytest.raises(MacftError, match="localhost is 127.0.0.1 here"):
        hosts.ring_hostfile(["localhost", "mac2"])

    def no_dns(h):
        raise OSError("unknown host")

    monkeypatch.setattr(hosts.socket, "gethostbyname", no_dns)
    with pytest.raises(MacftError, match="cannot resolve 'mac3'"):
        hosts.ring_hostfile(["192.0.2.6", "mac3"])
    with pytest.raises(MacftError, match="two or more machines"):
        hosts.parse_hosts("mac1")


def test_the_command_runs_again_without_hosts():
    cmd = cli.commands["train"]
    given = ["--model", "m", "--set", "a=1", "--set", "b=2", "--resume", "--hosts", "x,y"]
    ctx = cmd.make_context("train", list(given))
    argv = hosts.command_argv(ctx)
    assert argv[0] == "train" and "--hosts" not in argv
    again = cmd.make_context("train", argv[1:]).params
    assert again == {**ctx.params, "hosts": None}


def test_launch_names_the_rank_that_failed(monkeypatch):
    warn = "\033[33m[WARN] Node with rank {} exited with code {} \033[0m\\n"
    code = "import sys; sys.stderr.write('" + warn.format(1, 5) + warn.format(0, -15) + "')"
    assert hosts._run([sys.executable, "-c", code]) == [(1, 5), (0, -15)]
    monkeypatch.setattr(hosts, "_run", lambda cmd: [(0, -15), (1, 5)])
    with pytest.raises(RunError, match=r"rank 1 stopped \(exit code 5\).*stopped rank 0$"):
        hosts.launch(["train"], "127.0.0.1,127.0.0.1", None)


def test_other_ranks_write_nothing(tmp_path):
    run = PeerRun(tmp_path / "run")
    with run.lock():
        run.create({"a": 1}, {})
        run.update_state(status="running")
        run.append_metrics({"step": 1})
        run.save_checkpoint(1, {}, {}, {})
    assert run.read_metrics() == [] and run.latest_checkpoint() is None
    assert not (tmp_path / "run").exists()


def test_other_ranks_see_every_method_of_the_run_folder_and_no_other(tmp_path):
    def public(cls):
        return {n for n in dir(cls) if not n.startswith("_")}

    assert public(PeerRun) == public(RunDir)
    for name in public(RunDir):  # the same parameters, so a call that works on rank 0 works
        own, peer = getattr(RunDir, name), getattr(PeerRun, name)
        if callable(own):
            assert list(inspect.signature(own).parameters) == list(
                inspect.signature(peer).parameters
            ), name
    with pytest.raises(AttributeError):
        PeerRun(tmp_path / "run").save_checkpiont(1, {}, {}, {})  # misspelt: not a silent no-op


def test_shards_cover_the_global_batch_once():
    batch = [7, 3, 9, 1, 4]
    shards = [World(rank=r, size=3).shard(batch) for r in range(3)]
    assert sorted(i for s in shards for i in s) == sorted(batch)
    assert [len(s) for s in shards] == [2, 2, 1]


class LostRing:
    """MLX's ring backend after a peer is lost: the collective in flight raises, and one
    evaluated after it would wait forever, because its socket threads have ended."""

    def __init__(self, monkeypatch, fail_at: int):
        self.calls, self.fail_at, self.failed = 0, fail_at, False
        self._eval = mx.eval
        self._sums: set = set()
        monkeypatch.setattr(mx.distributed, "all_sum", self.all_sum)
        monkeypatch.setattr(mx, "eval", self.eval)

    def all_sum(self, x, group=None):
        out = x * 2  # two ranks holding the same values
        self._sums.add(id(out))
        return out

    def eval(self, *args):
        flat = [a for arg in args for a in (arg if isinstance(arg, list) else [arg])]
        for _ in (a for a in flat if id(a) in self._sums):
            assert not self.failed, "a collective after a failed one: MLX waits for it forever"
            self.calls += 1
            self.failed = self.calls == self.fail_at
        if self.failed:
            raise RuntimeError("[ring] connection to a peer was lost")
        return self._eval(*args)


@pytest.mark.parametrize("fail_at", [1, 2])
def test_a_failed_gradient_sum_starts_no_other_collective(monkeypatch, fail_at):
    # float32 gradients and int64 token counts are two pieces; a failure in either one must
    # reach the trainer as PeerLost, never leave the next piece waiting for a dead peer.
    from macft.train.parallel.world import PeerLost

    world = World(rank=0, size=2)
    params = {"a": mx.zeros((3, 4)), "b": mx.zeros((5,))}
    grads = {"a": mx.ones((3, 4)), "b": mx.full((5,), 3.0)}
    ring = LostRing(monkeypatch, fail_at=99)
    loss, summed, n_targets, n_inputs = world.sum_step(mx.array(1.5), grads, 7, 9, params, 1)
    assert ring.calls == 2 and loss.item() == 3.0 and (n_targets, n_inputs) == (14, 18)
    assert mx.array_equal(summed["b"], mx.full((5,), 6.0)).item()
    ring = LostRing(monkeypatch, fail_at=fail_at)
    with pytest.raises(PeerLost, match="lost rank 1 during step 2"):
        world.sum_step(mx.array(1.5), grads, 7, 9, params, 2)


def test_plan_counts_the_machines(tiny_model_dir, tmp_path):
    data = write_data(tmp_path / "data")
    args = ["plan", "--model", str(tiny_model_dir), "--data", str(data), "--memory", "16GB",
            "--set", "train.batch_size=2", "--set", "train.grad_accumulation=3"]  # fmt: skip
    alone = CliRunner().invoke(cli, args)
    two = CliRunner().invoke(cli, [*args, "--hosts", "mac1,mac2"])
    assert alone.exit_code == 0 and two.exit_code == 0, two.output
    assert "2 machines: each trains batch 2 x 3 accumulation, 12 examples a step" in two.output
    assert "machines: each trains" not in alone.output
    bad = CliRunner().invoke(cli, [*args, "--hosts", "mac1,mac2", "--machines", "3"])
    assert bad.exit_code == 1 and "--hosts names 2 machines" in bad.output


def test_plan_holds_the_summed_gradients():
    from macft.train import memory as mp

    shape = mp.Shape(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=259,
                     tied=False)  # fmt: skip
    setup = mp.Setup(batch_size=2, seq_len=64, grad_accumulation=1)
    alone = mp.plan(shape, setup)
    two = mp.plan(shape, mp.Setup(batch_size=2, seq_len=64, grad_accumulation=1, machines=2))
    assert two.parts["lora"] - alone.parts["lora"] == 4 * mp.lora_params(shape, setup)
    assert "on each of 2 machines" in two.summary()


def test_a_run_resumes_only_with_as_many_ranks(tmp_path):
    from helpers import PAD, counting_examples, lora_model, new_run

    from macft.runs.folder import RunDir
    from macft.train.loop import train

    data = counting_examples(4)
    cfg = train_config(iters=2, batch_size=2, eval_every=0)
    model, info = lora_model()
    run = new_run(tmp_path)
    train(model, data, [], cfg, run, PAD, lora_info=info)
    state = run.latest_checkpoint() / "state.json"
    assert json.loads(state.read_text())["world_size"] == 1
    state.write_text(json.dumps({**json.loads(state.read_text()), "world_size": 2}))
    with pytest.raises(RunError, match="trained as 2 process"):
        train(model, data, [], cfg, RunDir(run.path), PAD, resume=True, lora_info=info)


def test_hosts_inside_mlx_launch_is_refused(monkeypatch):
    monkeypatch.setenv("MLX_RANK", "0")
    with pytest.raises(MacftError, match="already runs as one rank of mlx.launch"):
        hosts.launch(["train"], "127.0.0.1,127.0.0.1", None)


@pytest.mark.once
def test_ranks_with_the_same_config_but_other_weights_refuse_to_train(tmp_path):
    """Each rank loads `tiny` from its own folder: one config, other weights. The ranks'
    agreement check hashes the weights too, not the config alone."""
    data = write_data(tmp_path / "data")
    rank0, rank1 = tmp_path / "rank0", tmp_path / "rank1"
    save_tiny_model_dir(rank0 / "tiny", build_tiny_model(seed=0))
    save_tiny_model_dir(rank1 / "tiny", build_tiny_model(seed=1))
    args = ["train", "--model", "tiny", "--data", str(data), "--out", "run", *TRAIN,
            "--set", "train.batch_size=2", "--set", "train.iters=2"]  # fmt: skip
    codes = finish(start_ranks(tmp_path, [rank0, rank1], args, MACFT_PEER_TIMEOUT="30"))
    log0 = (tmp_path / "rank0.log").read_text() + (tmp_path / "rank1.log").read_text()
    assert codes[0] != 0 and codes[1] != 0, log0
    assert "rank 1 loaded other data or model than rank 0" in log0, log0
    assert not (rank0 / "run" / "adapters.safetensors").exists()


def write_pairs(folder, n_train=8, n_valid=3):
    """8 preference pairs: two global batches of 4, two pairs for each rank (7: the second
    global batch has 3, shared 2 + 1)."""
    folder.mkdir()
    for name, n in (("train", n_train), ("valid", n_valid)):
        with (folder / f"{name}.jsonl").open("w") as f:
            for i in range(n):
                q, a = QA[(i + len(name)) % len(QA)]
                wrong = QA[(i + len(name) + 1) % len(QA)][1]
                f.write(json.dumps({"prompt": q, "chosen": a, "rejected": wrong}) + "\n")
    return folder


# 7 pairs, on the CPU's path only: there the uneven share gives one process's adapters
# (measured: identical). On the Mac's path the step's summed gradients match too (1.3e-7 apart,
# of sums up to 8.7e-3), but a pair alone is padded to another width than in a batch of 3,
# its 16-bit activations round otherwise, and Adam's first update of a lora_a element whose
# gradient is ~7e-7 a pair (sqrt(v) then ~2e-8, beside Adam's eps of 1e-8) turns a 6% rounding
# difference into ~5e-5: the step's lr x 0.1 g / (sqrt(v) + eps) moves with it.
@pytest.mark.parametrize("n_pairs", [8, pytest.param(7, marks=pytest.mark.path("cpu"))])
def test_two_ranks_train_dpo_like_one_process(tmp_path, n_pairs):
    """DPO over --hosts: each rank's cached reference, its pairs' share of the batch (even or
    not) and the reward metrics add up to what one process computes on the global batch."""
    model = save_tiny_model_dir(tmp_path / "tiny")
    data = write_pairs(tmp_path / "pairs", n_train=n_pairs)
    common = ["train", "--model", str(model), "--data", str(data), *TRAIN,
              "--set", "train.method=dpo", "--set", "train.dpo_nll=0.5",
              "--set", "train.iters=2", "--set", "train.eval_every=2",
              "--set", "train.save_every=0"]  # fmt: skip
    rank0, rank1 = tmp_path / "rank0", tmp_path / "rank1"
    args = [*common, "--out", "run", "--set", "train.batch_size=2"]
    assert finish(start_ranks(tmp_path, [rank0, rank1], args)) == [0, 0], (
        tmp_path / "rank0.log"
    ).read_text() + (tmp_path / "rank1.log").read_text()
    one = tmp_path / "one"
    args = [*common, "--out", str(one), "--set", "train.batch_size=4"]
    single = subprocess.run([sys.executable, "-m", "macft", *args], env=env(),
                            capture_output=True, text=True)  # fmt: skip
    assert single.returncode == 0, single.stdout + single.stderr

    two = rank0 / "run"
    a, b = mx.load(str(one / "adapters.safetensors")), mx.load(str(two / "adapters.safetensors"))
    assert max(mx.abs(a[k]).max().item() for k in a if k.endswith("lora_b")) > 2e-3
    atol = 5e-5 if n_pairs == 8 else 1e-6  # 8: both paths, measured 3.6e-7 on the Mac's
    for k in a:
        assert mx.allclose(a[k], b[k], atol=atol, rtol=0), (k, mx.abs(a[k] - b[k]).max())
    ma, mb = metrics(one), metrics(two)
    assert [r["step"] for r in ma] == [r["step"] for r in mb]
    for ra, rb in zip(ma, mb, strict=True):
        for key in ("train_loss", "val_loss", "reward_accuracy", "reward_margin", "chosen_logp"):
            # at step 1 the tuned model is the reference: the margins' signs are rounding
            if ra.get(key) is not None and (key != "reward_accuracy" or ra["step"] > 1):
                assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-6), (ra["step"], key)
