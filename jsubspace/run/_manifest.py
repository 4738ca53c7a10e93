"""The run manifest: versions, devices, mesh, dtypes and revision, written beside the results."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys

import jax
import numpy as np

from jsubspace import io
from jsubspace import sharding


def git_revision() -> str | None:
    """The source tree's git revision, or None outside a checkout."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run_manifest(config: dict, mesh, population: io.Population) -> dict:
    """Versions, devices, mesh, dtypes and revision of a run, for `manifest.json`."""
    import flax
    import jaxlib

    from jsubspace import __version__

    return {
        "jsubspace": __version__,
        "git_revision": git_revision(),
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "process_count": jax.process_count(),
        "mesh": {"axis": sharding.MODELS, "size": int(mesh.devices.size)},
        "dtypes": sorted({str(np.dtype(layer.dtype)) for layer in population.layers}),
        "config": config,
        "finished": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
