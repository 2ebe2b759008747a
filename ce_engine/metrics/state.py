"""``MetricState``: fixed-size sufficient statistics of a metric family; merge = addition.

A batch is reduced to weighted sums and counts only (totals, per-bin sums, per-class counts,
score histograms), so merging two states is element-wise addition and computing on a merged
state equals computing on the concatenated batches. The definitions are in the family modules
(:mod:`ce_engine.metrics.softmax`, :mod:`ce_engine.metrics.binary`) and
:mod:`ce_engine.metrics.ranking`.
"""

from __future__ import annotations

import base64
import math
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ce_engine.metrics import ranking
from ce_engine.metrics.catalog import BINARY_METRICS, RANKING_METRICS, SOFTMAX_METRICS, Family
from ce_engine.metrics.cells import Cells

LN2 = math.log(2.0)

_PER_CLASS = frozenset(
    {"precision", "recall", "f1", "support", "macro_f1", "micro_f1", "weighted_f1"}
)
_BINNED = frozenset({"ece", "mce", "reliability"})
#: Binary metrics read from the per-label confusion counts tp, fp, fn, tn.
_LABEL_COUNTS = _PER_CLASS | {"accuracy", "hamming_loss", "confusion_matrix"}


def _softmax_shapes(
    wanted: set[str], num_classes: int, top_k: tuple[int, ...]
) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    if "accuracy" in wanted:
        shapes["correct"] = ()
    if "top_k_accuracy" in wanted:
        shapes["top_k_hits"] = (len(top_k),)
    if wanted & {"nll", "perplexity"}:
        shapes["nll"] = ()
    if "entropy" in wanted:
        shapes["entropy"] = ()
    if "brier" in wanted:
        shapes["brier"] = ()
    if "confusion_matrix" in wanted:
        shapes["confusion"] = (num_classes, num_classes)
    if wanted & _PER_CLASS:
        for key in ("tp", "predicted", "support"):
            shapes[key] = (num_classes,)
    return shapes


def _binary_shapes(wanted: set[str], num_labels: int) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    if wanted & _LABEL_COUNTS:
        for key in ("tp", "fp", "fn", "tn"):
            shapes[key] = (num_labels,)
    for name, key in (("subset_accuracy", "exact_match"), ("samples_f1", "samples_f1")):
        if name in wanted:
            shapes[key] = ()
    for key in ("nll", "brier"):
        if key in wanted:
            shapes[key] = ()
    return shapes


def stat_shapes(
    family: Family,
    names: Iterable[str],
    num_classes: int,
    top_k: tuple[int, ...],
    n_bins: int,
    n_thresholds: int,
) -> dict[str, tuple[int, ...]]:
    """The sufficient statistics the metrics ``names`` need, with their shapes (() = scalar)."""
    wanted = set(names)
    shapes: dict[str, tuple[int, ...]] = {"weight": (), "count": ()}
    if family == "softmax":
        shapes.update(_softmax_shapes(wanted, num_classes, top_k))
    else:
        shapes.update(_binary_shapes(wanted, num_classes))
    if wanted & _BINNED:
        for key in ("bin_count", "bin_confidence", "bin_correct"):
            shapes[key] = (n_bins,)
    if wanted & set(RANKING_METRICS):
        shapes["rank_pos"] = shapes["rank_neg"] = (num_classes, n_thresholds)
    return shapes


#: Statistics with at least this many elements are stored packed (see MetricState.to_dict).
PACKED_STAT_SIZE = 1024


def _zlib64(array: np.ndarray, dtype: str) -> str:
    data = zlib.compress(np.ascontiguousarray(array, dtype=dtype).tobytes(), 1)
    return base64.b64encode(data).decode("ascii")


def _pack(value: Any) -> Any:
    if isinstance(value, Cells):  # sparse: the stored cells' ids and weights
        return {
            "dtype": "float64",
            "shape": [value.size, value.size],
            "cells": value.index.size,
            "index_zlib_base64": _zlib64(value.index, "<i8"),
            "zlib_base64": _zlib64(value.weight, "<f8"),
        }
    if not isinstance(value, np.ndarray):
        return value
    if value.size < PACKED_STAT_SIZE:
        return value.tolist()
    return {"dtype": "float64", "shape": list(value.shape), "zlib_base64": _zlib64(value, "<f8")}


