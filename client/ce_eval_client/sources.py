"""The files ``ce-eval run push`` reads, as sources of row-aligned arrays cut into batches.

Accepted: ``.npz`` files; directories holding ``logits.npy`` and ``targets.npy`` (optionally
``sample_weight.npy``; memory-mapped); ``.safetensors`` files; Parquet files (``.parquet``,
``.pq``); Arrow IPC files (``.arrow``, ``.feather``, ``.ipc``) and streams (``.arrows``). Each
holds the arrays (or columns) ``logits``, ``targets`` and optionally ``sample_weight`` with one
row per example, ``example_ids`` (strings or integers) and ``slice.<key>`` (one string per
example, for a run's slice key); in Parquet / Arrow, ``logits`` (and probability targets) are
list columns of one length (``fixed_size_list`` as written by ``pa.list_(pa.float32(), C)``).
Any other array name is an error, never dropped. safetensors and pyarrow come with the
``files`` extra.

Sources are listed (names and row counts read from headers and metadata) before any request,
and each is loaded when its turn comes.
"""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ce_eval_client.cli_errors import UsageError, unknown_name

TENSOR_NAMES = ("logits", "targets", "sample_weight")
REQUIRED = ("logits", "targets")
SLICE_PREFIX = "slice."
#: What a batch may carry beside its tensors (sent as ``example_ids`` and ``slices``).
LABEL_NAMES = ("example_ids", f"{SLICE_PREFIX}<key>")


def _known(name: str) -> bool:
    return (
        name in TENSOR_NAMES
        or name == "example_ids"
        or (name.startswith(SLICE_PREFIX) and len(name) > len(SLICE_PREFIX))
    )


FILES_EXTRA = "pip install 'ce-eval-client[files]' (in the repository: pip install '.[files]')"
ARROW_FILE_SUFFIXES = frozenset({".arrow", ".feather", ".ipc"})
ARROW_STREAM_SUFFIXES = frozenset({".arrows"})
PARQUET_SUFFIXES = frozenset({".parquet", ".pq"})
FILE_SUFFIXES = frozenset(
    {".npz", ".safetensors", *PARQUET_SUFFIXES, *ARROW_FILE_SUFFIXES, *ARROW_STREAM_SUFFIXES}
)
FORMATS = (
    ".npz, .safetensors, .parquet, Arrow IPC (.arrow/.feather/.ipc, stream .arrows) "
    "or a directory with logits.npy and targets.npy"
)


