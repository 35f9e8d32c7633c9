"""Shared fixtures, and only fixtures (helpers are in support.py). ``runtime`` parametrizes
engine tests over every runtime that can run here."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

# One intra-op thread for torch here and in every process a test starts (Ray workers inherit
# the environment). The tests check correctness, not speed; on a busy 2-core machine torch's
# spinning worker threads made single tests 20-80x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Bytecode is written even where PYTHONDONTWRITEBYTECODE is set (as on some CI images): else
# every worker compiles every test module afresh, with its asserts rewritten, at every run
# (about 7 s a worker here), and every process a test starts compiles the package.
sys.dont_write_bytecode = False
# Generated datasets (MNIST-1D takes seconds to make) are cached for this session only, in a
# directory every process the tests start inherits and that is removed at the end: the user's
# own cache is neither read nor written.
# pytest-xdist's workers share their controller's directory (datasets are written atomically).
_PREFIX = "distbelief-test-cache-"
_INHERITED = os.environ.get("DISTBELIEF_CACHE_DIR", "")
_WORKER = "PYTEST_XDIST_WORKER" in os.environ and os.path.basename(_INHERITED).startswith(_PREFIX)
_CACHE = _INHERITED if _WORKER else tempfile.mkdtemp(prefix=_PREFIX)
os.environ["DISTBELIEF_CACHE_DIR"] = _CACHE

import pytest  # noqa: E402
import torch  # noqa: E402
from support import HAVE_RAY, RUNTIMES  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(params=RUNTIMES)
def runtime(request: pytest.FixtureRequest) -> str:
    """Name of the runtime a test runs on. Without Ray its cases are skipped, and say so."""
    if request.param == "ray":
        if not HAVE_RAY:
            pytest.skip("ray is not installed (pip install 'distbelief[ray]')")
        request.getfixturevalue("ray_session")
    return request.param


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance (token auth, loopback only) shared by the tests that run on Ray:
    starting one costs seconds. Stopped at the end of the session; it leaves nothing behind."""
    from distbelief.runtime.ray.runtime import local_ray

    with local_ray():
        yield


@pytest.fixture(scope="session")
def mnist1d_data():
    from distbelief.data.inputs import mnist1d

    return mnist1d()


@pytest.fixture(scope="session")
def quick_bench_report():
    """``distbelief bench --quick``'s report, every benchmark: made once, read by the tests
    of each benchmark's figures (test_bench.py, test_bench_model_parallel.py)."""
    from distbelief import bench

    return bench.run(quick=True)


@pytest.fixture
def in_tmp_dir(tmp_path, monkeypatch):
    """Run in an empty temporary directory, so that the command's default run directory
    (``runs/...``) lands there and not in the repository."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's, which reads the xdist_group marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark ``ray`` and ``processes`` every test that runs that runtime through the ``runtime``
    fixture, a parameter naming it, or the shared Ray instance (``-m "not ray"`` deselects
    them); modules that run it otherwise say so with a ``pytestmark`` of their own. A run on
    Ray is also ``slow``: it needs the Ray instance (seconds to start) and a process per actor."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        params = list(callspec.params.values()) if callspec is not None else []
        names = {p for p in params if isinstance(p, str)}
        if "ray" in names or "ray_session" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)
            item.add_marker(pytest.mark.slow)
        if "processes" in names:
            item.add_marker(pytest.mark.processes)
        group = _xdist_group(item)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))


def _xdist_group(item: pytest.Item) -> str | None:
    """Which tests pytest-xdist (``-n``, ``--dist loadgroup``) keeps in one worker: every Ray
    test (one Ray instance, whose idle actor processes later runs reuse: a second instance in
    the other worker would start its own, each importing torch, which cost more than it
    saved), a module's tests that share a module-scoped fixture (made once, not once per
    worker), and the readers of the quick benchmark report (it takes most of a minute)."""
    if item.get_closest_marker("ray") is not None:
        return "ray"
    info = getattr(item, "_fixtureinfo", None)
    defs = info.name2fixturedefs if info is not None else {}
    if "quick_bench_report" in defs:
        return "quick_bench_report"
    if any(d[-1].scope == "module" for d in defs.values()):
        return item.nodeid.split("::")[0]
    return None


_maker: subprocess.Popen | None = None


def pytest_configure(config: pytest.Config) -> None:
    """With workers (``-n``), the controller starts making MNIST-1D (seconds) in a process of
    its own as they start, so that it is ready, or nearly, when a worker's first test asks for
    it (a worker that asks meanwhile waits for it: see ``datasets._making``)."""
    global _maker
    if not _WORKER and getattr(config.option, "numprocesses", None):
        make = "from distbelief.data.datasets import mnist1d; mnist1d()"
        _maker = subprocess.Popen([sys.executable, "-c", make], stderr=subprocess.DEVNULL)


def pytest_unconfigure(config: pytest.Config) -> None:
    if _maker is not None:
        _maker.kill()
        _maker.wait(timeout=30)
    if not _WORKER:  # the controller's, removed once every worker is done
        shutil.rmtree(_CACHE, ignore_errors=True)
