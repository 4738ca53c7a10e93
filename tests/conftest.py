"""Test set-up: 8 CPU devices, set once here before jax initialises."""

import os
import re

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_enable_x64", False)

DEVICE_COUNTS = (1, 2, 4, 8)


settings.register_profile("ci", max_examples=150, deadline=None, derandomize=True)
settings.register_profile("slow", max_examples=5000, deadline=None)


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="also run tests marked slow")


def pytest_configure(config):
    settings.load_profile("slow" if config.getoption("--slow") else "ci")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="slow; run with --slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On an accelerator run (`JAX_PLATFORMS=cuda pytest ...` on a one-GPU machine), a test that
    asks `models_mesh` for more devices than there are (the `mesh` fixture's 2, 4 and 8, or its
    own call) is skipped, not failed: on the CPU backend there are always 8 (above), so this
    never fires in CI."""
    outcome = yield
    report = outcome.get_result()
    error = call.excinfo
    if (
        error is not None
        and error.errisinstance(ValueError)
        and re.fullmatch(r"asked for \d+ devices, \d+ available", str(error.value))
        and jax.default_backend() != "cpu"
    ):
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] or 0, f"Skipped: {error.value}")


@pytest.fixture(params=DEVICE_COUNTS, ids=lambda d: f"{d}dev")
def mesh(request):
    from jsubspace import sharding

    return sharding.models_mesh(request.param)


@pytest.fixture
def tiny_torch_model():
    """A factory of a two-block torch model whose q_proj / v_proj / down_proj modules PEFT can
    adapt (the tests write real adapters with `peft` on it)."""
    torch = pytest.importorskip("torch")

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = torch.nn.Linear(12, 16, bias=False)
            self.v_proj = torch.nn.Linear(12, 8, bias=False)
            self.down_proj = torch.nn.Linear(16, 12, bias=False)

        def forward(self, x):
            return self.down_proj(self.q_proj(x)) + self.v_proj(x).sum()

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([Block(), Block()])

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return x

    return Tiny
