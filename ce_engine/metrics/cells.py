"""``Cells``: a sparse C × C table of weighted counts (the softmax confusion matrix).

A batch of M positions touches at most M cells, so a batch's confusion statistic is kept as the
distinct flat cell ids ``k = t·C + p`` (sorted) and their weight sums, never as C² zeros: its
cost is O(M log M) whatever C, and merging two tables costs O(nnz₁ + nnz₂).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Cells:
    """Sparse C × C counts: entry [t, p] = Σ weights of the cell ``t·C + p``.

    ``index``: distinct flat cell ids, ascending (int64); ``weight``: their sums (float64).
    """

    size: int
    index: np.ndarray
    weight: np.ndarray

    @classmethod
    def of(cls, size: int, rows: np.ndarray, cols: np.ndarray, weight: np.ndarray) -> Cells:
        """The table of positions (rows[i], cols[i]) with weights weight[i]:
        cell k gets Σ_{i: rows[i]·C + cols[i] = k} weight[i]."""
        keys = rows.astype(np.int64) * size + cols.astype(np.int64)
        index, inverse = np.unique(keys, return_inverse=True)
        sums = np.bincount(inverse.ravel(), weights=weight, minlength=index.size)
        return cls(size, index, sums.astype(np.float64, copy=False))

    @classmethod
    def from_dense(cls, matrix: np.ndarray) -> Cells:
        flat = np.asarray(matrix, np.float64).ravel()
        index = np.flatnonzero(flat)
        return cls(int(matrix.shape[0]), index.astype(np.int64), flat[index])

    @property
    def shape(self) -> tuple[int, int]:
        return (self.size, self.size)

    @property
    def rows(self) -> np.ndarray:
        """True class t of each stored cell."""
        return self.index // self.size

    @property
    def cols(self) -> np.ndarray:
        """Predicted class p of each stored cell."""
        return self.index % self.size

    @classmethod
    def merge(cls, size: int, tables: Sequence[Cells]) -> Cells:
        """Cell-wise Σ of ``tables``, added in their order: cell k gets
        ((w₁[k] + w₂[k]) + w₃[k]) + …, the same float64 sum as adding them one by one."""
        if any(table.size != size for table in tables):
            raise ValueError("cannot add confusion tables of different sizes")
        if len(tables) == 1:
            return tables[0]
        keys = np.concatenate([np.zeros(0, np.int64), *(t.index for t in tables)])
        index, inverse = np.unique(keys, return_inverse=True)
        weights = np.concatenate([np.zeros(0), *(t.weight for t in tables)])
        # bincount adds in element order: a cell's weights in table order.
        sums = np.bincount(inverse.ravel(), weights=weights, minlength=index.size)
        return cls(size, index, sums)

    def __add__(self, other: Cells) -> Cells:
        """Cell-wise sum (the merge of two batches' tables)."""
        if not isinstance(other, Cells):
            raise ValueError("cannot add confusion tables of different sizes")
        return Cells.merge(self.size, [self, other])

    def dense(self) -> np.ndarray:
        """The C × C float64 matrix."""
        out = np.zeros(self.size * self.size)
        out[self.index] = self.weight
        return out.reshape(self.size, self.size)

    def row_totals(self) -> np.ndarray:
        """Σ_p [t, p] per true class t (C,)."""
        return np.bincount(self.rows, weights=self.weight, minlength=self.size)
