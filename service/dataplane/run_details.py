"""A run's answers by size: the summary (scalars), GET run (small arrays) and one statistic in
full (``GET /v1/runs/{id}/metrics/{name}``). Pure functions of the merged
:class:`ce_engine.metrics.MetricState` and the run's merged confusion :class:`Cells`; the store
queries stay in :mod:`service.dataplane.runs`.

Sizes: a summary holds O(number of metrics) numbers whatever C; GET run adds per-class arrays
and the confusion matrix only up to ``run_detail_max_classes`` classes; a detail answer is
bounded by its query (``top`` ≤ 1000 cells, ``classes`` ≤ 1000 ids, ``limit`` ≤ 1000 rows) or,
for a whole matrix, by ``CE_EVAL_MAX_RESPONSE_BYTES``. Its time is the merge of the run's
confusion cells (at most C², C ≤ the run's ``max_confusion_classes``), done once per
(run, batches) and replica, one merge at a time (``RunsDataPlane._cells``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ce_engine.errors import quoted
from ce_engine.metrics import MetricState, metric_kind
from ce_engine.metrics.cells import Cells
from service.errors import NotFound, ValidationFailed

#: Metric kinds a summary carries (``ce_engine.metrics.catalog.METRIC_SHAPES``).
SUMMARY_KINDS = frozenset({"scalar", "scalar_map", "summary"})
#: Metrics whose per-class counts the ``per_class`` table is read from.
PER_CLASS_SOURCES = frozenset(
    {"precision", "recall", "f1", "support", "macro_f1", "micro_f1", "weighted_f1"}
)
RANKED = ("auroc", "average_precision")
MAX_TOP = 1000
MAX_CLASSES = 1000
MAX_ROWS = 1000
MAX_OFFSET = 2**31 - 1
#: JSON bytes per number of a detail answer, for its size estimate (``0.3333333333333333,``).
NUMBER_BYTES = 24
DEFAULT_ROWS = 100
PER_CLASS_COLUMNS = ("precision", "recall", "f1", "support")


def summary_names(names: Sequence[str]) -> list[str]:
    """The requested metrics a summary computes: scalars, small maps, AUROC / AP (macro)."""
    return [n for n in names if metric_kind(n) in SUMMARY_KINDS]


def details(names: Sequence[str]) -> list[str]:
    """Names ``GET /v1/runs/{id}/metrics/{name}`` serves for a run requesting ``names``."""
    wanted = set(names)
    out = []
    if "confusion_matrix" in wanted:
        out.append("confusion_matrix")
    if wanted & (PER_CLASS_SOURCES | set(RANKED)):
        out.append("per_class")
    if wanted & {"ece", "mce", "reliability"}:
        out.append("reliability")
    out += [n for n in (*RANKED, "roc_curve", "pr_curve") if n in wanted]
    return out


def small_metrics(state: MetricState, max_classes: int) -> dict[str, Any]:
    """GET run's ``metrics``: the summary's, ``reliability`` and ``warnings``, and when
    C ≤ ``max_classes`` the per-class lists, AUROC / AP in full and the binary family's
    L × 2 × 2 confusion counts (a softmax confusion matrix is added by the caller from the
    run's cells)."""
    small = set(summary_names(state.names)) | {"reliability"}  # when requested
    if state.num_classes <= max_classes:
        small |= {"precision", "recall", "f1", "support", *RANKED}
        if state.family == "binary":
            small.add("confusion_matrix")
    out = state.compute(only=small)
    if state.num_classes > max_classes:
        for name in RANKED:
            if name in out:
                out[name] = {"macro": out[name]["macro"]}
    return out


# ------------------------------------------------------------------------------ queries


@dataclass(frozen=True)
class DetailQuery:
    """The query of ``GET /v1/runs/{id}/metrics/{name}`` (None: not given)."""

    normalize: bool = False
    top: int | None = None
    classes: Sequence[int] | None = None
    sort: str | None = None
    order: str | None = None
    limit: int | None = None
    offset: int = 0


def _bad(param: str, msg: str) -> ValidationFailed:
    return ValidationFailed(
        f"query parameter {param}: {msg}", [{"loc": ["query", param], "msg": msg, "type": "query"}]
    )


def not_in_run(name: str, offered: Sequence[str]) -> NotFound:
    msg = f"this run has no detail {quoted(name)}; it has: {', '.join(offered) or 'none'}"
    return NotFound(msg, [{"loc": ["path", "name"], "msg": msg, "type": "metric_not_in_run"}])


def check_query(name: str, query: DetailQuery, num_classes: int, binary: bool) -> None:
    """422 for a parameter ``name`` does not take or a value out of range."""
    takes = {
        "confusion_matrix": {"normalize", "classes"} | (set() if binary else {"top"}),
        "per_class": {"sort", "order", "limit", "offset"},
        "roc_curve": {"classes"},
        "pr_curve": {"classes"},
    }.get(name, set())
    given = {
        "normalize": query.normalize,
        "top": query.top is not None,
        "classes": query.classes is not None,
        "sort": query.sort is not None,
        "order": query.order is not None,
        "limit": query.limit is not None,
        "offset": query.offset != 0,
    }
    for param, present in given.items():
        if present and param not in takes:
            raise _bad(param, f"{name} takes {', '.join(sorted(takes)) or 'no parameters'}")
    if query.top is not None and query.classes is not None:
        raise _bad("top", "top and classes are exclusive: ask for one")
    if query.top is not None and not 1 <= query.top <= MAX_TOP:
        raise _bad("top", f"must be between 1 and {MAX_TOP}")
    if query.classes is not None:
        ids = list(query.classes)
        if not 1 <= len(ids) <= MAX_CLASSES or len(set(ids)) != len(ids):
            raise _bad("classes", f"1 to {MAX_CLASSES} distinct class ids")
        if any(not 0 <= c < num_classes for c in ids):
            raise _bad("classes", f"class ids are 0 to {num_classes - 1}")
    if query.limit is not None and not 1 <= query.limit <= MAX_ROWS:
        raise _bad("limit", f"must be between 1 and {MAX_ROWS}")
    if not 0 <= query.offset <= MAX_OFFSET:
        raise _bad("offset", f"must be between 0 and {MAX_OFFSET}")
    if query.order is not None and query.order not in ("asc", "desc"):
        raise _bad("order", "asc or desc")


def class_names_of(names: Sequence[str] | None, ids: Sequence[int]) -> list[str] | None:
    """Display names of ``ids`` (None when the run has none, or too few)."""
    if not names:
        return None
    return [names[i] if i < len(names) else str(i) for i in ids]


# ------------------------------------------------------------------------------ answers


def largest_cells(cells: Cells, k: int) -> list[tuple[int, int, float]]:
    """The ``k`` largest off-diagonal cells of weight > 0 as (true, pred, count), ordered
    count desc, true asc, pred asc (O(cells) to select, O(k log k) to order)."""
    rows, cols = cells.rows, cells.cols
    keep = np.flatnonzero((rows != cols) & (cells.weight > 0))
    if keep.size > k:  # every cell at least as large as the k-th largest (ties included)
        kth = np.partition(cells.weight[keep], keep.size - k)[keep.size - k]
        keep = keep[cells.weight[keep] >= kth]
    keep = keep[np.lexsort((cols[keep], rows[keep], -cells.weight[keep]))][:k]
    return [
        (int(t), int(p), float(w))
        for t, p, w in zip(rows[keep], cols[keep], cells.weight[keep], strict=True)
    ]


def top_cells(
    rows: Sequence[tuple[int, int, float]],
    num_classes: int,
    row_totals: np.ndarray | None,
    names: Sequence[str] | None,
) -> dict[str, Any]:
    """``?top=K``: ``rows`` are the K largest off-diagonal (true, pred, count) cells, already
    ordered count desc, true asc, pred asc; ``row_totals`` (C,) (normalize) adds
    ``rate = count / row_totals[true]``."""
    top = []
    for true, pred, count in rows:
        cell: dict[str, Any] = {"true": true, "pred": pred, "count": count}
        if row_totals is not None:
            total = float(row_totals[true])
            cell["rate"] = count / total if total > 0 else 0.0
        top.append(cell)
    answer: dict[str, Any] = {"name": "confusion_matrix", "num_classes": num_classes, "top": top}
    if names:
        ids = sorted({c for t in top for c in (t["true"], t["pred"])})
        labels = class_names_of(names, ids) or []
        answer["class_names"] = {str(i): n for i, n in zip(ids, labels, strict=True)}
    return answer


def matrix_block(
    cells: Cells,
    classes: Sequence[int] | None,
    row_totals: np.ndarray | None,
    names: Sequence[str] | None,
) -> dict[str, Any]:
    """The whole matrix or the ``classes`` block (rows true, columns predicted); with
    ``row_totals`` (C,) (normalize) each row is divided by its class's total over all
    predictions."""
    num_classes = cells.size
    ids = np.arange(num_classes) if classes is None else np.asarray(classes, np.int64)
    position = np.full(num_classes, -1)
    position[ids] = np.arange(ids.size)
    at_rows, at_cols = position[cells.rows], position[cells.cols]
    inside = (at_rows >= 0) & (at_cols >= 0)
    block = np.zeros((ids.size, ids.size))
    block[at_rows[inside], at_cols[inside]] = cells.weight[inside]
    if row_totals is not None:
        totals = row_totals[ids]
        safe = np.where(totals > 0, totals, 1.0)
        block = np.where(totals[:, None] > 0, block / safe[:, None], 0.0)
    answer: dict[str, Any] = {"name": "confusion_matrix", "num_classes": num_classes}
    if classes is not None:
        answer["classes"] = ids.tolist()
    answer["matrix"] = block.tolist()
    labels = class_names_of(names, ids.tolist())
    if labels is not None:
        answer["class_names"] = labels
    return answer


def binary_matrix(
    state: MetricState, classes: Sequence[int] | None, normalize: bool
) -> dict[str, Any]:
    """Per label [[tn, fp], [fn, tp]] (``sklearn.metrics.multilabel_confusion_matrix``); with
    ``normalize`` each row (true negative / true positive) divided by its total."""
    st = state.stats
    ids = np.arange(state.num_classes) if classes is None else np.asarray(classes)
    cube = np.stack([np.stack([st["tn"], st["fp"]], -1), np.stack([st["fn"], st["tp"]], -1)], -2)[
        ids
    ]
    if normalize:
        totals = cube.sum(axis=-1, keepdims=True)
        cube = np.where(totals > 0, cube / np.where(totals > 0, totals, 1.0), 0.0)
    answer: dict[str, Any] = {"name": "confusion_matrix", "num_labels": state.num_classes}
    if classes is not None:
        answer["classes"] = list(classes)
    answer["matrix"] = cube.tolist()
    return answer


def per_class_table(
    state: MetricState, query: DetailQuery, names: Sequence[str] | None
) -> dict[str, Any]:
    """``per_class``: one row per class {class, name?, precision, recall, f1, support, auroc?,
    average_precision?}, sorted by ``sort`` (ties by class asc; undefined values last), paged
    by ``offset`` / ``limit``."""
    columns: dict[str, list[float | None]] = {}
    has_counts = "tp" in state.stats
    if has_counts:
        columns = {k: v.tolist() for k, v in state.per_class().items()}
    ranked = state.compute(only=RANKED)
    for name in RANKED:
        if name in ranked:
            columns[name] = list(ranked[name]["per_class"])
    sort = query.sort or "class"
    if sort != "class" and sort not in columns:
        raise _bad("sort", f"one of class, {', '.join(columns)}")
    order = query.order or ("asc" if sort == "class" else "desc")
    ids = list(range(state.num_classes))
    if sort != "class":
        values = columns[sort]
        defined = [i for i in ids if values[i] is not None]
        sign = -1.0 if order == "desc" else 1.0
        defined.sort(key=lambda i: (sign * float(values[i] or 0.0), i))
        ids = defined + [i for i in ids if values[i] is None]
    elif order == "desc":
        ids.reverse()
    limit = DEFAULT_ROWS if query.limit is None else query.limit
    page = ids[query.offset : query.offset + limit]
    labels = class_names_of(names, page)
    rows = []
    for j, i in enumerate(page):
        row: dict[str, Any] = {"class": i}
        if labels is not None:
            row["name"] = labels[j]
        row.update({k: v[i] for k, v in columns.items()})
        rows.append(row)
    return {"name": "per_class", "total": state.num_classes, "offset": query.offset, "rows": rows}


def reliability(state: MetricState) -> dict[str, Any]:
    """``reliability``: the calibration bins, which the state holds for ece and mce too."""
    binned = replace(state, names=(*state.names, "reliability"))
    return {"name": "reliability", "value": binned.compute(only=("reliability",))["reliability"]}


def curves(
    state: MetricState, name: str, classes: Sequence[int] | None, max_classes: int
) -> dict[str, Any]:
    """``roc_curve`` / ``pr_curve`` of ``classes`` (default all, when C ≤ ``max_classes``)."""
    if classes is None:
        if state.num_classes > max_classes:
            raise _bad("classes", f"this run has {state.num_classes} classes: name at most "
                       f"{MAX_CLASSES} of them, e.g. classes=0,1,2")  # fmt: skip
        classes = range(state.num_classes)
    ids = list(classes)
    value = state.compute(only=(name,))[name]
    return {
        "name": name,
        "num_classes": state.num_classes,
        "classes": ids,
        "value": [value[i] for i in ids],
    }
