"""Helpers for tests that start several local `jax.distributed` processes."""

import os
import socket
import subprocess
import sys

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_analyze(args, *, processes: int = 2, devices: int = 2, stderr=subprocess.STDOUT):
    """Starts `jsubspace analyze ARGS` as `processes` local processes of one distributed run."""
    port = free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "jsubspace.cli.main",
                "analyze",
                *args,
                f"--num_cpu_devices={devices}",
                f"--coordinator_address=127.0.0.1:{port}",
                f"--num_processes={processes}",
                f"--process_id={pid}",
            ],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            # Unlike string hashing per process (seeds 0 and 1 order {"rows", "cols"} both
            # ways): code that reaches collectives in a set's order deadlocks here every time.
            env=dict(env, PYTHONHASHSEED=str(pid)),
        )
        for pid in range(processes)
    ]


def wait_all(procs, *, timeout: float, what: str) -> list[str]:
    """Waits for every process; kills all and fails the test if one hangs. Returns stdouts."""
    logs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"{what} hung")
        assert p.returncode == 0, out[-3000:]
        logs.append(out)
    return logs
