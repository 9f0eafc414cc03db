"""memory_maps: row blocks of memory-mapped arrays read without keeping their pages resident."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from convergence_core.memory_maps import read_rows, release


def _resident_file_mb() -> float:
    status = Path("/proc/self/status")
    if not status.exists():
        pytest.skip("needs Linux /proc to read resident file pages")
    for line in status.read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) / 1024
    pytest.skip("the kernel does not report RssFile")


def test_a_pass_of_read_rows_leaves_no_file_pages_resident(tmp_path):
    data = np.random.default_rng(0).standard_normal((8192, 1024)).astype(np.float32)  # 32 MB
    np.save(tmp_path / "x.npy", data)
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    before = _resident_file_mb()
    total = float(np.asarray(mapped, dtype=np.float64).sum())
    assert _resident_file_mb() - before > 24  # a plain pass maps the file in
    release(np.ascontiguousarray(mapped))  # reached through a plain view's .base
    assert _resident_file_mb() - before < 4
    blocks = [read_rows(mapped, slice(start, start + 1000)) for start in range(0, 8192, 1000)]
    assert _resident_file_mb() - before < 4
    stacked = np.concatenate(blocks)
    assert stacked.dtype == np.float64
    np.testing.assert_array_equal(stacked, data.astype(np.float64))  # contents unchanged
    assert float(stacked.sum()) == total


def test_in_memory_arrays_and_odd_views_are_left_alone():
    data = np.arange(12.0).reshape(4, 3)
    release(data)
    release(data[:, ::2])
    block = read_rows(data, slice(1, 3), np.float32)
    assert block.dtype == np.float32 and np.shares_memory(block, data) is False
    np.testing.assert_array_equal(block, data[1:3])


@pytest.mark.parametrize("mode", ["c", "r+"])
def test_a_writable_or_copy_on_write_map_keeps_its_edits(tmp_path, mode):
    """MADV_DONTNEED on a copy-on-write map (np.load(mmap_mode="c")) threw away the caller's
    edits: the array read the file's values again (write_run_from_embeddings released it)."""
    data = np.arange(4096 * 8, dtype=np.float32).reshape(4096, 8)
    np.save(tmp_path / "x.npy", data)
    mapped = np.load(tmp_path / "x.npy", mmap_mode=mode)
    mapped *= 10.0
    release(np.ascontiguousarray(mapped))
    block = read_rows(mapped, slice(0, 4096))
    np.testing.assert_array_equal(block, data.astype(np.float64) * 10.0)
    np.testing.assert_array_equal(mapped, data * 10.0)