@dataclass
class Source:
    """One file (or ``.npy`` directory) of arrays with a common first axis of ``rows``."""

    name: str
    path: Path
    rows: int
    load_arrays: Callable[[], Mapping[str, Any]] = field(repr=False)

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays, checked: the known names only, ``rows`` rows each."""
        arrays = {k: v for k, v in self.load_arrays().items()}
        _check_names(self.path, arrays)
        for key, array in arrays.items():
            if array.ndim == 0 or array.shape[0] != self.rows:
                raise UsageError(
                    f"{self.path}: {key} has shape {list(array.shape)}, not {self.rows} rows "
                    "like logits",
                    "every array needs one row per example",
                )
        return arrays


def _check_names(path: Path, names: Sequence[str] | Mapping[str, Any], kind: str = "array") -> None:
    for name in names:
        if not _known(name):
            accepted = (*TENSOR_NAMES, *LABEL_NAMES)
            raise UsageError(
                f"{path}: {unknown_name(kind, name, accepted)}",
                f"rename or drop it: run push sends only {', '.join(accepted)}",
            )
    for required in REQUIRED:
        if required not in names:
            raise UsageError(
                f"{path}: no {kind} named {required!r} (it holds: {', '.join(names) or 'nothing'})",
                f"run push needs {' and '.join(REQUIRED)}, optionally sample_weight",
            )


def _first_dims(path: Path, shapes: Mapping[str, Sequence[int]]) -> int:
    """The common row count of ``shapes`` (after the name checks)."""
    _check_names(path, shapes)
    rows = {name: int(shape[0]) if len(shape) else -1 for name, shape in shapes.items()}
    if len(set(rows.values())) != 1 or rows["logits"] < 0:
        listed = ", ".join(f"{k} {list(shapes[k])}" for k in shapes)
        raise UsageError(f"{path}: arrays of different row counts ({listed})", None)
    return rows["logits"]


# ----------------------------------------------------------------------------- NumPy formats


def _npy_header(member: Any) -> tuple[int, ...]:
    version = np.lib.format.read_magic(member)
    if version == (1, 0):
        shape = np.lib.format.read_array_header_1_0(member)[0]
    else:
        shape = np.lib.format.read_array_header_2_0(member)[0]
    return tuple(shape)


def _npz(path: Path) -> Source:
    try:
        with zipfile.ZipFile(path) as archive:
            shapes = {}
            for info in archive.infolist():
                with archive.open(info) as member:
                    shapes[info.filename.removesuffix(".npy")] = _npy_header(member)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise UsageError(f"{path}: not a readable .npz file ({exc})", None) from None

    def load() -> dict[str, np.ndarray]:
        try:
            with np.load(path, allow_pickle=False) as data:
                return {k: np.asarray(data[k]) for k in data.files}
        except (OSError, ValueError) as exc:
            raise UsageError(f"{path}: cannot read arrays ({exc})", None) from None

    return Source(path.name, path, _first_dims(path, shapes), load)


def _npy_dir(directory: Path) -> Source:
    files = sorted(directory.glob("*.npy"))
    try:
        arrays = {f.stem: np.load(f, mmap_mode="r", allow_pickle=False) for f in files}
    except (OSError, ValueError) as exc:
        raise UsageError(f"{directory}: cannot read arrays ({exc})", None) from None
    rows = _first_dims(directory, {k: a.shape for k, a in arrays.items()})
    return Source(directory.name or str(directory), directory, rows, lambda: arrays)


# ---------------------------------------------------------------- safetensors, Parquet, Arrow


def _missing_library(path: Path, what: str, module: str) -> UsageError:
    return UsageError(f"{path}: reading {what} needs the {module} package", FILES_EXTRA)


def _safetensors(path: Path) -> Source:
    try:
        from safetensors import safe_open
        from safetensors.numpy import load_file
    except ImportError:
        raise _missing_library(path, ".safetensors", "safetensors") from None
    try:
        with safe_open(str(path), framework="numpy") as handle:
            shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}  # noqa: SIM118
    except Exception as exc:  # safetensors raises its own SafetensorError (not exported)
        raise UsageError(f"{path}: not a readable .safetensors file ({exc})", None) from None

    def load() -> dict[str, np.ndarray]:
        try:
            return dict(load_file(str(path)))
        except Exception as exc:
            raise UsageError(f"{path}: cannot read tensors ({exc})", None) from None

    return Source(path.name, path, _first_dims(path, shapes), load)


def _pyarrow(path: Path, what: str) -> Any:
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError:
        raise _missing_library(path, what, "pyarrow") from None
    return pyarrow


def column_array(path: Path, name: str, column: Any) -> np.ndarray:
    """An Arrow column → NumPy: list columns of one length per level become trailing axes
    (``fixed_size_list<float>[C]`` → (N, C)); nulls are an error."""
    pa = _pyarrow(path, "Arrow data")
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    shape = [len(array)]
    while (
        pa.types.is_fixed_size_list(array.type)
        or pa.types.is_list(array.type)
        or (pa.types.is_large_list(array.type))
    ):
        if array.null_count:
            raise UsageError(f"{path}: column {name!r} has {array.null_count} null rows", None)
        if pa.types.is_fixed_size_list(array.type):
            size = array.type.list_size
        else:
            lengths = np.unique(array.value_lengths().to_numpy(zero_copy_only=False))
            if len(lengths) > 1:
                raise UsageError(
                    f"{path}: column {name!r} holds lists of lengths {lengths[:5].tolist()}…",
                    "every row needs the same number of classes (a fixed_size_list column)",
                )
            size = int(lengths[0]) if len(lengths) else 0
        shape.append(size)
        array = array.flatten()
    if array.null_count:
        raise UsageError(f"{path}: column {name!r} has {array.null_count} null values", None)
    try:
        values = array.to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise UsageError(f"{path}: column {name!r} is not numeric ({exc})", None) from None
    return np.asarray(values).reshape(shape)


def _table_source(path: Path, read: Callable[[], Any], rows: int, names: list[str]) -> Source:
    _check_names(path, names, "column")

    def load() -> dict[str, np.ndarray]:
        table = read()
        return {name: column_array(path, name, table.column(name)) for name in table.column_names}

    return Source(path.name, path, rows, load)


def _parquet(path: Path) -> Source:
    pa = _pyarrow(path, "Parquet")
    try:
        metadata = pa.parquet.ParquetFile(path)
        names, rows = list(metadata.schema_arrow.names), int(metadata.metadata.num_rows)
    except (OSError, pa.ArrowException) as exc:
        raise UsageError(f"{path}: not a readable Parquet file ({exc})", None) from None
    return _table_source(path, lambda: pa.parquet.read_table(path), rows, names)


def _arrow_ipc(path: Path) -> Source:
    pa = _pyarrow(path, "Arrow IPC")
    stream = path.suffix in ARROW_STREAM_SUFFIXES

    def read() -> Any:
        # memory-mapped: zero-copy, the table's buffers are the file's pages
        if stream:
            return pa.ipc.open_stream(pa.memory_map(str(path))).read_all()
        try:
            return pa.ipc.open_file(pa.memory_map(str(path))).read_all()
        except pa.ArrowInvalid:  # a stream saved under a file suffix still reads
            return pa.ipc.open_stream(pa.memory_map(str(path))).read_all()

    try:
        table = read()
    except (OSError, pa.ArrowException) as exc:
        raise UsageError(f"{path}: not a readable Arrow IPC file ({exc})", None) from None
    return _table_source(path, read, table.num_rows, list(table.column_names))


def _file(path: Path) -> Source:
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return _npz(path)
    if suffix == ".safetensors":
        return _safetensors(path)
    if suffix in PARQUET_SUFFIXES:
        return _parquet(path)
    return _arrow_ipc(path)


def find_sources(paths: Sequence[str]) -> list[Source]:
    """Files of the accepted formats, ``logits.npy`` (its directory), or directories holding
    either (a ``logits.npy`` directory first, then files and such sub-directories by name)."""
    sources: list[Source] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = []
            if (path / "logits.npy").exists():
                found.append(_npy_dir(path))
            for child in sorted(path.iterdir()):
                if child.is_file() and child.suffix.lower() in FILE_SUFFIXES:
                    found.append(_file(child))
                elif child.is_dir() and (child / "logits.npy").exists():
                    found.append(_npy_dir(child))
            if not found:
                raise UsageError(f"{path}: no data files in this directory", f"push {FORMATS}")
            sources.extend(found)
        elif path.is_file() and path.suffix.lower() in FILE_SUFFIXES:
            sources.append(_file(path))
        elif path.suffix == ".npy" and path.exists():
            sources.append(_npy_dir(path.parent))
        elif not path.exists():
            raise UsageError(f"{path}: no such file or directory", f"push {FORMATS}")
        else:
            raise UsageError(f"{path}: not a format run push reads", f"push {FORMATS}")
    return sources


# ----------------------------------------------------------------------------------- batches


@dataclass
class Batch:
    """Rows ``start:start + len`` of one source, and its position among the source's batches."""

    source: str
    index: int
    parts: dict[str, Any]  # tensor name → (rows, …) array

    @property
    def rows(self) -> int:
        return int(self.parts["logits"].shape[0])

    def batch_id(self) -> str:
        """``<source>#<index>:<sha256 of names, dtypes, shapes and bytes, 16 hex>``: the same
        rows always get the same id, so a re-run push counts nothing twice."""
        digest = hashlib.sha256()
        for key in TENSOR_NAMES:
            if key in self.parts:
                part = self.parts[key]
                digest.update(f"{key}:{part.dtype.str}:{part.shape};".encode())
                digest.update(part.reshape(-1).view(np.uint8).data)
        for key in sorted(k for k in self.parts if k not in TENSOR_NAMES):  # ids and slices
            digest.update(f"{key}:".encode() + "\x00".join(map(str, self.parts[key])).encode())
        return f"{self.source[:120]}#{self.index}:{digest.hexdigest()[:16]}"

    def request(self) -> dict[str, Any]:
        """``add_batch`` keywords: the tensors, ``example_ids`` and ``slices`` {key: values}."""
        out: dict[str, Any] = {k: self.parts[k] for k in TENSOR_NAMES if k in self.parts}
        if "example_ids" in self.parts:
            ids = self.parts["example_ids"]
            out["example_ids"] = [x if isinstance(x, str) else int(x) for x in ids.tolist()]
        slices = {
            k.removeprefix(SLICE_PREFIX): [str(v) for v in self.parts[k].tolist()]
            for k in self.parts
            if k.startswith(SLICE_PREFIX)
        }
        if slices:
            out["slices"] = slices
        return out


def batches_of(
    source: Source, batch_size: int, arrays: Mapping[str, np.ndarray] | None = None
) -> Iterator[Batch]:
    """The source's rows in slices of ``batch_size`` (C-contiguous copies where needed);
    ``arrays``: the source's arrays when already loaded."""
    arrays = source.arrays() if arrays is None else arrays
    for index, start in enumerate(range(0, source.rows, batch_size)):
        parts = {
            key: np.ascontiguousarray(arrays[key][start : start + batch_size])
            for key in arrays
            if _known(key)
        }
        yield Batch(source.name, index, parts)
