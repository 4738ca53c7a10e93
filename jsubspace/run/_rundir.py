"""The output directory of a run: lock, resume, atomic per-layer records, the final files.

  DIR/.lock            held (flock) by the writing process for the whole run
  DIR/run.json         the configuration fingerprint; a rerun must match it or overwrite
  DIR/layers/NNNNN.json  finished layers, written atomically as each is done
  DIR/spectra.json     written last: its presence means the run is complete
A file that cannot be written (disk full, permissions) stops the run with an OutputError; every
finished layer stays valid and a rerun resumes from it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os

import jax
import numpy as np

from jsubspace.errors import OutputError
from jsubspace.io._atomic import atomic_write_json
from jsubspace.io._atomic import atomic_write_text

FINAL_FILES = ("spectra.json", "layers.csv", "report.html", "manifest.json")


def _refuse_foreign(out: str) -> None:
    """Refuses an `out` that exists, is not empty and holds nothing jsubspace writes: a run
    (and `--overwrite`, which clears a previous run) must never write into unrelated files."""
    try:
        entries = set(os.listdir(out))
    except FileNotFoundError:
        return
    except NotADirectoryError:
        raise OutputError(f"{out}: exists and is not a directory; choose another --out") from None
    except OSError as e:
        raise OutputError(f"{out}: cannot read the output directory: {e}") from None
    if entries and not entries & {"run.json", "layers", "spectra.json", ".lock", "manifest.json"}:
        shown = ", ".join(sorted(entries)[:3]) + (", ..." if len(entries) > 3 else "")
        raise OutputError(
            f"{out}: not empty ({shown}) and not a jsubspace run; choose a new or empty --out"
        )


class RunDirectory:
    """Context manager over `out/` for one run (every process enters it; process 0 writes)."""

    def __init__(self, out: str, *, fingerprint: str, config: dict, overwrite: bool):
        self.out = out
        self.fingerprint = fingerprint
        self.config = config
        self.overwrite = overwrite
        self.lead = jax.process_index() == 0
        self.layers_dir = os.path.join(out, "layers")
        self._lock = None

    def __enter__(self) -> RunDirectory:
        _refuse_foreign(self.out)
        try:
            os.makedirs(self.layers_dir, exist_ok=True)
        except OSError as e:
            raise OutputError(f"{self.out}: cannot create the output directory: {e}") from None
        if self.lead:
            self._take_lock()
        try:
            self._prepare()
        except BaseException:
            self._release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._release()

    def _take_lock(self) -> None:
        path = os.path.join(self.out, ".lock")
        handle = open(path, "a+")  # noqa: SIM115 - held for the whole run
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise OutputError(
                    f"{self.out}: another jsubspace run ({holder}) is writing here; wait for it "
                    "or choose another --out"
                ) from None
            raise
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        self._lock = handle

    def _release(self) -> None:
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    def _prepare(self) -> None:
        run_path = os.path.join(self.out, "run.json")
        previous = None
        try:
            with open(run_path, encoding="utf-8") as f:
                previous = json.load(f)
        except (OSError, json.JSONDecodeError):
            previous = None
        same = previous is not None and previous.get("fingerprint") == self.fingerprint
        if previous is not None and not same and not self.overwrite:
            raise OutputError(
                f"{self.out} holds a run with another configuration; pass --overwrite to "
                "replace it or choose another --out"
            )
        if not self.lead:
            return
        if self.overwrite or not same:
            for name in os.listdir(self.layers_dir):
                os.remove(os.path.join(self.layers_dir, name))
        for name in FINAL_FILES:
            path = os.path.join(self.out, name)
            if os.path.exists(path):
                os.remove(path)  # A result that is not this run's must not look complete.
        self.write_json("run.json", {"fingerprint": self.fingerprint, "config": self.config})

    def layer_path(self, i: int) -> str:
        return os.path.join(self.layers_dir, f"{i:05d}.json")

    def finished(self, names: list[str]) -> list[dict | None]:
        """The records of layers finished by an earlier run with this configuration."""
        records: list[dict | None] = [None] * len(names)
        for i, name in enumerate(names):
            try:
                with open(self.layer_path(i), encoding="utf-8") as f:
                    rec = json.load(f)
            except FileNotFoundError:
                continue
            except (OSError, json.JSONDecodeError, UnicodeDecodeError):
                continue  # A broken layer file is recomputed, never trusted.
            if rec.get("name") == name and rec.get("fingerprint") == self.fingerprint:
                records[i] = rec
        if jax.process_count() > 1:
            # Every process must run the same layers (the kernels are collectives): process 0's
            # view decides. `out` must be on a filesystem all hosts see.
            from jax.experimental import multihost_utils

            done = np.asarray([r is not None for r in records], np.int32)
            done = np.asarray(multihost_utils.broadcast_one_to_all(done))
            for i, flag in enumerate(done):
                if not flag:
                    records[i] = None
                elif records[i] is None:
                    raise OutputError(
                        f"{self.layer_path(i)}: finished on process 0 but not visible here; "
                        "--out must be on a filesystem every host sees"
                    )
        return records

    def write_layer(self, i: int, record: dict, encoded: str) -> None:
        """Writes layer i's record (`encoded`: its compact JSON without the run fingerprint)."""
        if self.lead:
            text = f'{{"fingerprint":{json.dumps(self.fingerprint)},{encoded[1:]}'
            self.write(
                os.path.relpath(self.layer_path(i), self.out),
                lambda path: atomic_write_text(path, text),
            )

    def write_json(self, name: str, value) -> None:
        self.write(name, lambda path: atomic_write_json(path, value))

    def write(self, name: str, writer) -> None:
        """Runs `writer(path)` for `out/name`, turning I/O failures into one clear error."""
        path = os.path.join(self.out, name)
        try:
            writer(path)
        except OSError as e:
            raise OutputError(
                f"{path}: cannot write ({e.strerror or e}); finished layers are kept in "
                f"{self.layers_dir} and a rerun resumes from them"
            ) from None
