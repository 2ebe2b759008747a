"""``Cells``: a sparse C × C table of weighted counts (the softmax confusion matrix).

A batch of M positions touches at most M cells, so a batch's confusion statistic is kept as the
distinct flat cell ids ``k = t·C + p`` (sorted) and their weight sums, never as C² zeros: its
cost is O(M log M) whatever C, and merging two tables costs O(nnz₁ + nnz₂).
"""

from __future__ import annotations

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

    def __add__(self, other: Cells) -> Cells:
        """Cell-wise sum (the merge of two batches' tables)."""
        if not isinstance(other, Cells) or other.size != self.size:
            raise ValueError("cannot add confusion tables of different sizes")
        keys = np.concatenate([self.index, other.index])
        index, inverse = np.unique(keys, return_inverse=True)
        weights = np.concatenate([self.weight, other.weight])
        sums = np.bincount(inverse.ravel(), weights=weights, minlength=index.size)
        return Cells(self.size, index, sums)

    def dense(self) -> np.ndarray:
        """The C × C float64 matrix."""
        out = np.zeros(self.size * self.size)
        out[self.index] = self.weight
        return out.reshape(self.size, self.size)

    def row_totals(self) -> np.ndarray:
        """Σ_p [t, p] per true class t (C,)."""
        return np.bincount(self.rows, weights=self.weight, minlength=self.size)
