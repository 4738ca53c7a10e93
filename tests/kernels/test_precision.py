"""Every matrix product the engine compiles asks for float32 at `precision=HIGHEST`.

On the CPU backend XLA computes float32 products exactly whatever they ask for, so the numbers
of the other tests cannot see a product left at the default precision; on GPUs that default is
TF32 (10-bit mantissa) and on TPUs bfloat16 passes: on an H200, `exact_eigh`'s residuals came
out near 1e-3 instead of 1e-7 before its residual product asked for HIGHEST. So this test reads
what was compiled: it runs the default analysis (dense and LoRA, on a 2-device mesh, whole and
by the chunked route, exact and randomized), a compress fit and the solvers in a fresh process
that dumps every lowered module, and checks each `dot_general` in them.
"""

import glob
import os
import re
import subprocess
import sys
import textwrap

_RUN = textwrap.dedent(
    """
    import os, sys
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    jax.config.update("jax_num_cpu_devices", 2)
    jax.config.update("jax_dump_ir_to", sys.argv[2])
    import jax.numpy as jnp
    import numpy as np
    import jsubspace
    from jsubspace import kernels
    from jsubspace.cli._demo import write_demo_population
    from jsubspace.compress import fit_store

    root = sys.argv[1]
    paths = write_demo_population(os.path.join(root, "population"), n_models=8)
    common = dict(quiet=True, plots=False, num_devices=2)
    for name in ("dense", "adapters"):
        jsubspace.analyze([paths[name]], os.path.join(root, name), **common)
        jsubspace.analyze(
            [paths[name]], os.path.join(root, name + "_rand"), method="randomized", rank=4,
            **common
        )
    # Just under the largest layer's working set: that layer goes by the chunked route.
    plans = jsubspace.run.plan([paths["dense"]], num_devices=2, quiet=True)
    budget = max(p.working_set_bytes for p in plans) - 1
    chunked = jsubspace.run.plan([paths["dense"]], num_devices=2, quiet=True, memory_budget=budget)
    assert any(p.chunk is not None for p in chunked), chunked
    jsubspace.analyze(
        [paths["dense"]], os.path.join(root, "chunked"), memory_budget=budget, **common
    )
    fit_store(paths["dense"], os.path.join(root, "store"), k=3, num_devices=2)
    fit_store(paths["adapters"], os.path.join(root, "store_lora"), k=3, num_devices=2)
    g = np.random.default_rng(0).standard_normal((40, 40))
    jax.jit(kernels.exact_eigh, static_argnames="rank")(jnp.asarray(g @ g.T, jnp.float32), rank=5)
    """
)


def _source(text: str, loc: str) -> str:
    """The first jsubspace source line among the locations `loc` (`#locN`) refers to."""
    defs = dict(re.findall(r"^(#loc\d+) = (.*)$", text, re.M))
    seen, todo = set(), [loc]
    while todo:
        name = todo.pop(0)
        if name in seen or name not in defs:
            continue
        seen.add(name)
        found = re.search(r'"([^"]*jsubspace/[^"]*\.py)":(\d+)', defs[name])
        if found:
            return f"{found.group(1).split('jsubspace/', 1)[1]}:{found.group(2)}"
        todo += re.findall(r"#loc\d+", defs[name])
    return loc


_FLOAT_OPERANDS = re.compile(r":\s*\(tensor<[^>]*x?(f32|bf16|f16|f64)>")


def test_every_compiled_matrix_product_asks_for_highest_precision(tmp_path):
    dump = tmp_path / "ir"
    subprocess.run(
        [sys.executable, "-c", _RUN, str(tmp_path), str(dump)],
        check=True,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        timeout=600,
    )
    files = glob.glob(str(dump / "*.mlir"))
    products, loose = 0, []
    for path in files:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        for line in text.splitlines():
            if "stablehlo.dot_general" not in line or not _FLOAT_OPERANDS.search(line):
                continue
            products += 1
            if "precision = [HIGHEST, HIGHEST]" not in line:
                # The op's location names the source line it came from.
                loc = re.search(r"loc\((#loc\d+)\)", line)
                where = _source(text, loc.group(1)) if loc else line.strip()[:160]
                loose.append(f"{where} ({os.path.basename(path)})")
    # The runs above compile hundreds of products; a dump that holds none means the check
    # itself no longer sees them (a renamed op or dump format), not that all is well.
    assert products > 100, (len(files), products)
    assert not loose, "products below HIGHEST precision:\n" + "\n".join(sorted(set(loose)))
