"""Merge methods against hand-computed cases; coefficient-only adaptation on real data."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jsubspace.compress import SubspaceDense
from jsubspace.compress import count_parameters
from jsubspace.compress import dare
from jsubspace.compress import merge
from jsubspace.compress import subspace_merge
from jsubspace.compress import subspace_params
from jsubspace.compress import train_coefficients

TAU = np.array([[1.0, -2.0, 3.0, 0.5], [-1.0, -1.5, 2.0, 0.1], [2.0, 1.0, -0.5, 0.2]])


def test_ties_sign_election_and_trimming_by_hand():
    base = np.full(4, 10.0)
    got = merge("ties", base, base + TAU, density=0.5)
    # trimmed: [0,-2,3,0], [0,-1.5,2,0], [2,1,0,0]; signs of the sums: +,-,+,0;
    # disjoint means: 2, (-2-1.5)/2, (3+2)/2, 0.
    np.testing.assert_allclose(got, base + [2.0, -1.75, 2.5, 0.0])
    weighted = merge("ties", base, base + TAU, density=0.5, weight=[1.0, 3.0, 1.0], lam=0.5)
    np.testing.assert_allclose(
        weighted, base + 0.5 * np.array([2.0, (-2.0 - 4.5) / 4, (3.0 + 6.0) / 4, 0.0])
    )


def test_task_arithmetic_and_mean_by_hand():
    base = np.zeros(4)
    np.testing.assert_allclose(
        merge("task_arithmetic", base, TAU, lam=0.3), 0.3 * TAU.sum(0), rtol=1e-6
    )
    np.testing.assert_allclose(
        merge("task_arithmetic", base, TAU, weight=[1, 0, 2]), TAU[0] + 2 * TAU[2], rtol=1e-6
    )
    np.testing.assert_allclose(merge("mean", base, TAU), TAU.mean(0), rtol=1e-6)


def test_dare_rescaling_exact_and_in_expectation():
    tau = jnp.asarray(np.random.default_rng(0).standard_normal((3, 50)), jnp.float32)
    dropped = dare(tau, density=0.25, key=jax.random.key(7))
    kept = np.asarray(dropped) != 0
    np.testing.assert_allclose(np.asarray(dropped)[kept], np.asarray(tau)[kept] / 0.25, rtol=1e-6)
    assert 0.1 < kept.mean() < 0.4
    again = dare(tau, density=0.25, key=jax.random.key(7))
    np.testing.assert_array_equal(dropped, again)  # seeded
    many = jax.vmap(lambda k: dare(tau, density=0.25, key=k))(
        jax.random.split(jax.random.key(1), 4000)
    )
    mean = np.asarray(many).mean(0)
    stderr = np.abs(np.asarray(tau)) * np.sqrt((1 - 0.25) / 0.25 / 4000)
    assert np.all(np.abs(mean - np.asarray(tau)) < 5 * stderr + 1e-6)
    with pytest.raises(ValueError, match="explicit PRNG key"):
        merge("dare_linear", np.zeros(4), TAU)


def test_subspace_merge_of_centred_coefficients_is_the_mean():
    rng = np.random.default_rng(2)
    tau = rng.standard_normal((5, 12, 9)).astype(np.float32)
    base = rng.standard_normal((12, 9)).astype(np.float32)
    u = np.linalg.qr(rng.standard_normal((12, 3)))[0].astype(np.float32)
    v = np.linalg.qr(rng.standard_normal((9, 3)))[0].astype(np.float32)
    centred = subspace_merge(base, tau, u, v, center=True)
    np.testing.assert_allclose(centred, merge("mean", base, base + tau), atol=1e-5)
    # Uncentred coefficients are not the mean in a partial basis ...
    partial = subspace_merge(base, tau, u, v, combine="mean")
    assert np.abs(np.asarray(partial) - np.asarray(merge("mean", base, base + tau))).max() > 0.1
    # ... but are in a complete one.
    uf = np.linalg.qr(rng.standard_normal((12, 12)))[0].astype(np.float32)
    vf = np.linalg.qr(rng.standard_normal((9, 9)))[0].astype(np.float32)
    np.testing.assert_allclose(subspace_merge(base, tau, uf, vf), base + tau.mean(0), atol=1e-5)


def _digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return jnp.asarray(x / 16.0, jnp.float32), jnp.asarray(y)


def _train_mlps(x, y, seeds, subsets, steps=150):
    """vmapped training of small MLPs (64 -> 32 -> 10), each on its own class subset."""

    def init(key):
        k1, k2 = jax.random.split(key)
        return {
            "w1": jax.random.normal(k1, (64, 32)) * 0.2,
            "b1": jnp.zeros(32),
            "w2": jax.random.normal(k2, (32, 10)) * 0.2,
            "b2": jnp.zeros(10),
        }

    def loss(p, mask):
        h = jax.nn.relu(x @ p["w1"] + p["b1"])
        logits = h @ p["w2"] + p["b2"]
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return jnp.sum(nll * mask) / jnp.sum(mask)

    opt = optax.adam(3e-2)
    params = jax.vmap(init)(jnp.stack([jax.random.key(s) for s in seeds]))
    masks = jnp.stack([jnp.isin(y, jnp.asarray(s)).astype(jnp.float32) for s in subsets])
    state = jax.vmap(opt.init)(params)

    @jax.jit
    def step(p, s):
        g = jax.vmap(jax.grad(loss))(p, masks)
        upd, s = jax.vmap(opt.update)(g, s, p)
        return optax.apply_updates(p, upd), s

    for _ in range(steps):
        params, state = step(params, state)
    return params, loss


def test_coefficient_only_adaptation_trains_with_k_squared_parameters():
    x, y = _digits()
    subsets = [
        (0, 1, 2, 3, 4),
        (5, 6, 7, 8, 9),
        (0, 2, 4, 6, 8),
        (1, 3, 5, 7, 9),
        (0, 1, 5, 6, 7),
        (2, 3, 4, 8, 9),
    ]
    population, loss = _train_mlps(x, y, seeds=range(6), subsets=subsets)
    w1 = np.asarray(population["w1"], np.float64)  # [6, 64, 32]
    centre = w1.mean(0)
    xc = w1 - centre
    k = 4
    u = np.linalg.eigh(np.einsum("imn,ikn->mk", xc, xc))[1][:, ::-1][:, :k]
    v = np.linalg.eigh(np.einsum("imn,imk->nk", xc, xc))[1][:, ::-1][:, :k]
    mean_model = jax.tree.map(lambda a: jnp.mean(a, axis=0), population)
    layer = SubspaceDense(
        w0=jnp.asarray(centre, jnp.float32),
        u=jnp.asarray(u, jnp.float32),
        v=jnp.asarray(v, jnp.float32),
        bias=mean_model["b1"],
    )
    params = layer.init(jax.random.key(0), x[:2])
    assert count_parameters(params) == k * k
    new_task = jnp.isin(y, jnp.asarray((3, 4, 5, 6))).astype(jnp.float32)  # an unseen subset

    def task_loss(p, batch):
        h = jax.nn.relu(layer.apply(p, x))
        logits = h @ mean_model["w2"] + mean_model["b2"]
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return jnp.sum(nll * new_task) / jnp.sum(new_task)

    before = float(task_loss(params, None))
    params, losses = train_coefficients(task_loss, params, [None] * 60, optimizer=optax.adam(5e-2))
    assert losses[-1] < 0.8 * before, (before, losses[-1])
    # The plain pytree form gives the same kernel as the Flax layer.
    c = params["params"]["coefficients"]
    tree = subspace_params(
        {"w1": layer.w0, "b1": layer.bias},
        {"w1": (layer.u, layer.v), "b1": None},
        {"w1": c, "b1": None},
    )
    np.testing.assert_allclose(tree["w1"], layer.w0 + layer.u @ c @ layer.v.T, rtol=1e-6)
    lora_style = SubspaceDense(w0=layer.w0, u=layer.u, v=layer.v, mode="lora", rank=2)
    assert count_parameters(lora_style.init(jax.random.key(1), x[:2])) == 2 * k * 2
