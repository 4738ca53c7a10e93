"""Layers placed on 1/2/4/8-device meshes: exact values, each device holding only its models."""

import json
import subprocess
import sys
import textwrap

import jax
import ml_dtypes
import numpy as np
import pytest

from jsubspace import NonFiniteError
from jsubspace import io
from jsubspace import sharding
from jsubspace import testing


def _population(tmp_path, n, dtype=np.float32, shape=(6, 5)):
    rng = np.random.default_rng(0)
    values = (rng.standard_normal((n, *shape)) * 3).astype(dtype)
    for i in range(n):
        testing.write_safetensors(
            tmp_path / f"m{i:02d}.safetensors", {"w": values[i], "v": values[i][:2] * 2}
        )
    return values, io.open_population(str(tmp_path))


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.float16])
def test_dense_layer_values_and_placement(tmp_path, mesh, dtype):
    values, pop = _population(tmp_path, 5, dtype)
    layer = next(layer for layer in pop.layers if layer.name == "w")
    placed = io.place_layer(layer, mesh)
    d = mesh.devices.size
    n_pad = sharding.padded_count(5, mesh)
    assert placed.n_models == 5 and placed.x.shape == (n_pad, 6, 5)
    assert placed.x.dtype == np.dtype(dtype)  # stored dtype kept
    full = np.asarray(placed.x)
    np.testing.assert_array_equal(full[:5], values)
    assert not full[5:].any()
    per = n_pad // d
    shards = sorted(placed.x.addressable_shards, key=lambda s: s.index[0].start or 0)
    assert len(shards) == d
    for k, shard in enumerate(shards):
        assert shard.index[0] == slice(k * per, (k + 1) * per) or (
            d == 1 and shard.index[0] == slice(None)
        )
        assert shard.data.shape == (per, 6, 5)
        np.testing.assert_array_equal(np.asarray(shard.data), full[k * per : (k + 1) * per])


def test_each_device_reads_only_its_models(tmp_path):
    values, pop = _population(tmp_path, 8)
    layer = next(layer for layer in pop.layers if layer.name == "w")
    reads = []
    refs = []
    for ref in layer.refs:

        def reader(ref=ref):
            reads.append(ref.path)
            return ref.reader()

        refs.append(io.TensorRef(ref.path, ref.name, ref.shape, ref.dtype, reader))
    layer = io.DenseLayer(layer.name, layer.shape, layer.stored_shape, layer.dtype, tuple(refs))
    io.place_layer(layer, sharding.models_mesh(4))
    assert sorted(reads) == sorted(r.path for r in refs)  # every model read exactly once


def test_lora_factors_placed_and_padded(tmp_path, mesh):
    rng = np.random.default_rng(1)
    written = []
    for i in range(3):
        r = 4 if i else 2  # one adapter of smaller rank
        a, b = rng.standard_normal((r, 6)), rng.standard_normal((5, r))
        testing.write_peft_adapter(
            tmp_path / f"ad{i}",
            {"model.q_proj": (a.astype(np.float32), b.astype(np.float32))},
            r=r,
            lora_alpha=8,
        )
        written.append((a, b, 8 / r))
    (layer,) = io.open_population(str(tmp_path)).layers
    placed = io.place_layer(layer, mesh)
    assert placed.a.shape[1:] == (4, 6) and placed.b.shape[1:] == (5, 4)
    a, b, s = (np.asarray(t, np.float64) for t in (placed.a, placed.b, placed.scales))
    for i, (ai, bi, si) in enumerate(written):
        np.testing.assert_allclose(s[i] * b[i] @ a[i], si * bi @ ai, rtol=1e-6, atol=1e-6)
    assert not s[3:].any()


def test_stream_layers_in_order_with_prefetch(tmp_path):
    values, pop = _population(tmp_path, 4)
    mesh = sharding.models_mesh(2)
    names = [layer.name for layer, _ in io.stream_layers(pop, mesh, prefetch=1)]
    assert names == [layer.name for layer in pop.layers]
    for layer, placed in io.stream_layers(pop, mesh, prefetch=0):
        if layer.name == "w":
            np.testing.assert_array_equal(np.asarray(placed.x)[:4], values)


def test_nonfinite_values_reported_per_model_and_layer(tmp_path):
    values, _ = _population(tmp_path, 3)
    bad = values[1].copy()
    bad[0, 0], bad[2, 3] = np.nan, np.inf
    testing.write_safetensors(tmp_path / "m01.safetensors", {"w": bad, "v": values[1][:2]})
    pop = io.open_population(str(tmp_path))
    with pytest.raises(NonFiniteError) as err:
        list(io.stream_layers(pop, sharding.models_mesh(2)))
    assert err.value.where == [("m01", "w", 2)]
    assert "model 'm01' layer 'w': 2 non-finite values" in str(err.value)


@pytest.mark.parametrize("d", [1, 4])
def test_host_nonfinite_counts_equal_the_jitted_count(d):
    from jsubspace.io import _placement

    mesh = sharding.models_mesh(d)
    x = np.random.default_rng(0).standard_normal((8, 5, 6)).astype(ml_dtypes.bfloat16)
    x[1, 0, 0], x[1, 4, 5], x[6, 2, 2], x[7, 0, 1] = np.nan, np.inf, -np.inf, np.nan
    placed = jax.device_put(x, sharding.stacked_sharding(mesh))
    host = _placement._host_nonfinite_counts(placed)
    np.testing.assert_array_equal(host, [0, 2, 0, 0, 0, 0, 1, 1])
    np.testing.assert_array_equal(host, np.asarray(_placement._nonfinite_counts(placed)))


_RSS_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    import jax
    jax.config.update("jax_num_cpu_devices", 2)
    import numpy as np
    from jsubspace import io, kernels, sharding
    pop = io.open_population(sys.argv[1])
    mesh = sharding.models_mesh(2)
    (layer,) = pop.layers
    blocks = lambda: io.iter_model_blocks(layer, mesh, block_models=4)
    g = kernels.streaming_mode_grams(blocks, mesh=mesh, shape=layer.shape, modes=("cols",))
    g.total_energy.block_until_ready()
    print(json.dumps({"rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      "energy": float(g.total_energy)}))
""")


def test_streaming_peak_rss_is_independent_of_n(tmp_path):
    # One 8 MB layer (2048 x 1024 f32); N = 16 and N = 64 models streamed 4 at a time.
    rng = np.random.default_rng(2)
    peaks = {}
    for n in (16, 64):
        d = tmp_path / f"n{n}"
        for i in range(n):
            testing.write_safetensors(
                d / f"m{i:02d}.safetensors",
                {"w": rng.standard_normal((2048, 256)).astype(np.float32).repeat(4, axis=1)},
            )
        out = subprocess.run(
            [sys.executable, "-c", _RSS_SCRIPT, str(d)], capture_output=True, text=True, check=True
        )
        peaks[n] = json.loads(out.stdout.strip().splitlines()[-1])["rss_kb"]
    layer_mb = 2048 * 1024 * 4 / 2**20
    grown_mb = (peaks[64] - peaks[16]) / 1024
    # 48 more models is 384 MB more data; streaming keeps the growth to a few layers' worth
    # (allocator and page-cache noise included), an eighth of what holding them would cost.
    assert grown_mb < 6 * layer_mb, (peaks, grown_mb)
