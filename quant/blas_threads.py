"""Limit the BLAS thread pool while tensors are analysed in parallel Python threads.

The analyzer runs one tensor per worker thread (numpy releases the GIL), so each
BLAS call should use one thread: OpenBLAS threads that wait for each other on a
busy 2-core machine made small matmuls 10x slower. This finds the OpenBLAS that
numpy loaded (Linux: /proc/self/maps) and calls its set_num_threads; elsewhere
(Accelerate on macOS) it does nothing.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_SETTERS = (
    "scipy_openblas_set_num_threads64_",
    "openblas_set_num_threads64_",
    "openblas_set_num_threads",
)
_GETTERS = (
    "scipy_openblas_get_num_threads64_",
    "openblas_get_num_threads64_",
    "openblas_get_num_threads",
)


def _loaded_openblas() -> list[ctypes.CDLL]:
    maps = Path("/proc/self/maps")
    if not maps.is_file():
        return []
    paths = set()
    for line in maps.read_text().splitlines():
        path = line.split()[-1]
        if path.startswith("/") and "openblas" in Path(path).name.lower():
            paths.add(path)
    libs = []
    for path in sorted(paths):
        try:
            libs.append(ctypes.CDLL(path))
        except OSError:
            continue
    return libs


def _symbol(lib: ctypes.CDLL, names: tuple[str, ...]):
    for name in names:
        func = getattr(lib, name, None)
        if func is not None:
            return func
    return None


@contextmanager
def blas_threads(count: int) -> Iterator[None]:
    """Within the block, OpenBLAS uses `count` threads; restored afterwards."""
    import numpy  # noqa: F401  (make sure numpy's BLAS is loaded before looking)

    restore = []
    for lib in _loaded_openblas():
        setter, getter = _symbol(lib, _SETTERS), _symbol(lib, _GETTERS)
        if setter is None or getter is None:
            continue
        restore.append((setter, int(getter())))
        setter(ctypes.c_int(count))
    try:
        yield
    finally:
        for setter, previous in restore:
            setter(ctypes.c_int(previous))
