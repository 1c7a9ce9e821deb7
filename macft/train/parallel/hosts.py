"""`macft train --hosts`: a ring hostfile for mlx.launch, and the same train command on every Mac."""

import ipaddress
import json
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
from importlib.metadata import entry_points
from pathlib import Path

from macft.errors import MacftError, RunError
from macft.relaunch import macft_command, python_code

LOCAL = "127.0.0.1"  # mlx.launch starts this host's ranks without ssh
# What mlx.launch prints when a rank ends badly (it exits 0 itself, whatever the ranks did).
NODE_RE = re.compile(r"Node with rank (\d+) (?:exited with code (-?\d+)|was killed)")
STOPPED_CODES = {-15, 130, 143}  # stopped by mlx.launch (SIGTERM) or Ctrl-C: a consequence


def parse_hosts(text: str) -> list[str]:
    hosts = [h.strip() for h in text.split(",")]
    if len(hosts) < 2 or not all(hosts):
        raise MacftError(
            f"--hosts {text!r}: give two or more machines separated by commas, e.g. "
            "--hosts mac1.local,mac2.local (127.0.0.1,127.0.0.1 runs two processes here)"
        )
    return hosts


def machine_count(hosts: str | None, machines: int | None) -> int:
    """macft plan --hosts/--machines: how many machines share each step."""
    n = len(parse_hosts(hosts)) if hosts else None
    if n is not None and machines is not None and n != machines:
        raise MacftError(f"--hosts names {n} machines but --machines says {machines}")
    return n or machines or 1


def _address(host: str) -> str:
    if host == "localhost":
        return LOCAL
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        return socket.gethostbyname(host)
    except OSError:
        raise MacftError(
            f"--hosts: cannot resolve {host!r}; give its IP address, or a name this Mac "
            "resolves (ssh to it must work too, e.g. mac2.local)"
        ) from None


def ring_hostfile(hosts: list[str]) -> dict:
    """The JSON hostfile mlx.launch reads: whom to ssh into and the IP the ring connects to.

    The ring backend needs IP addresses; a name is resolved here. Loopback addresses only
    work when every rank runs on this machine."""
    ips = [_address(h) for h in hosts]
    loop = [ipaddress.ip_address(ip).is_loopback for ip in ips]
    if any(loop) and not all(loop):
        h, ip = next((h, ip) for h, ip, lo in zip(hosts, ips, loop, strict=True) if lo)
        raise MacftError(
            f"--hosts: {h} is {ip} here, which the other machines cannot reach; give its "
            "network address instead (on a Mac: ipconfig getifaddr en0)"
        )
    entries = [
        {"ssh": LOCAL if lo else h, "ips": [LOCAL if lo else ip], "rdma": []}
        for h, ip, lo in zip(hosts, ips, loop, strict=True)
    ]
    return {"backend": "ring", "envs": [], "hosts": entries}


def _free_port(n: int) -> int:
    """A first port with n free ones after it (the ring listens on one port per rank)."""
    for _ in range(50):
        port = random.randint(20000, 60000 - n)
        try:
            for p in range(port, port + n):
                with socket.socket() as s:
                    s.bind((LOCAL, p))
            return port
        except OSError:
            continue
    raise RunError("no free TCP ports on 127.0.0.1 for the ranks to talk over")


def command_argv(ctx, skip=("hosts", "hostfile")) -> list[str]:
    """The click command line again, without the options that launched it."""
    argv = [ctx.info_name]
    for p in ctx.command.params:
        value = ctx.params.get(p.name)
        if p.name in skip or value is None or value is False or value == ():
            continue
        flag = max((o for o in p.opts if o.startswith("--")), key=len)
        if getattr(p, "is_flag", False):
            argv.append(flag)
        elif getattr(p, "multiple", False):
            argv += [x for v in value for x in (flag, str(v))]
        else:
            argv += [flag, str(value)]
    return argv


def launcher() -> list[str]:
    """mlx.launch as a command, through the same Python that runs macft."""
    ep = next(iter(entry_points(group="console_scripts", name="mlx.launch")), None)
    if ep is None:
        raise RunError("mlx.launch not found: reinstall mlx (pip install -U mlx)")
    module, attr = ep.value.split(":")
    return python_code(f"from {module} import {attr} as m; sys.argv[0] = 'mlx.launch'; m()")


def launch(argv: list[str], hosts: str | None, hostfile: str | None) -> None:
    """Run `macft ARGV` as one rank per host through mlx.launch; raise if any rank failed.

    Every Mac needs the same Python environment at the same path (sys.executable), and the
    data, model and recipe at the same paths relative to the same working folder."""
    from macft.train.parallel.world import TIMEOUT_ENV, launched

    if launched():  # started by mlx.launch already: each rank would launch a ring of its own
        raise MacftError("--hosts: this macft already runs as one rank of mlx.launch; drop it")
    with tempfile.TemporaryDirectory(prefix="macft-hosts-") as tmp:
        args = []
        if hostfile is None:
            spec = ring_hostfile(parse_hosts(hosts))
            hostfile = str(Path(tmp) / "hostfile.json")
            Path(hostfile).write_text(json.dumps(spec, indent=2))
            if all(h["ssh"] == LOCAL for h in spec["hosts"]):
                args += ["--starting-port", str(_free_port(len(spec["hosts"])))]
        elif hosts:
            raise MacftError("--hosts and --hostfile: give one of them")
        # mlx.launch reaches other Macs over ssh, which drops this shell's variables
        for name in (TIMEOUT_ENV,):
            if os.environ.get(name):
                args += ["--env", f"{name}={os.environ[name]}"]
        cmd = [*launcher(), "--hostfile", hostfile, *args, "--"]
        cmd += macft_command(*argv)
        failed = _run(cmd)
    if failed:
        rank, code = next(((r, c) for r, c in failed if c not in STOPPED_CODES), failed[0])
        if code is None or code < 0:
            how = f"rank {rank} was killed" + (f" (signal {-code}; out of memory?)" if code else "")
        else:
            how = f"rank {rank} stopped (exit code {code}); its message above says why"
        others = sorted(r for r, _ in failed if r != rank)
        if others:
            ranks = ", ".join(map(str, others))
            how += f"; then mlx.launch stopped rank{'s' if len(others) > 1 else ''} {ranks}"
        raise RunError(how)


def _run(cmd: list[str]) -> list[tuple[int, int | None]]:
    """Run mlx.launch, pass its output through, and collect the ranks that ended badly."""
    # stdin: an open pipe; on /dev/null mlx.launch's input loop spins.
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    failed = []
    try:
        for line in proc.stderr:
            sys.stderr.buffer.write(line)
            sys.stderr.flush()
            for m in NODE_RE.finditer(line.decode(errors="replace")):
                failed.append((int(m[1]), int(m[2]) if m[2] is not None else None))
    except KeyboardInterrupt:  # Ctrl-C reaches the ranks too: let rank 0 save a checkpoint
        proc.wait()
        raise
    finally:
        proc.stdin.close()
    proc.wait()
    return failed
