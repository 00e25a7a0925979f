"""pytest-benchmark micro benchmarks (not part of the test suite: pytest's testpaths is ``tests``).

Run: ``python3 -m pytest bench/ --benchmark-enable`` (see bench/README.md). Files are named
``bench_*.py``; this hook collects them, since pytest's default pattern is ``test_*.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from shardpool.bench.stream import make_stream

BATCH = 256
"""Messages per batch in the codec and worker benchmarks (the pool's default batch_size)."""


def pytest_collect_file(file_path: Path, parent: Any) -> Any:
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture(scope="session")
def stream() -> list[tuple[bytes, bytes]]:
    """4,096 ``(32-byte channel id, ~190-byte CBOR payload)`` pairs over 1,000 channels."""
    return make_stream(4096, 1000, seed=0)


@pytest.fixture(scope="session")
def batch(stream: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The first :data:`BATCH` pairs of :func:`stream`."""
    return stream[:BATCH]
