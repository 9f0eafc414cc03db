"""Identify model weights by content: sha256 of weight files (memoised) or of a state dict."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from ..cache import CacheFormatError, read_json, write_json
from ..settings import cache_root

__all__ = ["files_sha256", "state_dict_sha256"]

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt", ".gguf")


def _memo_path() -> Path:
    return cache_root() / "models" / "weights_ids.json"


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def files_sha256(paths: Iterable[str | os.PathLike[str]]) -> str:
    """sha256 hex identifying weight files by content (a folder means its weight files).

    One file: its plain sha256; several: sha256 over their names and hashes, in name order.

    Each file's hash is memoised in ``<cache_root()>/models/weights_ids.json`` keyed by absolute
    path, size and modification time, so reloading a large model does not re-read it.
    """
    files: list[Path] = []
    for item in paths:
        path = Path(item).resolve()
        if path.is_dir():
            files.extend(sorted(p for p in path.iterdir() if p.suffix in _WEIGHT_SUFFIXES))
        else:
            files.append(path)
    if not files:
        raise ValueError(f"no weight files found in {list(paths)}; pass a weights file or folder")
    try:
        memo = read_json(_memo_path())
    except CacheFormatError:
        memo = {}
    changed = False
    hashes: list[str] = []
    for path in files:
        stat = path.stat()
        key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
        if key not in memo:
            memo[key] = _file_sha256(path)
            changed = True
        hashes.append(memo[key])
    if changed:
        try:
            write_json(_memo_path(), memo)
        except OSError:  # a read-only cache only costs re-hashing next time
            pass
    if len(files) == 1:
        return hashes[0]
    combined = hashlib.sha256()
    for path, file_hash in zip(files, hashes):
        combined.update(path.name.encode("utf-8") + b"\0" + file_hash.encode("ascii") + b"\0")
    return combined.hexdigest()


def state_dict_sha256(module: torch.nn.Module) -> str:
    """sha256 hex over a module's state dict: every tensor's name, dtype, shape and bytes."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}\0".encode())
        if t.numel() == 0:
            continue
        if t.dtype in (torch.bfloat16, torch.float16):
            t = t.view(torch.int16)
        elif t.dtype == torch.bool:
            t = t.to(torch.uint8)
        digest.update(np.ascontiguousarray(t.numpy()).view(np.uint8).data)
    return digest.hexdigest()
