"""Reading memory-mapped arrays in row blocks without keeping every page resident.

A run of 100,000 stimuli reads gigabytes of stored features (``np.load(mmap_mode="r")``) in
passes of row blocks: GPA's cross-products and residuals, the stability diagnostic, copying a
user's feature files into the run. The kernel maps each page a pass touches into this process, and
those pages stay counted in its resident memory (RSS) until the mapping closes, so one pass over
every model's features made them all resident at once (about half of the 8.3 GB peak of the
100k benchmark was such file pages). They are clean copies of the file, so dropping them is safe:
a later read faults them in again from the page cache or the disk.

:func:`read_rows` copies a row block and then drops that block's pages; :func:`release` drops a
whole array's (or a row range's). Arrays that are not read-only memory maps are left alone (a
copy-on-write or writable map's pages may hold edits not in the file, which dropping would undo),
and where the platform has no ``madvise`` both are plain reads.
"""

from __future__ import annotations

import mmap

import numpy as np

__all__ = ["read_rows", "release"]

_PAGE = mmap.PAGESIZE


def _mapping(array: np.ndarray) -> mmap.mmap | None:
    """The mmap behind ``array`` if it is read-only: np.memmap carries it, and a plain view of
    one (np.asarray, np.ascontiguousarray) reaches it through ``.base``."""
    while array is not None:
        mapped = getattr(array, "_mmap", None)
        if isinstance(mapped, mmap.mmap):
            return None if mapped.closed or getattr(array, "mode", None) != "r" else mapped
        array = getattr(array, "base", None)
    return None


def release(array: np.ndarray, rows: slice | None = None) -> None:
    """Drop the resident pages of ``array[rows]`` (all rows by default) from this process.

    ``array``: any array; only a C-ordered read-only memory map (mode ``"r"``, or a row slice
    of one) has pages to drop. Never changes what the array reads.
    """
    mapped = _mapping(array)
    if mapped is None or not hasattr(mapped, "madvise") or array.ndim == 0 or array.size == 0:
        return
    if not array.flags.c_contiguous:
        return
    start, stop, _ = (rows or slice(None)).indices(array.shape[0])
    if stop <= start:
        return
    row_bytes = array.strides[0] if array.ndim > 1 else array.itemsize
    base = np.frombuffer(mapped, dtype=np.uint8).ctypes.data
    first = array.ctypes.data - base + start * row_bytes
    last = array.ctypes.data - base + stop * row_bytes
    first -= first % _PAGE  # whole pages; a shared edge page is faulted in again if needed
    try:
        mapped.madvise(mmap.MADV_DONTNEED, first, min(last, len(mapped)) - first)
    except (OSError, ValueError, AttributeError):  # a platform without it: keep the pages
        return


def read_rows(array: np.ndarray, rows: slice, dtype: type = np.float64) -> np.ndarray:
    """A copy of ``array[rows]`` as ``dtype``; a memory map's pages of those rows are dropped
    after the copy (:func:`release`)."""
    block = np.array(array[rows], dtype=dtype, copy=True)
    release(array, rows)
    return block
