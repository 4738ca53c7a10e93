"""Two local processes under `jax.distributed` (gloo CPU collectives) equal one process."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from jsubspace import testing
from tests._distributed import free_port
from tests._distributed import wait_all

pytestmark = pytest.mark.multiprocess

_WORKER = textwrap.dedent("""
    import json, sys
    import jax
    jax.config.update("jax_num_cpu_devices", 2)
    from jsubspace import io, kernels, sharding
    address, pid, data, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    sharding.initialize_distributed(address, num_processes=2, process_id=pid)
    import numpy as np
    from jax.experimental import multihost_utils

    read = []
    pop = io.open_population(data)
    mesh = sharding.models_mesh()
    assert mesh.devices.size == 4 and jax.process_count() == 2
    results = {}
    for layer in pop.layers:
        if layer.kind == "dense":
            refs = []
            for ref in layer.refs:
                def reader(ref=ref):
                    read.append(ref.path)
                    return ref.reader()
                refs.append(io.TensorRef(ref.path, ref.name, ref.shape, ref.dtype, reader))
            layer = io.DenseLayer(layer.name, layer.shape, layer.stored_shape, layer.dtype,
                                  tuple(refs))
        placed = io.place_layer(layer, mesh)
        if layer.kind == "dense":
            g = kernels.mode_grams(placed.x, mesh=mesh, n_models=placed.n_models)
        else:
            g = kernels.lora_grams(placed.a, placed.b, placed.scales, mesh=mesh,
                                   n_models=placed.n_models)
        got = {}
        for mode in ("models", "rows", "cols"):
            full = multihost_utils.process_allgather(getattr(g, mode), tiled=True)
            got[mode] = np.linalg.eigvalsh(np.asarray(full, np.float64))[::-1].tolist()
        got["energy"] = float(g.total_energy.addressable_data(0))
        results[layer.name] = got
    # The memory budget is the smallest host's (every process plans the same routes): process
    # 1 sees half the RAM process 0 does.
    import os
    from jsubspace import spectra
    real = os.sysconf
    os.sysconf = lambda name: real(name) // (1 + pid) if name == "SC_PHYS_PAGES" else real(name)
    own = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    budget = spectra.default_memory_budget(mesh)
    os.sysconf = real
    with open(out, "w") as f:
        json.dump({"results": results, "read": sorted(set(read)), "own": own, "budget": budget}, f)
""")


def _eig64(x):
    return {
        "models": np.linalg.eigvalsh(np.einsum("imn,jmn->ij", x, x))[::-1],
        "rows": np.linalg.eigvalsh(np.einsum("imn,ikn->mk", x, x))[::-1],
        "cols": np.linalg.eigvalsh(np.einsum("imn,imk->nk", x, x))[::-1],
    }


@pytest.mark.parametrize("kind", ["dense", "lora"])
def test_two_processes_equal_one(tmp_path, kind):
    n = 6
    data = tmp_path / "pop"
    if kind == "dense":
        values = testing.planted_population(0, n_models=n, shape=(10, 8), rank=3).astype(np.float64)
        for i in range(n):
            testing.write_safetensors(
                data / f"m{i}.safetensors", {"w": values[i].astype(np.float32)}
            )
        x = values.astype(np.float32).astype(np.float64)
    else:
        a, b = testing.lora_population(1, n_models=n, shape=(10, 8), rank=2)
        for i in range(n):
            testing.write_peft_adapter(
                data / f"ad{i}", {"model.q_proj": (a[i], b[i])}, r=2, lora_alpha=4
            )
        x = 2.0 * np.einsum("imr,irn->imn", b.astype(np.float64), a)
    x = x - x.mean(0)
    address = f"127.0.0.1:{free_port()}"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                _WORKER,
                address,
                str(pid),
                str(data),
                str(tmp_path / f"out{pid}.json"),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for pid in range(2)
    ]
    wait_all(procs, timeout=240, what="distributed workers")
    outs = [json.loads((tmp_path / f"out{pid}.json").read_text()) for pid in range(2)]
    want = _eig64(x)
    for out in outs:
        (got,) = out["results"].values()
        for mode in ("models", "rows", "cols"):
            width = min(len(want[mode]), len(got[mode]))
            np.testing.assert_allclose(
                got[mode][:width], want[mode][:width], atol=1e-5 * want["models"][0]
            )
        np.testing.assert_allclose(got["energy"], np.sum(x * x), rtol=1e-5)
    smallest = min(out["own"] for out in outs)
    assert outs[1]["own"] < outs[0]["own"]
    for out in outs:
        assert smallest - 2**20 < out["budget"] <= smallest
    if kind == "dense":
        # Each host read only its own models' bytes. N = 6 is padded to 8 over 4 devices (2 per
        # device, 2 devices per process): process 0 holds models 0-3, process 1 models 4-5.
        reads = [{os.path.basename(p) for p in out["read"]} for out in outs]
        assert reads[0] == {f"m{i}.safetensors" for i in range(4)}
        assert reads[1] == {"m4.safetensors", "m5.safetensors"}
