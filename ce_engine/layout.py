"""Array layout: move the class axis last and flatten positions to rows (M, C), and back."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from ce_engine.errors import InputValidationError

Array = Any


@dataclass(frozen=True)
class Layout:
    """Logits of ``shape`` with classes on ``class_axis`` seen as rows (M positions, C classes)."""

    shape: tuple[int, ...]
    class_axis: int

    @classmethod
    def of(cls, shape: tuple[int, ...], class_axis: int) -> Layout:
        ndim = len(shape)
        if ndim == 0:
            raise InputValidationError.single(("logits",), "logits must have at least 1 dimension")
        if not -ndim <= class_axis < ndim:
            raise InputValidationError.single(
                ("options", "class_axis"),
                f"class_axis {class_axis} is out of range for logits with {ndim} dimension(s)",
            )
        axis = class_axis % ndim
        if shape[axis] < 1:
            raise InputValidationError.single(("logits",), "the class axis must not be empty")
        return cls(shape, axis)

    @functools.cached_property
    def num_classes(self) -> int:
        return self.shape[self.class_axis]

    @functools.cached_property
    def positions_shape(self) -> tuple[int, ...]:
        return self.shape[: self.class_axis] + self.shape[self.class_axis + 1 :]

    @functools.cached_property
    def num_positions(self) -> int:
        return math.prod(self.positions_shape)

    @property
    def batch_size(self) -> int:
        """N: the leading dimension of the positions (1 for a single 1-D logits vector)."""
        return self.positions_shape[0] if self.positions_shape else 1

    def to_rows(self, xp: ModuleType, array: Array) -> Array:
        """(…, C on class_axis, …) → (M, C)."""
        if self.class_axis == len(self.shape) - 1:  # already last: a plain reshape (a view)
            return array.reshape(self.num_positions, self.num_classes)
        moved = xp.moveaxis(array, self.class_axis, -1)
        return moved.reshape(self.num_positions, self.num_classes)

    def from_rows(self, xp: ModuleType, rows: Array) -> Array:
        """(M, C) → logits' layout."""
        if self.class_axis == len(self.shape) - 1:
            return rows.reshape(self.shape)
        return xp.moveaxis(
            rows.reshape((*self.positions_shape, self.num_classes)), -1, self.class_axis
        )

    def to_positions(self, array: Array) -> Array:
        """Position-shaped array → (M,)."""
        return array.reshape(self.num_positions)

    def from_positions(self, flat: Array) -> Array:
        return flat.reshape(self.positions_shape)

    def position(self, row: int) -> tuple[int, ...]:
        """Row index → index into a position-shaped array (e.g. index targets)."""
        if not self.positions_shape:
            return ()
        return tuple(int(i) for i in np.unravel_index(row, self.positions_shape))

    def element(self, row: int, cls: int) -> tuple[int, ...]:
        """(row, class) → index into a logits-shaped array."""
        pos = list(self.position(row))
        pos.insert(self.class_axis, int(cls))
        return tuple(pos)