def _inflate(text: Any, size: int, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """base64 zlib text → exactly ``size`` bytes as ``dtype``; ValueError otherwise."""
    inflate = zlib.decompressobj()
    try:
        packed = base64.b64decode(text, validate=True)
        raw = inflate.decompress(packed, size + 1)
    except zlib.error as exc:
        raise ValueError(f"packed statistic is not zlib data: {exc}") from None
    if len(raw) != size or not inflate.eof or inflate.unused_data:
        raise ValueError(f"packed statistic does not hold {list(shape)} values")
    return np.frombuffer(raw, dtype=dtype)


def _unpack_cells(value: dict[str, Any], shape: tuple[int, ...]) -> Cells:
    count = int(value["cells"])
    if len(shape) != 2 or shape[0] != shape[1] or not 0 <= count <= shape[0] * shape[1]:
        raise ValueError(f"packed cells of shape {list(shape)} / count {count} are out of range")
    index = _inflate(value["index_zlib_base64"], 8 * count, "<i8", shape).astype(np.int64)
    weight = _inflate(value["zlib_base64"], 8 * count, "<f8", shape).astype(np.float64)
    if count and (index[0] < 0 or index[-1] >= shape[0] ** 2 or np.any(np.diff(index) <= 0)):
        raise ValueError("packed cells are not distinct ascending cell ids")
    return Cells(shape[0], index, weight)


def _unpack(value: Any) -> np.ndarray | Cells:
    if isinstance(value, dict):
        if value.get("dtype") != "float64":
            raise ValueError(f"packed statistic of dtype {value.get('dtype')!r}, want float64")
        try:
            shape = tuple(int(d) for d in value["shape"])
        except OverflowError:
            raise ValueError(f"packed statistic has shape {value['shape']!r}") from None
        size = math.prod(shape) * 8
        if size > 8 * 4096 * 4096 or min(shape, default=0) < 0:  # ≤ a 4096-class confusion
            raise ValueError(f"packed statistic of shape {list(shape)} is out of range")
        if "cells" in value:
            return _unpack_cells(value, shape)
        raw = _inflate(value["zlib_base64"], size, "<f8", shape)
        return raw.astype(np.float64).reshape(shape)
    return np.asarray(value, np.float64)


_CONFIG = ("family", "names", "num_classes", "top_k", "n_bins", "n_thresholds", "threshold")


@dataclass
class MetricState:
    """Fixed-size sufficient statistics for the requested metrics; merge = addition.

    ``stats`` holds host values only: ``count`` (int, positions counted), ``weight`` (float,
    W = Σ s_i) and, per requested metric, float64 NumPy arrays or floats of weighted sums
    (nll and entropy in nats; ``log_base`` applies in :meth:`compute`). ``family`` is
    ``softmax`` or ``binary``; ``n_thresholds`` sizes the ranking histograms; ``threshold``
    (binary) is the decision threshold per label, or one for all.
    """

    names: tuple[str, ...]
    num_classes: int
    top_k: tuple[int, ...]
    n_bins: int
    log_base: str  # "e" | "2"
    stats: dict[str, Any] = field(default_factory=dict)
    family: Family = "softmax"
    n_thresholds: int = 1000
    threshold: tuple[float, ...] = ()

    @classmethod
    def empty(
        cls,
        names: Iterable[str],
        num_classes: int,
        top_k: Iterable[int] = (1, 5),
        n_bins: int = 15,
        log_base: str = "e",
        *,
        family: Family = "softmax",
        n_thresholds: int = 1000,
        threshold: Iterable[float] = (),
    ) -> MetricState:
        """The state of zero positions (the identity of :meth:`merge`)."""
        names_t, top_k_t = tuple(names), tuple(top_k)
        stats: dict[str, Any] = {}
        shapes = stat_shapes(family, names_t, num_classes, top_k_t, n_bins, n_thresholds)
        for key, shape in shapes.items():
            if key == "confusion":
                stats[key] = Cells(num_classes, np.zeros(0, np.int64), np.zeros(0))
            else:
                stats[key] = 0 if key == "count" else (np.zeros(shape) if shape else 0.0)
        return cls(
            names_t,
            num_classes,
            top_k_t,
            n_bins,
            log_base,
            stats,
            family,
            n_thresholds,
            tuple(threshold),
        )

    def _config(self) -> tuple[Any, ...]:
        return (*(getattr(self, f) for f in _CONFIG), self.log_base)

    def merge(self, other: MetricState) -> MetricState:
        """Element-wise sum of the statistics; ValueError when the states are incompatible."""
        if self._config() != other._config():
            fields = (*_CONFIG, "log_base")
            diff = [
                f"{f}: {a!r} != {b!r}"
                for f, a, b in zip(fields, self._config(), other._config(), strict=True)
                if a != b
            ]
            raise ValueError(f"cannot merge incompatible metric states ({'; '.join(diff)})")
        if self.stats.keys() != other.stats.keys():
            raise ValueError("cannot merge metric states holding different statistics")
        stats = {key: self.stats[key] + other.stats[key] for key in self.stats}
        return replace(self, stats=stats)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form: arrays as (nested) lists of floats, those of at least
        ``PACKED_STAT_SIZE`` elements (a confusion matrix, score histograms) as
        ``{dtype, shape, zlib_base64}``: the little-endian float64 bytes zlib-compressed, in
        base64 (exact, and for a mostly-zero 1000-class confusion matrix ~100× smaller and ~5×
        faster to (de)serialise than lists)."""
        return {
            "family": self.family,
            "names": list(self.names),
            "num_classes": self.num_classes,
            "top_k": list(self.top_k),
            "n_bins": self.n_bins,
            "n_thresholds": self.n_thresholds,
            "threshold": list(self.threshold),
            "log_base": self.log_base,
            "stats": {key: _pack(value) for key, value in self.stats.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MetricState:
        """Inverse of :meth:`to_dict`; ValueError when the statistics do not fit the config.
        States written before ``family``, ``n_thresholds`` and ``threshold`` existed load as
        softmax states."""
        try:
            family = str(data.get("family", "softmax"))
            names = tuple(str(n) for n in data["names"])
            num_classes = int(data["num_classes"])
            top_k = tuple(int(k) for k in data["top_k"])
            n_bins = int(data["n_bins"])
            n_thresholds = int(data.get("n_thresholds", 1000))
            threshold = tuple(float(t) for t in data.get("threshold", ()))
            log_base = str(data["log_base"])
            raw = dict(data["stats"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a metric state: {exc!r}") from None
        known = {"softmax": SOFTMAX_METRICS, "binary": BINARY_METRICS}.get(family)
        if known is None:
            raise ValueError(f"not a metric state: family {family!r}")
        unknown = [n for n in names if n not in known]
        if unknown or log_base not in ("e", "2"):
            raise ValueError(f"not a metric state: names {unknown} / log_base {log_base!r}")
        ranked = set(names) & set(RANKING_METRICS)
        if n_thresholds < 2 or (ranked and num_classes * n_thresholds > ranking.MAX_RANKING_CELLS):
            raise ValueError(f"not a metric state: n_thresholds {n_thresholds} out of range")
        fam: Family = "binary" if family == "binary" else "softmax"
        shapes = stat_shapes(fam, names, num_classes, top_k, n_bins, n_thresholds)
        if raw.keys() != shapes.keys():
            raise ValueError(f"metric state statistics {sorted(raw)} do not match {sorted(shapes)}")
        stats: dict[str, Any] = {}
        for key, shape in shapes.items():
            try:
                value = int(raw[key]) if key == "count" else _unpack(raw[key])
                if key == "confusion" and isinstance(value, np.ndarray) and value.shape == shape:
                    value = Cells.from_dense(value)  # states stored before the sparse table
            except (TypeError, ValueError, KeyError, OverflowError) as exc:
                raise ValueError(f"metric state {key!r} is not numeric: {exc}") from None
            if isinstance(value, int):
                stats[key] = value
            elif value.shape != shape or isinstance(value, Cells) != (key == "confusion"):
                raise ValueError(f"metric state {key!r} has shape {value.shape}, want {shape}")
            elif isinstance(value, Cells) or shape:
                stats[key] = value
            else:
                stats[key] = float(value)
        return cls(names, num_classes, top_k, n_bins, log_base, stats, fam, n_thresholds, threshold)

    # ------------------------------------------------------------------ compute

    def compute(self, only: Iterable[str] | None = None) -> dict[str, Any]:
        """{name: value} for the requested metrics (those of them in ``only`` when given), then
        ``warnings`` when a ranking metric is undefined for some class (see the family modules
        for the definitions)."""
        names = self.names if only is None else tuple(n for n in self.names if n in set(only))
        ranked: dict[str, Any] = {}
        if set(names) & set(RANKING_METRICS):
            points = ranking.binned_points(self.stats["rank_pos"], self.stats["rank_neg"])
            ranked = ranking.ranking_values(points, names)
        scalar = self._softmax if self.family == "softmax" else self._binary
        out: dict[str, Any] = {}
        for name in names:
            out[name] = ranked[name] if name in ranked else scalar(name)
        if "warnings" in ranked:
            out["warnings"] = ranked["warnings"]
        return out

    def per_class(self) -> dict[str, np.ndarray]:
        """Per class (softmax) or label (binary), from the confusion counts whichever of the
        per-class metrics were requested: ``precision`` = tp / predicted, ``recall`` =
        tp / support, ``f1`` = 2·tp / (predicted + support), ``support`` (0 where undefined);
        KeyError when the state holds no per-class counts."""
        st = self.stats
        if self.family == "softmax":
            tp, predicted, support = st["tp"], st["predicted"], st["support"]
        else:
            tp, support = st["tp"], st["tp"] + st["fn"]
            predicted = st["tp"] + st["fp"]
        return {
            "precision": _ratio(tp, predicted),
            "recall": _ratio(tp, support),
            "f1": _ratio(2.0 * tp, predicted + support),
            "support": np.asarray(support, np.float64),
        }

    def _mean(self, key: str, total: float) -> float | None:
        return float(self.stats[key]) / total if total > 0 else None

    def _softmax(self, name: str) -> Any:
        st = self.stats
        total = float(st["weight"])
        scale = 1.0 / LN2 if self.log_base == "2" else 1.0
        if name == "accuracy":
            return self._mean("correct", total)
        if name == "top_k_accuracy":
            return {
                str(k): (float(h) / total if total > 0 else None)
                for k, h in zip(self.top_k, st["top_k_hits"], strict=True)
            }
        if name in ("nll", "entropy"):
            mean = self._mean(name, total)
            return None if mean is None else mean * scale
        if name == "perplexity":
            nll = self._mean("nll", total)
            return None if nll is None else _exp(nll)
        if name == "brier":
            return self._mean("brier", total)
        if name in _BINNED:
            return self._calibration(name, total)
        if name == "confusion_matrix":
            return st["confusion"].dense().tolist()
        return self._per_class(name, total)

    def _calibration(self, name: str, total: float) -> Any:
        count = self.stats["bin_count"]
        conf = self.stats["bin_confidence"]
        correct = self.stats["bin_correct"]
        filled = count > 0
        safe = np.where(filled, count, 1.0)
        conf_mean = np.where(filled, conf / safe, 0.0)
        acc_mean = np.where(filled, correct / safe, 0.0)
        if name == "ece":
            return float(np.abs(correct - conf).sum() / total) if total > 0 else None
        if name == "mce":
            gaps = np.abs(acc_mean - conf_mean)[filled]
            return float(gaps.max()) if gaps.size else None
        return {
            "bin_edges": np.linspace(0.0, 1.0, self.n_bins + 1).tolist(),
            "confidence": conf_mean.tolist(),
            "accuracy": acc_mean.tolist(),
            "count": count.tolist(),
        }

    def _per_class(self, name: str, total: float) -> Any:
        tp, predicted, support = (self.stats[k] for k in ("tp", "predicted", "support"))
        if name == "support":
            return support.tolist()
        if name == "micro_f1":
            den = float(predicted.sum() + support.sum())
            return 2.0 * float(tp.sum()) / den if den > 0 else None
        f1 = _ratio(2.0 * tp, predicted + support)
        if name == "precision":
            return _ratio(tp, predicted).tolist()
        if name == "recall":
            return _ratio(tp, support).tolist()
        if name == "f1":
            return f1.tolist()
        if name == "macro_f1":
            present = (support > 0) | (predicted > 0)
            return float(f1[present].mean()) if present.any() else None
        assert name == "weighted_f1"
        return float((f1 * support).sum() / support.sum()) if support.sum() > 0 else None

    def _binary(self, name: str) -> Any:
        st = self.stats
        weight = float(st["weight"])
        elements = weight * self.num_classes  # W · L: every (position, label) element
        if name == "subset_accuracy":
            return self._mean("exact_match", weight)
        if name == "samples_f1":
            return self._mean("samples_f1", weight)
        if name == "nll":
            mean = self._mean("nll", elements)
            return None if mean is None else mean / LN2 if self.log_base == "2" else mean
        if name == "brier":
            return self._mean("brier", elements)
        if name in _BINNED:
            return self._calibration(name, elements)
        tp, fp, fn, tn = (st[k] for k in ("tp", "fp", "fn", "tn"))
        if name == "accuracy":
            return float((tp + tn).sum()) / elements if elements > 0 else None
        if name == "hamming_loss":
            return float((fp + fn).sum()) / elements if elements > 0 else None
        if name == "confusion_matrix":  # sklearn multilabel_confusion_matrix: [[tn, fp], [fn, tp]]
            return np.stack([np.stack([tn, fp], -1), np.stack([fn, tp], -1)], -2).tolist()
        support = tp + fn
        f1 = _ratio(2.0 * tp, 2.0 * tp + fp + fn)
        if name == "precision":
            return _ratio(tp, tp + fp).tolist()
        if name == "recall":
            return _ratio(tp, support).tolist()
        if name == "f1":
            return f1.tolist()
        if name == "support":
            return support.tolist()
        if weight <= 0:  # averages over no data
            return None
        if name == "macro_f1":
            return float(f1.mean())
        if name == "micro_f1":
            den = float(2.0 * tp.sum() + fp.sum() + fn.sum())
            return 2.0 * float(tp.sum()) / den if den > 0 else 0.0
        assert name == "weighted_f1"
        total_support = float(support.sum())
        return float((f1 * support).sum()) / total_support if total_support > 0 else 0.0


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den with 0 where den is 0 (sklearn ``zero_division=0``)."""
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf
