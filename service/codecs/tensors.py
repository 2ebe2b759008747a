"""Tensor (de)serialisation: nested JSON lists, ``{dtype, shape, data: base64}``, raw bytes.

Tensors are decoded with an explicit dtype and shape (never unpickled); bytes are little-endian,
C order. Element counts are checked before any allocation.
"""

from __future__ import annotations

import binascii
from collections.abc import Sequence
from typing import Any

import numpy as np
import pybase64
from pydantic import BaseModel

from ce_eval_client.wire import WIRE_DTYPES
from service.errors import PayloadTooLarge, ValidationFailed, truncate
from service.shared_memory import MAPPED_MIN_BYTES, MappedTensor, RegionAccess, TensorRef


def _invalid(loc: Sequence[str | int], msg: str, type_: str = "tensor") -> ValidationFailed:
    return ValidationFailed(
        f"{'.'.join(map(str, loc))}: {msg}", [{"loc": list(loc), "msg": msg, "type": type_}]
    )


def check_shape(shape: Sequence[Any], loc: Sequence[str | int], max_elements: int) -> int:
    """Validate a declared shape; returns its element count (Python ints: no overflow)."""
    if not isinstance(shape, (list, tuple)) or len(shape) > 32:
        raise _invalid((*loc, "shape"), "shape must be a list of at most 32 dimensions")
    for i, dim in enumerate(shape):  # every dimension checked before any arithmetic on them
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 0:
            got = truncate(repr(dim), 40)
            raise _invalid((*loc, "shape", i), f"dimension must be an integer >= 0, got {got}")
    count = extent = 1  # extent: the product of the non-zero dimensions
    for dim in shape:
        count *= dim
        extent *= max(dim, 1)
        if count > max_elements or extent > max_elements:  # huge dims beside a 0 one too
            raise PayloadTooLarge(
                f"{'.'.join(map(str, loc))}: shape {truncate(list(shape), 200)} holds more "
                f"than the limit of {max_elements} elements",
                [{"loc": list(loc), "msg": "too many elements", "type": "too_many_elements"}],
            )
    return count


def from_bytes(
    raw: bytes | memoryview,
    dtype_name: str,
    shape: Sequence[Any],
    loc: Sequence[str | int],
    max_elements: int,
) -> np.ndarray:
    """Little-endian C-order bytes + dtype + shape → array (zero-copy view)."""
    dtype = WIRE_DTYPES.get(dtype_name)
    if dtype is None:
        raise _invalid(
            (*loc, "dtype"),
            f"unknown dtype {dtype_name!r}; expected one of {', '.join(WIRE_DTYPES)}",
            "dtype",
        )
    count = check_shape(shape, loc, max_elements)
    if len(raw) != count * dtype.itemsize:
        raise _invalid(
            (*loc, "data"),
            f"{len(raw)} bytes do not match shape {list(shape)} of {dtype_name} "
            f"({count * dtype.itemsize} bytes expected)",
            "byte_length",
        )
    return np.frombuffer(raw, dtype=dtype).reshape(tuple(shape))


def shared_array(
    regions: RegionAccess,
    ref: TensorRef,
    dtype_name: str,
    shape: Sequence[Any],
    loc: Sequence[str | int],
    max_elements: int,
    mappable: bool = False,
) -> np.ndarray | MappedTensor:
    """A tensor held in shared memory → array (its bytes copied out of the region), or, when
    ``mappable`` (logits), the registry ``maps_logits`` and it holds ``MAPPED_MIN_BYTES`` or
    more, a :class:`MappedTensor` left in place (its region located now: 404 / 422).

    Dtype and shape are checked first, and ``ref.byte_size`` must be exactly their bytes."""
    dtype = WIRE_DTYPES.get(dtype_name)
    if dtype is None:
        raise _invalid(
            (*loc, "dtype"),
            f"unknown dtype {dtype_name!r}; expected one of {', '.join(WIRE_DTYPES)}",
            "dtype",
        )
    expected = check_shape(shape, loc, max_elements) * dtype.itemsize
    if ref.byte_size != expected:
        raise _invalid(
            (*ref.loc, "shared_memory_byte_size"),
            f"{ref.byte_size} bytes declared; shape {list(shape)} of {dtype_name} holds {expected}",
            "byte_length",
        )
    if mappable and regions.registry.maps_logits and ref.byte_size >= MAPPED_MIN_BYTES:
        regions.locate(ref)
        return MappedTensor(regions, ref, tuple(shape), dtype)
    return from_bytes(regions.read(ref).data, dtype_name, shape, loc, max_elements)


