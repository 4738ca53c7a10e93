"""benchmarks/scale.py, the pod-scale model behind benchmarks/SCALE.md: on one host with one
device it is the layer plan's own estimate, and the mesh divides what it should."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CHECK = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import scale
from jsubspace import config, io, spectra

rates = spectra.MachineRates(gemm=1e11, eigh=5e10, read=1e9, overhead=0.01, stream=1e8, draw=5e7)
shapes = {"a": (768, 2304), "b": (50257, 768), "c": (1024, 4096)}
out = {"plan": {}, "model": {}, "hosts": {}}
for name, (m, n) in shapes.items():
    refs = tuple(io.TensorRef(f"m{i}", name, (m, n), "bfloat16", None) for i in range(16))
    layer = io.DenseLayer(name, (m, n), (m, n), "bfloat16", refs)
    plan = spectra.plan_layer(layer, n_pad=16, spectra=config.SpectraConfig(),
                              controls=config.ControlConfig(), rates=rates)
    out["plan"][name] = plan.parts
    one = scale.Mesh(hosts=1, devices_per_host=1, read=1e9, net=1e9, latency=1e-4)
    found = scale.predict_layer(name, (m, n), 16, "bfloat16", one, rates,
                                config.SpectraConfig(), config.ControlConfig())
    out["model"][name] = found["parts"]
    for hosts in (1, 2, 4):
        mesh = scale.Mesh(hosts=hosts, devices_per_host=2, read=1e9, net=1e9, latency=1e-4)
        found = scale.predict_layer(name, (m, n), 16, "bfloat16", mesh, rates,
                                    config.SpectraConfig(), config.ControlConfig())
        out["hosts"].setdefault(name, {})[hosts] = [
            found["read_bytes_per_host"], found["collective_bytes_per_host"],
            found["working_set_per_device"]]
print(json.dumps(out))
"""


def test_the_scale_model_is_the_plan_on_one_device_and_divides_over_hosts():
    done = subprocess.run(
        [sys.executable, "-c", _CHECK, os.path.join(ROOT, "benchmarks")],
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    for name, parts in out["plan"].items():
        for part, seconds in parts.items():
            assert abs(out["model"][name][part] - seconds) <= 1e-9 * max(1.0, seconds), (
                name,
                part,
            )
    for by_hosts in out["hosts"].values():
        (r1, c1, w1), (r2, c2, w2), (r4, c4, w4) = (by_hosts[h] for h in ("1", "2", "4"))
        assert r2 == r1 / 2 and r4 == r1 / 4  # each host reads its own models' bytes
        assert c1 == 0 < c2  # one host moves nothing over its link
        assert w4 < w2 < w1  # fewer models per device
