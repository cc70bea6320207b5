"""`jaxlm launch`: several local processes of one `jaxlm` command, joined into one run.

For development and tests on one machine: process i gets JAX_COORDINATOR_ADDRESS (a free
port on 127.0.0.1), JAX_NUM_PROCESSES and JAX_PROCESS_ID, and with `devices_per_process`
that many CPU devices (XLA's forced host device count; CPU collectives go through gloo).
Every output line is prefixed with `[i]`. SIGINT and SIGTERM are forwarded to every
process. When a process fails, the others get `grace_s` seconds to notice by themselves
(their heartbeat watchdog stops them, as it would on a cluster) before they are killed;
the exit status is the first failure's (128 + N for signal N), else 75 when the run
stopped on a signal, else 0.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

from jaxlm.errors import EXIT_OK, EXIT_PREEMPTED


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(base: dict, index: int, processes: int, port: int, devices_per_process: int) -> dict:
    """The environment of process `index`: the explicit join settings, and its CPU devices."""
    env = dict(base)
    env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(processes),
               JAX_PROCESS_ID=str(index), PYTHONUNBUFFERED="1")
    if devices_per_process:
        flags = [f for f in env.get("XLA_FLAGS", "").split()
                 if not f.startswith("--xla_force_host_platform_device_count=")]
        env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices_per_process}"])
        env["JAX_NUM_CPU_DEVICES"] = str(devices_per_process)
        env.setdefault("JAX_PLATFORMS", "cpu")
    return env


def _pump(stream, prefix: str, out) -> None:
    for line in iter(stream.readline, b""):
        out.buffer.write(prefix.encode() + line)
        out.flush()
    stream.close()


def _status(code: int) -> int:
    return 128 - code if code < 0 else code


class Launch:
    def __init__(self, command: list[str], processes: int, devices_per_process: int = 0, grace_s: float = 90.0,
                 log=None):
        self.command, self.processes, self.devices, self.grace_s = command, processes, devices_per_process, grace_s
        self.log = log or (lambda m: print(f"[launch] {m}", file=sys.stderr, flush=True))
        self.procs: list[subprocess.Popen] = []

    def start(self) -> None:
        port = free_port()
        for i in range(self.processes):
            env = child_env(os.environ, i, self.processes, port, self.devices)
            p = subprocess.Popen([sys.executable, "-m", "jaxlm.cli", *self.command], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for stream, out in ((p.stdout, sys.stdout), (p.stderr, sys.stderr)):
                threading.Thread(target=_pump, args=(stream, f"[{i}] ", out), daemon=True).start()
            self.procs.append(p)
            self.log(f"process {i}: pid {p.pid}")

    def forward(self, signum, frame) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signum)

    def wait(self) -> int:
        """Wait for every process; the launch's exit status (see the module docstring)."""
        first, deadline = None, None
        while [p.poll() for p in self.procs].count(None):
            if first is None:
                first = next(((i, p.returncode) for i, p in enumerate(self.procs)
                              if p.returncode not in (None, EXIT_OK, EXIT_PREEMPTED)), None)
                if first is not None:
                    deadline = time.monotonic() + self.grace_s
                    self.log(f"process {first[0]} failed with exit status {_status(first[1])}; waiting up to "
                             f"{self.grace_s:.0f}s for the others to stop")
            if deadline is not None and time.monotonic() > deadline:
                for i, p in enumerate(self.procs):
                    if p.poll() is None:
                        self.log(f"killing process {i}")
                        p.kill()
                break
            time.sleep(0.1)
        codes = [p.wait() for p in self.procs]
        if first is not None:
            return _status(first[1])
        failed = [c for c in codes if c not in (EXIT_OK, EXIT_PREEMPTED)]
        if failed:
            return _status(failed[0])
        return EXIT_PREEMPTED if EXIT_PREEMPTED in codes else EXIT_OK


def launch(command: list[str], processes: int, devices_per_process: int = 0, grace_s: float = 90.0) -> int:
    """Run `jaxlm <command>` as `processes` joined local processes; their exit status."""
    run = Launch(command, processes, devices_per_process, grace_s)
    old = {s: signal.signal(s, run.forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        run.start()
        return run.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
