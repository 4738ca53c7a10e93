"""SIGINT and SIGTERM stop a run within seconds at seeded points (inside a long native solve,
between layers, while a layer file is written), leave no torn file, and the resumed run's
output equals an uninterrupted one."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from jsubspace import testing

LAYERS = ("a.weight", "b.weight", "c.weight", "d.weight")

# Runs `jsubspace analyze` in this process with one seeded pause: `inside_solve` blocks the main
# thread in a long XLA computation (native code: Python's signal handlers cannot run) at the
# first eigen-solve of layer c; `between_layers` sleeps after layer b's file is written;
# `while_writing` sleeps inside the atomic write of layer c's file, before its rename. The
# driver touches MARKER when it is there.
DRIVER = textwrap.dedent(
    """
    import os, sys, time
    point, marker = sys.argv[1], sys.argv[2]
    import jax, jax.numpy as jnp
    from jax import lax
    from jsubspace.spectra import _analyze, _layer
    from jsubspace.run import _rundir
    from jsubspace.io import _atomic

    state = {"layer": None, "armed": True}

    def there():
        open(marker, "w").close()

    original_layer = _analyze.analyze_layer
    def analyze_layer(layer, *args, **kwargs):
        state["layer"] = layer.name
        return original_layer(layer, *args, **kwargs)
    _analyze.analyze_layer = analyze_layer
    import jsubspace.spectra
    jsubspace.spectra.analyze_layer = analyze_layer

    if point == "inside_solve":
        spin = jax.jit(lambda x: lax.fori_loop(0, 10**7, lambda i, y: jnp.tanh(y @ x), x))
        original_eig = _layer._eigvals
        def eigvals(gram):
            if state["layer"] == "c.weight" and state["armed"]:
                state["armed"] = False
                x = jnp.eye(256) * 0.5
                spin.lower(x).compile()
                there()
                spin(x).block_until_ready()
            return original_eig(gram)
        _layer._eigvals = eigvals
    elif point == "between_layers":
        original_write = _rundir.RunDirectory.write_layer
        def write_layer(self, i, record, encoded):
            original_write(self, i, record, encoded)
            if record["name"] == "b.weight":
                there()
                time.sleep(60)
        _rundir.RunDirectory.write_layer = write_layer
    elif point == "while_writing":
        original_replace = _atomic.os.replace
        class patched_os:
            def __getattr__(self, name):
                return getattr(os, name)
            def replace(self, src, dst):
                if dst.endswith("00002.json"):
                    there()
                    time.sleep(60)
                return original_replace(src, dst)
        _atomic.os = patched_os()

    from jsubspace.cli.main import run
    sys.argv = ["jsubspace", "analyze", *sys.argv[3:]]
    run()
    """
)


@pytest.fixture(scope="module")
def population(tmp_path_factory):
    root = tmp_path_factory.mktemp("interrupt")
    rng = np.random.default_rng(0)
    for i in range(6):
        testing.write_safetensors(
            root / "pop" / f"m{i}.safetensors",
            {name: rng.standard_normal((48, 40)).astype(np.float32) for name in LAYERS},
        )
    return root


def _flags(out):
    return [f"--out={out}", "--noplots", "--null_draws=1", "--holdout=3", "--quiet"]


def _records(out) -> list[dict]:
    with open(os.path.join(out, "spectra.json"), encoding="utf-8") as f:
        return testing.reproducible_layers(json.load(f))


@pytest.fixture(scope="module")
def uninterrupted(population):
    out = population / "whole"
    cmd = [sys.executable, "-m", "jsubspace.cli.main", "analyze", f"--models={population / 'pop'}"]
    subprocess.run(cmd + _flags(out), check=True, capture_output=True, timeout=600)
    return _records(out)


@pytest.mark.parametrize(
    "point,signum",
    [
        ("inside_solve", signal.SIGINT),
        ("between_layers", signal.SIGTERM),
        ("while_writing", signal.SIGINT),
    ],
)
def test_interrupt_is_prompt_clean_and_resumable(
    population, uninterrupted, tmp_path, point, signum
):
    out = tmp_path / "out"
    marker = tmp_path / "marker"
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    cmd = [sys.executable, str(driver), point, str(marker), f"--models={population / 'pop'}"]
    proc = subprocess.Popen(
        cmd + _flags(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.time() + 300
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.time() < deadline, "the run never reached the seeded point"
            time.sleep(0.05)
        time.sleep(0.3)
        sent = time.time()
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=30)
        took = time.time() - sent
    finally:
        proc.kill()  # a run that did not stop must not outlive the test
    assert took < 5, f"took {took:.1f}s to stop"
    assert proc.returncode == (130 if signum == signal.SIGINT else 143), err
    assert "interrupted" in err and "Traceback" not in err, err
    assert "run the same command again to resume" in err
    # No torn or temporary file, no final output that would look complete.
    names = {p.name for p in out.rglob("*")}
    assert not any(n.startswith(".tmp-") for n in names), names
    assert "spectra.json" not in names
    kept = sorted((out / "layers").iterdir())
    for path in kept:
        json.loads(path.read_text())  # every kept layer file is whole
    assert len(kept) in (2, 3 if point == "while_writing" else 2), [p.name for p in kept]
    # Resume: the same command finishes the run, and the result is the uninterrupted one's.
    resume = [sys.executable, "-m", "jsubspace.cli.main", "analyze"]
    done = subprocess.run(
        resume + [f"--models={population / 'pop'}"] + _flags(out),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert _records(out) == uninterrupted
