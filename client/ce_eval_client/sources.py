"""The files ``ce-eval run push`` reads, as sources of row-aligned arrays cut into batches."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ce_eval_client.cli_errors import CommandError
from ce_eval_client.wire import encode_tensor

TENSOR_NAMES = ("logits", "targets", "sample_weight")


@dataclass
class Source:
    """One file (or ``.npy`` trio) of arrays with a common first axis."""

    name: str
    arrays: dict[str, np.ndarray]

    @property
    def rows(self) -> int:
        return int(self.arrays["logits"].shape[0])


def _check_arrays(name: str, arrays: dict[str, np.ndarray]) -> Source:
    for required in ("logits", "targets"):
        if required not in arrays:
            raise CommandError(f"{name}: no array named {required!r}")
    rows = arrays["logits"].shape[0] if arrays["logits"].ndim else 0
    for key, array in arrays.items():
        if array.ndim == 0 or array.shape[0] != rows:
            raise CommandError(f"{name}: {key} must have {rows} rows like logits")
    return Source(name, arrays)


def _npz(path: Path) -> Source:
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: np.asarray(data[k]) for k in TENSOR_NAMES if k in data.files}
    except (OSError, ValueError) as exc:
        raise CommandError(f"{path}: cannot read arrays ({exc})") from None
    return _check_arrays(path.name, arrays)


def _npy_dir(directory: Path) -> Source:
    try:
        arrays = {
            k: np.load(directory / f"{k}.npy", mmap_mode="r", allow_pickle=False)
            for k in TENSOR_NAMES
            if (directory / f"{k}.npy").exists()
        }
    except (OSError, ValueError) as exc:
        raise CommandError(f"{directory}: cannot read arrays ({exc})") from None
    return _check_arrays(directory.name or str(directory), arrays)


def find_sources(paths: Sequence[str]) -> list[Source]:
    """``.npz`` files, ``logits.npy`` (its directory's trio), or directories holding either
    (``.npz`` files and sub-directories with ``logits.npy``, in name order)."""
    sources: list[Source] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = []
            if (path / "logits.npy").exists():
                found.append(_npy_dir(path))
            for child in sorted(path.iterdir()):
                if child.suffix == ".npz" and child.is_file():
                    found.append(_npz(child))
                elif child.is_dir() and (child / "logits.npy").exists():
                    found.append(_npy_dir(child))
            if not found:
                raise CommandError(f"{path}: no .npz files and no logits.npy")
            sources.extend(found)
        elif path.suffix == ".npz" and path.is_file():
            sources.append(_npz(path))
        elif path.suffix == ".npy" and path.exists():
            sources.append(_npy_dir(path.parent))
        else:
            raise CommandError(f"{path}: not a .npz/.npy file or a directory")
    return sources


def encode(array: np.ndarray) -> dict[str, Any]:
    """Array → ``{dtype, shape, data: base64}``."""
    encoded: dict[str, Any] = encode_tensor(array, "base64")
    return encoded


def batches_of(source: Source, batch_size: int) -> Iterator[tuple[str, dict[str, Any]]]:
    """(stable batch id, request body without batch_id) for each slice of ``batch_size`` rows."""
    for index, start in enumerate(range(0, source.rows, batch_size)):
        digest = hashlib.sha256()
        body: dict[str, Any] = {}
        for key in TENSOR_NAMES:
            if key in source.arrays:
                part = np.ascontiguousarray(source.arrays[key][start : start + batch_size])
                digest.update(f"{key}:{part.dtype.str}:{part.shape};".encode())
                digest.update(part.tobytes())
                body[key] = encode(part)
        yield f"{source.name[:120]}#{index}:{digest.hexdigest()[:16]}", body