def decode_tensor(value: Any, loc: Sequence[str | int], max_elements: int) -> np.ndarray:
    """A request tensor → NumPy array.

    Accepts an ndarray (passed through), a nested list of numbers / booleans, or a mapping
    ``{dtype, shape, data}`` with ``data`` base64.
    """
    if isinstance(value, np.ndarray):
        check_shape(list(value.shape), loc, max_elements)
        return value
    if isinstance(value, BaseModel):
        value = value.model_dump()
    if isinstance(value, dict):
        fields = value
        data = fields.get("data")
        if not isinstance(data, (str, bytes)):
            raise _invalid((*loc, "data"), "data must be a base64 string")
        try:
            raw = pybase64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise _invalid((*loc, "data"), "data is not valid base64", "base64") from None
        return from_bytes(raw, str(fields.get("dtype")), fields.get("shape", []), loc, max_elements)
    if isinstance(value, (list, int, float, bool)):
        return _from_nested(value, loc, max_elements)
    raise _invalid(loc, "expected a nested list of numbers or {dtype, shape, data}")


def _from_nested(value: Any, loc: Sequence[str | int], max_elements: int) -> np.ndarray:
    shape: list[int] = []
    probe = value
    while isinstance(probe, list):  # declared shape from the first elements: cheap size check
        shape.append(len(probe))
        if not probe:
            break
        probe = probe[0]
    check_shape(shape, loc, max_elements)
    try:
        array = np.array(value)
    except (ValueError, TypeError):
        raise _ragged(value, shape, loc) from None
    if list(array.shape) != shape:
        raise _ragged(value, shape, loc)
    if array.dtype.kind not in "biuf":
        raise _invalid(loc, "tensor elements must be numbers or booleans", "dtype")
    return array


def _ragged(value: Any, shape: Sequence[int], loc: Sequence[str | int]) -> ValidationFailed:
    """422 ``ragged`` naming the first element whose nesting differs from the first elements'
    (``shape``, read along index 0 at every depth), e.g. "logits[1] has length 1, logits[0]
    has length 2"."""
    found = _first_mismatch(value, shape, [])
    if found is None:  # rectangular after all (numbers of mixed kinds): no lengths to name
        return _invalid(loc, "not a rectangular array of numbers", "ragged")
    path, depth = found, len(found)
    name = ".".join(map(str, loc))

    def at(indices: Sequence[int]) -> str:
        return name + "".join(f"[{i}]" for i in indices)

    probe: Any = value
    for i in path:
        probe = probe[i]
    reference = [0] * depth  # the elements ``shape`` was read from
    if depth == len(shape):
        said = f"{at(path)} is a list, {at(reference)} is a number"
    elif not isinstance(probe, list):
        said = f"{at(path)} is a number, {at(reference)} is a list of length {shape[depth]}"
    else:
        said = f"{at(path)} has length {len(probe)}, {at(reference)} has length {shape[depth]}"
    return _invalid(loc, f"not a rectangular array: {said}", "ragged")


def _first_mismatch(value: Any, shape: Sequence[int], path: list[int]) -> list[int] | None:
    """Index path of the first element, depth first, that is a list where ``shape``
    ends, not a list where it goes on, or a list of another length; None if there is none.
    Depth ≤ 32 (``check_shape``); the walk is linear in the (body-bounded) list size."""
    depth = len(path)
    for i, item in enumerate(value):
        here = [*path, i]
        if depth + 1 == len(shape):
            if isinstance(item, list):
                return here
            continue
        if not isinstance(item, list) or len(item) != shape[depth + 1]:
            return here
        found = _first_mismatch(item, shape, here)
        if found is not None:
            return found
    return None
