"""Files written by the library honour the user's umask (0644 under umask 022), and stay atomic.

The atomic writer (:func:`matryoshka.io.atomic_write_bytes`) used to create its temp file with
``tempfile.mkstemp`` (always 0600), so indexes, adaptors, caches and shards were private to
their writer whatever the umask said."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from matryoshka.io import atomic_write_bytes


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_atomic_write_honours_the_umask(tmp_path: Path, umask_022: None) -> None:
    atomic_write_bytes(tmp_path / "f.bin", b"one")
    assert mode(tmp_path / "f.bin") == 0o644
    atomic_write_bytes(tmp_path / "f.bin", b"two")  # replacing keeps the umask's mode
    assert mode(tmp_path / "f.bin") == 0o644
    assert (tmp_path / "f.bin").read_bytes() == b"two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]  # no temp file left
    os.umask(0o077)
    atomic_write_bytes(tmp_path / "private.bin", b"x")
    assert mode(tmp_path / "private.bin") == 0o600


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_failed_write_leaves_the_old_file_and_no_temp(
    tmp_path: Path, umask_022: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    atomic_write_bytes(tmp_path / "f.bin", b"old")

    def broken(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(tmp_path / "f.bin", b"new")
    assert (tmp_path / "f.bin").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_indexes_and_adaptors_are_0644(tmp_path: Path, umask_022: None) -> None:
    from matryoshka.models.adaptor import MatryoshkaAdaptor
    from matryoshka.nesting import Nesting
    from matryoshka.retrieval.index import ExactIndex

    x = np.random.default_rng(0).standard_normal((40, 16)).astype(np.float32)
    index = ExactIndex(8, model_name="toy").add(x).save(tmp_path / "x.index")
    assert mode(index) == 0o644
    adaptor = MatryoshkaAdaptor(Nesting.doubling(4, 16), hidden=8, epochs=1, progress=False)
    weights = adaptor.fit(x).save(tmp_path / "adaptor")
    assert mode(weights) == 0o644
    assert mode(weights.with_suffix(".json")) == 0o644
