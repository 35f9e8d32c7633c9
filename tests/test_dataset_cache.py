"""Generated datasets are cached on disk: read back bit for bit, made again when the file is
damaged, and never a reason to fail when the cache cannot be written."""

from __future__ import annotations

import threading
import types
from pathlib import Path

import pytest
import torch

from distbelief.data import datasets

SIZE = dict(num_samples=200, seed=3)  # small: made in a fraction of a second


def _cached(tmp_path: Path) -> list[Path]:
    return sorted(tmp_path.glob("mnist1d-*.npz"))


def _same(a, b) -> bool:
    return all(torch.equal(p, q) for pa, pb in zip(a, b) for p, q in zip(pa, pb))


def _recording(monkeypatch) -> list:
    """The (size, seed) of every MNIST-1D made from now on."""
    made = []
    real = datasets._make_mnist1d
    monkeypatch.setattr(datasets, "_make_mnist1d", lambda *a: made.append(a) or real(*a))
    return made


@pytest.fixture
def uncached(monkeypatch) -> tuple:
    monkeypatch.setenv(datasets.CACHE_ENV, "")  # empty: nothing cached
    return datasets.mnist1d(**SIZE)


def test_the_second_call_reads_the_cache_and_equals_a_fresh_generation(
    uncached, tmp_path, monkeypatch
):
    monkeypatch.setenv(datasets.CACHE_ENV, str(tmp_path))
    made = _recording(monkeypatch)
    first = datasets.mnist1d(**SIZE)
    (path,) = _cached(tmp_path)
    assert "-200-3.npz" in path.name and made == [(200, 3)]
    second = datasets.mnist1d(**SIZE)
    assert made == [(200, 3)]  # read, not made again
    assert _same(first, uncached) and _same(second, uncached)
    assert second[0][0].dtype == torch.float32 and second[0][1].dtype == torch.long
    datasets.mnist1d(num_samples=200, seed=4)  # another seed: a file of its own
    assert len(_cached(tmp_path)) == 2


def test_a_damaged_cache_file_is_made_again(uncached, tmp_path, monkeypatch):
    monkeypatch.setenv(datasets.CACHE_ENV, str(tmp_path))
    datasets.mnist1d(**SIZE)
    (path,) = _cached(tmp_path)
    path.write_bytes(path.read_bytes()[:1000])  # cut short, as by a full disk
    assert _same(datasets.mnist1d(**SIZE), uncached)
    assert datasets._read_cached(path) is not None  # written whole again
    assert not list(tmp_path.glob("*.tmp"))


def test_a_dataset_another_process_is_making_is_waited_for_and_read(
    uncached, tmp_path, monkeypatch
):
    monkeypatch.setenv(datasets.CACHE_ENV, str(tmp_path))
    made = _recording(monkeypatch)
    polled = threading.Event()  # set when the reader finds the lock held and waits
    clock = datasets.time
    poll = lambda s: polled.set() or clock.sleep(s)  # noqa: E731
    monkeypatch.setattr(
        datasets, "time", types.SimpleNamespace(monotonic=clock.monotonic, sleep=poll)
    )
    path = tmp_path / datasets._mnist1d_file(**SIZE)
    got = []
    with datasets._making(path):  # held, as by another process making the dataset
        reader = threading.Thread(target=lambda: got.append(datasets.mnist1d(**SIZE)))
        reader.start()
        assert polled.wait(timeout=10), "the reader did not wait for the lock"
        (x, y), (x_test, y_test) = uncached
        arrays = dict(x=x.numpy(), y=y.numpy(), x_test=x_test.numpy(), y_test=y_test.numpy())
        datasets._write_cached(path, arrays)  # what that process writes
    reader.join(timeout=60)
    assert not reader.is_alive()
    assert made == []  # read, not made again
    assert _same(got[0], uncached)


def test_a_maker_that_takes_too_long_is_not_waited_for_beyond_the_limit(
    uncached, tmp_path, monkeypatch
):
    monkeypatch.setenv(datasets.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(datasets, "MAKING_WAIT_S", 0.0)
    made = _recording(monkeypatch)
    with datasets._making(tmp_path / datasets._mnist1d_file(**SIZE)):  # held, never written
        assert _same(datasets.mnist1d(**SIZE), uncached)
    assert made == [(200, 3)]


def test_a_cache_that_cannot_be_written_is_skipped(uncached, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv(datasets.CACHE_ENV, str(blocker / "cache"))
    assert _same(datasets.mnist1d(**SIZE), uncached)


def test_the_default_place_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv(datasets.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert datasets.cache_dir() == tmp_path / "distbelief"
    monkeypatch.setenv(datasets.CACHE_ENV, "")
    assert datasets.cache_dir() is None
