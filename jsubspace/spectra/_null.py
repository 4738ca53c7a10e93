"""The `null` control: the same statistic on a matched Gaussian population.

Each model's `X_i` is replaced by an iid Gaussian matrix of the same Frobenius norm (for LoRA,
Gaussian rank-r factors whose update has the norm of `dW_i`), then centred and analysed exactly
like the real population. Random draws are keyed by model index, not by device, so the numbers
do not depend on the mesh. The Marchenko–Pastur expectation is given beside the draws.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jsubspace import kernels
from jsubspace.io import PlacedDense
from jsubspace.io import PlacedLora
from jsubspace.sharding._mesh import MODELS
from jsubspace.sharding._mesh import stacked_sharding
from jsubspace.spectra import _layer
from jsubspace.spectra._summary import cev

EXCESS_KS = (1, 2, 4, 8, 16, 32, 64)
# Models whose null factors are drawn in one step (`null_lora_factors`).
NULL_CHUNK = 8


def _model_keys(key, n_local):
    first = lax.axis_index(MODELS) * n_local
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(first + jnp.arange(n_local))


@kernels.chunkable_jit(
    static_argnames=("mesh", "shape", "dtype", "one_at_a_time"), flag="one_at_a_time"
)
def gaussian_stack(
    key: jax.Array, norms: jax.Array, *, mesh: Mesh, shape, dtype=jnp.float32, one_at_a_time=False
) -> jax.Array:
    """`f32[N_pad, *shape]` iid Gaussian models, model i scaled to Frobenius norm `norms[i]`.

    Args:
        key: PRNG key; model i draws from `fold_in(key, i)` whatever the mesh.
        norms: `f32[N_pad]` sharded over `models` (zero for padding).
        mesh: the mesh.
        shape: per-model shape.
        dtype: the stored dtype of the draws (bfloat16 for the chunked route's null of a
            2-byte layer, which takes the real stack's place in memory).
        one_at_a_time: each model drawn and scaled in float32 alone, then stored (the chunked
            route: no float32 temporary of the whole stack). The same values.
    """

    def body(k, nb):
        # nb: f32[N/d]
        keys = _model_keys(k, nb.shape[0])
        if one_at_a_time:

            def one(pair):
                kk, norm = pair
                z = jax.random.normal(kk, shape, jnp.float32)
                return (z * (norm / jnp.sqrt(jnp.sum(z * z)))).astype(dtype)

            return lax.map(one, (keys, nb))
        z = jax.vmap(lambda kk: jax.random.normal(kk, shape, jnp.float32))(keys)
        size = jnp.sqrt(jnp.sum(z * z, axis=tuple(range(1, z.ndim))))
        return z * (nb / size).reshape((-1,) + (1,) * len(shape))

    return jax.shard_map(body, mesh=mesh, in_specs=(P(), P(MODELS)), out_specs=P(MODELS))(
        key, norms
    )


def marchenko_pastur_eigenvalues(p: int, q: int, total_energy: float) -> np.ndarray:
    """Expected descending eigenvalues of `Y Y^T` for `Y: [p, q]` iid with `||Y||_F^2 = E`.

    The Marchenko–Pastur law with ratio `min(p,q)/max(p,q)`, read at the quantiles
    `(j - 1/2) / min(p, q)`; the `|p - q|` trailing eigenvalues are zero. Normalised to sum to E.
    """
    lo, hi = min(p, q), max(p, q)
    y = lo / hi
    a, b = (1 - np.sqrt(y)) ** 2, (1 + np.sqrt(y)) ** 2
    theta = np.linspace(0.0, np.pi, 8193)
    x = a + (b - a) * (1 - np.cos(theta)) / 2  # denser grid near the edges
    dens = np.sqrt(np.clip((b - x) * (x - a), 0, None)) / (2 * np.pi * y * np.maximum(x, 1e-300))
    cdf = np.concatenate([[0.0], np.cumsum((dens[1:] + dens[:-1]) / 2 * np.diff(x))])
    cdf /= cdf[-1]
    quantiles = np.interp((np.arange(lo) + 0.5) / lo, cdf, x)[::-1]
    out = np.zeros(p)
    out[:lo] = quantiles
    return out * (total_energy / out.sum()) if out.sum() > 0 else out


def _mp_for_mode(mode: str, n_models: int, shape, centred: bool) -> tuple[int, int]:
    # Mean-centring leaves N - 1 independent models.
    m, n = shape
    k = n_models - 1 if centred else n_models
    return {"models": (k, m * n), "rows": (m, k * n), "cols": (n, k * m)}[mode]


@functools.partial(jax.jit, static_argnames=("dim",))
def bartlett_diagonal(key: jax.Array, dof, *, dim: int) -> jax.Array:
    """`f32[dim]`: `sqrt(chi^2(dof - i))`, the diagonal of a Bartlett factor.

    Jitted apart (with `dof` traced): JAX's gamma sampler takes seconds to compile on CPU, and
    this way it compiles once per `dim` instead of inside every null kernel.
    """
    df = jnp.asarray(dof, jnp.float32) - jnp.arange(dim, dtype=jnp.float32)
    return jnp.sqrt(jax.random.chisquare(key, df, shape=(dim,), dtype=jnp.float32))


def gram_factor(key: jax.Array, dim: int, dof: int, diagonal: jax.Array | None = None) -> jax.Array:
    """`F` with `F^T F` distributed as the Gram `Z^T Z` of a `dof x dim` iid N(0, 1) matrix `Z`.

    `F = Z` itself when `dof < dim`; otherwise the transposed Bartlett factor `L^T` of the
    Wishart_dim(dof, I) law (`L` lower triangular, `L_ii^2 ~ chi^2(dof - i)`, `L_ij ~ N(0, 1)`
    below the diagonal): its Gram needs no `dof`-long products, and `F` is already the
    triangular root the rows / cols matrices need. `diagonal`: `bartlett_diagonal` of
    `split(key)[1]`, when computed beforehand (`null_diagonals`).
    """
    if dof < dim:
        return jax.random.normal(key, (dof, dim), jnp.float32)
    k_off, k_diag = jax.random.split(key)
    below = jnp.tril(jax.random.normal(k_off, (dim, dim), jnp.float32), -1)
    if diagonal is None:
        diagonal = bartlett_diagonal(k_diag, dof, dim=dim)
    return (below + jnp.diag(diagonal)).T


def null_diagonals(key: jax.Array, *, nr: int, m: int, n: int) -> tuple[jax.Array, jax.Array]:
    """The Bartlett diagonals `null_lora_grams(key, ...)` uses for its A and B factors (zeros
    where a factor is drawn as a plain Gaussian matrix)."""
    k_a, k_b = jax.random.split(key)
    return tuple(
        bartlett_diagonal(jax.random.split(k)[1], dof, dim=nr)
        if dof >= nr
        else jnp.zeros(nr, jnp.float32)
        for k, dof in ((k_a, n), (k_b, m))
    )


def _gram_of_factor(f: jax.Array) -> jax.Array:
    """`F^T F`; for a square upper-triangular `F` (Bartlett) in half the flops of one GEMM:
    with `F = [[F11, F12], [0, F22]]` the zero block is never multiplied and the lower-left block
    is the transpose of the upper-right."""
    rows, dim = f.shape
    if rows != dim or dim < 256:
        return jnp.matmul(f.T, f, precision=kernels.HIGHEST)
    h = dim // 2
    f11, f12, f22 = f[:h, :h], f[:h, h:], f[h:, h:]
    top = jnp.matmul(f11.T, f11, precision=kernels.HIGHEST)
    cross = jnp.matmul(f11.T, f12, precision=kernels.HIGHEST)
    corner = jnp.matmul(f12.T, f12, precision=kernels.HIGHEST) + jnp.matmul(
        f22.T, f22, precision=kernels.HIGHEST
    )
    return jnp.block([[top, cross], [cross.T, corner]])


@functools.partial(jax.jit, static_argnames=("m", "n", "r", "n_pad", "n_models", "center", "modes"))
def null_lora_grams(
    key: jax.Array,
    mask: jax.Array,
    energies: jax.Array,
    diagonals: tuple[jax.Array, jax.Array],
    *,
    m: int,
    n: int,
    r: int,
    n_pad: int,
    n_models: int,
    center: str,
    modes: tuple[str, ...],
) -> tuple[kernels.LoraGrams, jax.Array, jax.Array]:
    """Factor-space Grams of a matched Gaussian LoRA population, drawn without its factors.

    Model i gets iid Gaussian `B_i` (m x r) and `A_i` (r x n), its missing rank slots zeroed
    (`mask`), and a scale that gives its update `s_i B_i A_i` the energy `energies[i]` of the real
    one. Only the Gram (or root) of the stacked factors is drawn (`gram_factor`), so a draw costs
    `O((Nr)^3)` instead of `O((m + n) (Nr)^2)` and reads nothing. The draw depends on the key and
    the shapes only, not on the mesh (it is computed whole, replicated).

    Args:
        key: PRNG key.
        mask: `f32[N_pad * r]`, 1 for existing factor rows / columns.
        energies: `f32[N_pad]`, `||dW_i||_F^2` of the real models (zero for padding).
        diagonals: `null_diagonals(key, ...)`.
        m, n, r, n_pad, n_models: shapes; center: as in `kernels.lora_grams`.
        modes: which of 'rows' / 'cols' to build.

    Returns:
        `(grams, F_A, F_B)`: the Grams and the drawn factors with `F^T F = G` (upper triangular
        when square), for modes solved on the host.
    """
    nr = n_pad * r
    k_a, k_b = jax.random.split(key)
    f_a = gram_factor(k_a, nr, n, diagonals[0]) * mask[None, :]
    f_b = gram_factor(k_b, nr, m, diagonals[1]) * mask[None, :]
    ga, gb = _gram_of_factor(f_a), _gram_of_factor(f_b)
    # ||B_i A_i||_F^2 = tr((B_i^T B_i)(A_i A_i^T)) from the diagonal blocks.
    own = jnp.einsum(
        "iaic,iaic->i",
        ga.reshape(n_pad, r, n_pad, r),
        gb.reshape(n_pad, r, n_pad, r),
        precision=kernels.HIGHEST,
    )
    scales = jnp.where(energies > 0, jnp.sqrt(energies / jnp.maximum(own, 1e-30)), 0.0)
    grams = kernels.mode_matrices(
        ga,
        gb,
        scales,
        n_models=n_models,
        center=center,
        root_a=f_a if "cols" in modes else None,
        root_b=f_b if "rows" in modes else None,
    )
    return grams, f_a, f_b


@functools.partial(jax.jit, static_argnames=("mesh", "m", "n", "dtype"))
def null_lora_factors(
    key: jax.Array, mask: jax.Array, energies: jax.Array, *, mesh: Mesh, m: int, n: int, dtype
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A matched Gaussian LoRA population as stored factors, for the side-space kernels.

    Model i draws `A_i` (r x n) and `B_i` (m x r) iid N(0, 1) from `fold_in(key, i)`, whatever
    the mesh; rank slots it lacks are zero (`mask`). The factors are kept in the real population's
    stored `dtype`, so the null costs the memory of the real factors and no more; its scale is
    computed from the rounded factors, so `s_i B_i A_i` has exactly the energy `energies[i]`.
    Models are drawn in chunks of up to `NULL_CHUNK` (`lax.map`): no float32 copy of the whole
    stack is made.

    Args:
        key: PRNG key.
        mask: `f32[N_pad, r]` sharded over `models`, 1 for existing rank slots.
        energies: `f32[N_pad]` sharded over `models`, `||dW_i||_F^2` (zero for padding).
        mesh: the mesh; m, n: the sides; dtype: the stored dtype.

    Returns:
        `(a dtype[N_pad, r, n], b dtype[N_pad, m, r], scales f32[N_pad])`, sharded over `models`.
    """

    def draw(k, row):
        k_a, k_b = jax.random.split(k)
        a = (jax.random.normal(k_a, (row.shape[0], n), jnp.float32) * row[:, None]).astype(dtype)
        b = (jax.random.normal(k_b, (m, row.shape[0]), jnp.float32) * row[None, :]).astype(dtype)
        return a, b

    def scale(args):
        a, b, energy = args
        a32, b32 = a.astype(jnp.float32), b.astype(jnp.float32)
        own = jnp.sum(
            jnp.matmul(b32.T, b32, precision=kernels.HIGHEST)
            * jnp.matmul(a32, a32.T, precision=kernels.HIGHEST)
        )
        return jnp.where(energy > 0, jnp.sqrt(energy / jnp.maximum(own, 1e-30)), 0.0)

    def chunk(args):
        # A chunk of models is drawn at once (large ops, both cores); each model's scale is
        # computed alone, so it does not depend on which models share its chunk (the mesh).
        keys, rows, energies = args
        a, b = jax.vmap(draw)(keys, rows)
        return a, b, lax.map(scale, (a, b, energies))

    def body(k, mask_local, energies_local):
        n_local = mask_local.shape[0]
        size = max(c for c in range(1, min(n_local, NULL_CHUNK) + 1) if n_local % c == 0)
        keys = _model_keys(k, n_local)
        split = lambda x: x.reshape(n_local // size, size, *x.shape[1:])  # noqa: E731
        a, b, s = lax.map(chunk, (split(keys), split(mask_local), split(energies_local)))
        return a.reshape(n_local, *a.shape[2:]), b.reshape(n_local, *b.shape[2:]), s.reshape(-1)

    return jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(P(), P(MODELS), P(MODELS)),
        out_specs=(P(MODELS), P(MODELS), P(MODELS)),
    )(key, mask, energies)


def dispatch_lora_null(placed: PlacedLora, *, key, config, draws: int, ranks, energies) -> list:
    """Starts the device work of every null draw of a LoRA layer and returns at once.

    `energies` (`[N]`) are the real updates' `||dW_i||_F^2`. (Overlapping this device work with
    the real layer's host LAPACK was measured slower on 2 CPU cores: the thread pools contend.)
    """
    n_pad, r, n = placed.a.shape
    m = placed.b.shape[1]
    ranks = ranks or [r] * placed.n_models
    energies = jnp.pad(
        jnp.clip(jnp.asarray(energies, jnp.float32), 0.0), (0, n_pad - placed.n_models)
    )
    wanted = tuple(mo for mo in config.modes if mo != "models") if config.lora == "delta" else ()
    modes = _layer.device_modes(
        wanted, m=m, n=n, nr=n_pad * r, host=_layer.factored_on_host(placed.a)
    )
    mask = _layer.factor_sample_mask(n_pad, r, ranks)
    keys = [jax.random.fold_in(key, draw) for draw in range(draws)]
    return [
        null_lora_grams(
            k,
            mask,
            energies,
            null_diagonals(k, nr=n_pad * r, m=m, n=n),
            m=m,
            n=n,
            r=r,
            n_pad=n_pad,
            n_models=placed.n_models,
            center=config.center,
            modes=modes,
        )
        for k in keys
    ]


def _null_spectra(placed, spectra, *, key, mesh, config, ranks, pending, energies, plan=None):
    """The spectra of one draw of the matched Gaussian population (LoRA: `pending` is the draw's
    `dispatch_lora_null` result, `energies` the real updates' `||dW_i||_F^2`)."""
    if isinstance(placed, PlacedDense):
        n_pad = placed.x.shape[0]
        norms = np.zeros(n_pad, np.float32)
        norms[: placed.n_models] = np.sqrt(np.clip(spectra.norms, 0, None))
        chunked = plan is not None and plan.chunk is not None
        two_byte = placed.x.dtype.itemsize < 4
        z = gaussian_stack(
            key,
            jax.device_put(norms, stacked_sharding(mesh)),
            mesh=mesh,
            shape=tuple(placed.x.shape[1:]),
            # The draws take the real stack's place, in as many bytes: a 2-byte layer's in
            # bfloat16 (float32's range: a float16 draw of a population's small centred norms
            # would lose its smallest entries to underflow), each model drawn in float32 alone
            # (no float32 copy of the whole stack). A bfloat16 layer's draws then have its
            # dtype and shapes, so every kernel the real layer compiled serves its null too.
            dtype=jnp.bfloat16 if two_byte else jnp.float32,
            one_at_a_time=chunked or two_byte,
        )
        null = PlacedDense(z, placed.n_models)
        return _layer.layer_spectra(
            null, mesh=mesh, config=config, key=key, lineage=False, plan=plan
        )
    m, n = placed.b.shape[1], placed.a.shape[2]
    n_pad, r = placed.a.shape[:2]
    ranks = ranks or [r] * placed.n_models
    if pending is None:
        # Side space, or randomized modes: the drawn population as factors, through the route
        # the real layer took.
        sharded = stacked_sharding(mesh)
        matched = np.zeros(n_pad, np.float32)
        matched[: placed.n_models] = np.clip(np.asarray(energies, np.float32), 0.0, None)
        mask = _layer.placed_sample_mask(mesh, n_pad, r, ranks)
        a, b, scales = null_lora_factors(
            key,
            mask,
            jax.device_put(matched, sharded),
            mesh=mesh,
            m=m,
            n=n,
            dtype=placed.a.dtype,
        )
        return _layer.lora_layer_spectra(
            PlacedLora(a, b, scales, placed.n_models),
            ranks,
            mesh=mesh,
            config=config,
            key=key,
            lineage=False,
            plan=plan,
        )
    g, f_a, f_b = pending
    roots = {"rows": f_b, "cols": f_a} if _layer.factored_on_host(placed.a) else None
    return _layer.lora_spectra_from_grams(
        g, ranks, config=config, m=m, n=n, roots=roots, lineage=False
    )


def null_control(
    placed,
    spectra: _layer.LayerSpectra,
    *,
    mesh: Mesh,
    config: _layer.SpectraConfig,
    key: jax.Array,
    draws: int,
    ranks=None,
    uncentred_norms=None,
    plan=None,
) -> dict:
    """The null record of one layer: per mode, null CEV band, MP expectation and the excess.

    The drawn populations take the real layer's route and solvers (its `plan`, a
    `spectra.LayerPlan`; without one, the rules applied to the placed shapes).

    LoRA draws are matched to `uncentred_norms`; all their device work is started first.

    Returns:
        `{mode: {"cev_mean": [...], "cev_std": [...], "cev_max": [...], "mp_cev": [...] | None,
        "excess": {k: CEV_obs(k) / CEV_null(k)}}, "draws": R}`.
    """
    if draws <= 0:
        return {"draws": 0}
    per_mode: dict[str, list[np.ndarray]] = {mode: [] for mode in spectra.modes}
    pending = None
    if plan is not None:
        config = plan.spectra_config(config)
        factor_route = plan.route == "lora-factor" and not plan.randomized_modes()
    else:
        factor_route = not (
            isinstance(placed, PlacedDense)
            or _layer.side_space(placed, config)
            or _layer.randomized_lora_modes(placed, config)
        )
    if isinstance(placed, PlacedLora) and factor_route:
        pending = dispatch_lora_null(
            placed, key=key, config=config, draws=draws, ranks=ranks, energies=uncentred_norms
        )
    for draw in range(draws):
        sub = jax.random.fold_in(key, draw)
        ns = _null_spectra(
            placed,
            spectra,
            key=sub,
            mesh=mesh,
            config=config,
            ranks=ranks,
            pending=pending[draw] if pending is not None else None,
            energies=uncentred_norms,
            plan=plan,
        )
        for mode, result in ns.modes.items():
            energy = result.total_energy if result.total_energy is not None else ns.total_energy
            per_mode[mode].append(cev(result.eigenvalues, energy))
    out = {"draws": draws}
    if isinstance(placed, PlacedDense):
        shape = tuple(placed.x.shape[1:])
    else:
        shape = (placed.b.shape[1], placed.a.shape[2])
    for mode, curves in per_mode.items():
        width = min(len(c) for c in curves)
        stack = np.stack([c[:width] for c in curves])
        real = spectra.modes[mode]
        real_energy = real.total_energy if real.total_energy is not None else spectra.total_energy
        observed = cev(real.eigenvalues, real_energy)
        mean = stack.mean(0)
        record = {
            "cev_mean": mean.tolist(),
            "cev_std": stack.std(0).tolist(),
            "cev_max": stack.max(0).tolist(),
            "excess": {
                str(k): float(observed[k - 1] / mean[k - 1])
                for k in EXCESS_KS
                if k <= min(width, len(observed)) and mean[k - 1] > 0
            },
        }
        if mode in ("models", "rows", "cols") and isinstance(placed, PlacedDense):
            p, q = _mp_for_mode(mode, placed.n_models, shape, config.center == "mean")
            mp = marchenko_pastur_eigenvalues(p, q, 1.0)
            record["mp_cev"] = np.cumsum(mp)[:width].tolist()
        else:
            record["mp_cev"] = None
        out[mode] = record
    return out
