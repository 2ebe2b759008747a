"""Metrics vs scikit-learn and plain float64 references; mergeable-state properties."""

from __future__ import annotations

import json
import math
from functools import reduce
from itertools import pairwise
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import (
    accuracy_score,
    brier_score_loss,
    confusion_matrix,
    f1_score,
    log_loss,
    precision_recall_fscore_support,
    top_k_accuracy_score,
)

import ce_engine
from ce_engine.errors import InputValidationError
from ce_engine.metrics import METRIC_NAMES, MetricState, supported_metrics
from ce_engine.registry import get_loss

RNG = np.random.default_rng(2024)
# sklearn warns that k = C is a perfect score: we test that case on purpose
pytestmark = pytest.mark.filterwarnings("ignore:.k. .* greater than or equal to .n_classes.")
ALL = list(METRIC_NAMES)


def softmax(z: np.ndarray) -> np.ndarray:
    """Plain float64 softmax over the last axis."""
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def reference_entropy(p: np.ndarray, w: np.ndarray) -> float:
    total = 0.0
    for row, wi in zip(p, w, strict=True):
        total += wi * -sum(float(v) * math.log(float(v)) for v in row if v > 0)
    return total / w.sum()


def reference_calibration(
    conf: np.ndarray, correct: np.ndarray, w: np.ndarray, n_bins: int
) -> tuple[float, float, list[float], list[float], list[float]]:
    """ECE, MCE and per-bin (confidence, accuracy, count): bins (lo, hi], 0 in the first."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    count = [0.0] * n_bins
    conf_sum = [0.0] * n_bins
    acc_sum = [0.0] * n_bins
    for c, ok, wi in zip(conf, correct, w, strict=True):
        b = 0
        for j in range(n_bins):
            if edges[j] < c <= edges[j + 1]:
                b = j
        count[b] += wi
        conf_sum[b] += wi * c
        acc_sum[b] += wi * ok
    conf_mean = [s / n if n else 0.0 for s, n in zip(conf_sum, count, strict=True)]
    acc_mean = [s / n if n else 0.0 for s, n in zip(acc_sum, count, strict=True)]
    total = sum(count)
    ece = sum(n * abs(a - c) for n, a, c in zip(count, acc_mean, conf_mean, strict=True)) / total
    mce = max(abs(a - c) for n, a, c in zip(count, acc_mean, conf_mean, strict=True) if n)
    return ece, mce, conf_mean, acc_mean, count


def assert_metrics_equal(got: dict[str, Any], want: dict[str, Any], rtol: float = 1e-9) -> None:
    assert got.keys() == want.keys()
    for key in got:
        a, b = got[key], want[key]
        if isinstance(a, dict):
            assert_metrics_equal(a, b, rtol)
        elif a is None or b is None:
            assert a is None and b is None, key
        else:
            np.testing.assert_allclose(a, b, rtol=rtol, atol=1e-12, err_msg=key)


def check_against_sklearn(
    m: dict[str, Any], y: np.ndarray, p: np.ndarray, w: np.ndarray | None, log_base: str = "e"
) -> None:
    """The metrics present in ``m`` for labels y (n,), probabilities p (n, C), weights w."""
    c = p.shape[1]
    labels = np.arange(c)
    pred = p.argmax(axis=1)
    ones = np.ones(len(y)) if w is None else w
    base = math.log(2.0) if log_base == "2" else 1.0
    sk_nll = log_loss(y, p, labels=labels, sample_weight=w)
    prec, rec, f1, sup = precision_recall_fscore_support(
        y, pred, labels=labels, sample_weight=w, zero_division=0
    )
    ece, mce, conf_mean, acc_mean, count = reference_calibration(
        p.max(axis=1), (pred == y).astype(float), ones, 15
    )
    want: dict[str, Any] = {
        "accuracy": accuracy_score(y, pred, sample_weight=w),
        "top_k_accuracy": {
            k: top_k_accuracy_score(y, p, k=int(k), labels=labels, sample_weight=w)
            for k in m.get("top_k_accuracy", {})
        },
        "nll": sk_nll / base,
        "perplexity": math.exp(sk_nll),
        "entropy": reference_entropy(p, ones) / base,
        "ece": ece,
        "mce": mce,
        "reliability": {
            "bin_edges": np.linspace(0, 1, 16),
            "confidence": conf_mean,
            "accuracy": acc_mean,
            "count": count,
        },
        "brier": brier_score_loss(y, p, labels=labels, sample_weight=w, scale_by_half=False),
        "confusion_matrix": confusion_matrix(y, pred, labels=labels, sample_weight=w),
        "precision": prec,
        "recall": rec,
        "f1": f1,
        "support": sup,
        **{
            f"{avg}_f1": f1_score(y, pred, average=avg, sample_weight=w, zero_division=0)
            for avg in ("macro", "micro", "weighted")
        },
    }
    assert_metrics_equal(m, {name: want[name] for name in m}, rtol=1e-9)


def logits_with_absent_class(n: int, c: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits where the last class is never predicted nor a target (macro over present labels)."""
    z = RNG.standard_normal((n, c)) * 2.0
    z[:, -1] = -30.0
    y = RNG.integers(0, c - 1, size=n)
    return z, y


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("log_base", ["e", "2"])
def test_index_targets_match_sklearn(weighted: bool, log_base: str) -> None:
    z, y = logits_with_absent_class(60, 7)
    w = RNG.uniform(0.1, 3.0, size=60) if weighted else None
    res = ce_engine.evaluate(
        "cross_entropy",
        z,
        y,
        options={"top_k": [1, 2, 3, 7], "log_base": log_base},
        metrics=ALL,
        sample_weight=w,
        backend="numpy",
    )
    assert list(res.metrics) == ALL
    check_against_sklearn(res.metrics, y, softmax(z), w, log_base)


def test_class_axis_and_positions_flatten_like_the_loss() -> None:
    z = RNG.standard_normal((3, 5, 4)) * 2  # (N, C, d) with class_axis=1
    y = RNG.integers(0, 5, size=(3, 4))
    w = RNG.uniform(0.5, 2.0, size=3)  # per-sample weight broadcast over positions
    res = ce_engine.evaluate(
        "cross_entropy",
        z,
        y,
        options={"class_axis": 1, "top_k": [1, 3]},
        metrics=ALL,
        sample_weight=w,
        backend="numpy",
    )
    rows = np.moveaxis(z, 1, -1).reshape(-1, 5)
    check_against_sklearn(res.metrics, y.reshape(-1), softmax(rows), np.repeat(w, 4))


def test_ignore_index_positions_are_not_counted() -> None:
    z = RNG.standard_normal((40, 5))
    y = RNG.integers(0, 5, size=40)
    y[::3] = -100
    res = ce_engine.evaluate(
        "cross_entropy", z, y, options={"top_k": [2]}, metrics=ALL, backend="numpy"
    )
    keep = y != -100
    check_against_sklearn(res.metrics, y[keep], softmax(z[keep]), None)
    assert res.metric_state is not None
    assert res.metric_state.stats["count"] == int(keep.sum())

    y2 = y.copy()
    y2[~keep] = 4  # a custom ignore_index that is a valid class id
    res2 = ce_engine.evaluate(
        "cross_entropy", z, y2, options={"ignore_index": 4}, metrics=["support"], backend="numpy"
    )
    counted = y2 != 4
    np.testing.assert_allclose(res2.metrics["support"], np.bincount(y2[counted], minlength=5))


def test_nan_policy_omit_drops_rows() -> None:
    z = RNG.standard_normal((20, 4))
    y = RNG.integers(0, 4, size=20)
    z[[2, 11], 1] = np.nan
    res = ce_engine.evaluate(
        "cross_entropy",
        z,
        y,
        options={"nan_policy": "omit", "top_k": [1, 2]},
        metrics=ALL,
        backend="numpy",
    )
    keep = np.ones(20, bool)
    keep[[2, 11]] = False
    check_against_sklearn(res.metrics, y[keep], softmax(z[keep]), None)


def test_probability_targets_use_argmax_label_and_full_distribution() -> None:
    z = RNG.standard_normal((30, 4)) * 2
    raw = RNG.random((30, 4)) ** 3
    q = raw / raw.sum(axis=1, keepdims=True)
    w = RNG.uniform(0.2, 2.0, size=30)
    res = ce_engine.evaluate(
        "cross_entropy", z, q, metrics=ALL, options={"top_k": [1, 2]}, sample_weight=w
    )
    m = res.metrics
    p = softmax(z)
    y = q.argmax(axis=1)
    pred = p.argmax(axis=1)
    nll = sum(wi * -sum(qc * math.log(pc) for qc, pc in zip(qi, pi, strict=True))
              for qi, pi, wi in zip(q, p, w, strict=True)) / w.sum()  # fmt: skip
    brier = sum(wi * sum((pc - qc) ** 2 for qc, pc in zip(qi, pi, strict=True))
                for qi, pi, wi in zip(q, p, w, strict=True)) / w.sum()  # fmt: skip
    assert m["nll"] == pytest.approx(nll, rel=1e-9)
    assert m["perplexity"] == pytest.approx(math.exp(nll), rel=1e-9)
    assert m["brier"] == pytest.approx(brier, rel=1e-9)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred, sample_weight=w))
    np.testing.assert_allclose(
        m["confusion_matrix"], confusion_matrix(y, pred, labels=range(4), sample_weight=w)
    )
    for k in ("1", "2"):
        want = top_k_accuracy_score(y, p, k=int(k), labels=range(4), sample_weight=w)
        assert m["top_k_accuracy"][k] == pytest.approx(want)


def test_multi_hot_label_free_metrics_and_422_for_label_metrics() -> None:
    z = RNG.standard_normal((12, 5))
    y = RNG.random((12, 5)) < 0.4
    y[3] = False  # no positive label: not counted
    res = ce_engine.evaluate(
        "cross_entropy", z, y, metrics=["nll", "entropy", "brier", "perplexity"]
    )
    p = softmax(z)
    rows = [i for i in range(12) if y[i].any()]
    nll = [-sum(math.log(p[i, c]) for c in range(5) if y[i, c]) / y[i].sum() for i in rows]
    brier = [sum((p[i, c] - y[i, c] / y[i].sum()) ** 2 for c in range(5)) for i in rows]
    assert res.metrics["nll"] == pytest.approx(sum(nll) / len(rows), rel=1e-9)
    assert res.metrics["brier"] == pytest.approx(sum(brier) / len(rows), rel=1e-9)
    assert res.metrics["entropy"] == pytest.approx(
        reference_entropy(p[rows], np.ones(len(rows))), rel=1e-9
    )
    with pytest.raises(InputValidationError) as err:
        ce_engine.evaluate("cross_entropy", z, y, metrics=["nll", "accuracy", "f1"])
    assert [e.loc for e in err.value.errors] == [("metrics", 1), ("metrics", 2)]
    assert "multi_hot" in err.value.errors[0].msg


def test_input_kinds_give_the_same_metrics() -> None:
    z = RNG.standard_normal((25, 6)) * 2
    y = RNG.integers(0, 6, size=25)
    names = [n for n in ALL if n not in ("nll", "perplexity")]
    p = softmax(z)
    ref = ce_engine.evaluate("cross_entropy", z, y, metrics=ALL).metrics
    for kind, data in (("probabilities", p), ("log_probabilities", np.log(p))):
        got = ce_engine.evaluate(
            "cross_entropy", data, y, options={"input_kind": kind}, metrics=ALL
        ).metrics
        assert_metrics_equal({n: got[n] for n in names}, {n: ref[n] for n in names}, 1e-9)
        assert got["nll"] == pytest.approx(log_loss(y, p, labels=range(6)), rel=1e-6)


def test_temperature_scales_probabilities() -> None:
    z = RNG.standard_normal((25, 4)) * 3
    y = RNG.integers(0, 4, size=25)
    res = ce_engine.evaluate(
        "cross_entropy", z, y, options={"temperature": 2.5, "top_k": [1, 2]}, metrics=ALL
    )
    check_against_sklearn(res.metrics, y, softmax(z / 2.5), None)


def test_float32_inputs_within_float32_tolerance() -> None:
    z = (RNG.standard_normal((50, 5)) * 2).astype(np.float32)
    y = RNG.integers(0, 5, size=50)
    m = ce_engine.evaluate("cross_entropy", z, y, metrics=["nll", "brier", "entropy"]).metrics
    p = softmax(z.astype(np.float64))
    assert m["nll"] == pytest.approx(log_loss(y, p, labels=range(5)), rel=1e-5)
    assert m["brier"] == pytest.approx(
        brier_score_loss(y, p, labels=range(5), scale_by_half=False), rel=1e-5
    )
    assert m["entropy"] == pytest.approx(reference_entropy(p, np.ones(50)), rel=1e-5)


def test_top_k_ties_broken_as_sklearn() -> None:
    p = np.array(
        [
            [0.3, 0.3, 0.3, 0.1],
            [0.3, 0.3, 0.3, 0.1],
            [0.3, 0.3, 0.3, 0.1],
            [0.25, 0.25, 0.25, 0.25],
            [0.1, 0.4, 0.4, 0.1],
            [0.1, 0.4, 0.4, 0.1],
        ]
    )
    y = np.array([0, 1, 2, 0, 1, 3])
    m = ce_engine.evaluate(
        "cross_entropy",
        p,
        y,
        options={"input_kind": "probabilities", "top_k": [1, 2, 3, 4]},
        metrics=["top_k_accuracy"],
    ).metrics
    for k in (1, 2, 3, 4):
        want = top_k_accuracy_score(y, p, k=k, labels=range(4))
        assert m["top_k_accuracy"][str(k)] == pytest.approx(want), k
    # by hand: ties rank the larger class id first
    assert m["top_k_accuracy"]["1"] == pytest.approx(1 / 6)  # only row 2 (class 2 of 0,1,2)
    assert m["top_k_accuracy"]["2"] == pytest.approx(3 / 6)  # rows 1, 2, 4


def test_calibration_bins_at_exact_edges() -> None:
    # n_bins 4: edges 0, .25, .5, .75, 1 (exact in binary); bins (lo, hi], 0 in the first
    p = np.array(
        [
            [0.0, 0.0, 0.0, 0.0],  # κ = 0    → bin 0, predicted 0
            [0.25, 0.25, 0.25, 0.25],  # κ = .25 → bin 0, predicted 0
            [0.1, 0.5, 0.2, 0.2],  # κ = .5  → bin 1, predicted 1
            [0.0, 0.0, 0.75, 0.25],  # κ = .75 → bin 2, predicted 2
            [0.0, 0.0, 0.0, 1.0],  # κ = 1   → bin 3, predicted 3
            [0.0, 1.0, 0.0, 0.0],  # κ = 1   → bin 3, predicted 1
            [0.25 + 1e-12, 0.25, 0.25, 0.25 - 1e-12],  # κ just over .25 → bin 1, predicted 0
        ]
    )
    y = np.array([0, 1, 1, 0, 3, 1, 0])
    m = ce_engine.evaluate(
        "cross_entropy",
        p,
        y,
        # rows that are no distribution (κ = 0, …) reach every edge: sum_tolerance lets them in
        options={"input_kind": "probabilities", "n_bins": 4, "sum_tolerance": 4.0},
        metrics=["ece", "mce", "reliability"],
    ).metrics
    count = [2.0, 2.0, 1.0, 2.0]
    conf = [0.125, (0.5 + 0.25 + 1e-12) / 2, 0.75, 1.0]
    acc = [0.5, 1.0, 0.0, 1.0]
    rel = m["reliability"]
    assert rel["bin_edges"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    np.testing.assert_allclose(rel["count"], count)
    np.testing.assert_allclose(rel["confidence"], conf, rtol=1e-12)
    np.testing.assert_allclose(rel["accuracy"], acc)
    gaps = [abs(a - c) for a, c in zip(acc, conf, strict=True)]
    assert m["ece"] == pytest.approx(sum(n * g for n, g in zip(count, gaps, strict=True)) / 7)
    assert m["mce"] == pytest.approx(max(gaps))


def test_calibration_random_weighted_against_reference() -> None:
    z = RNG.standard_normal((200, 3)) * 3
    y = RNG.integers(0, 3, size=200)
    w = RNG.uniform(0.0, 2.0, size=200)
    m = ce_engine.evaluate(
        "cross_entropy",
        z,
        y,
        options={"n_bins": 10},
        metrics=["ece", "mce", "reliability"],
        sample_weight=w,
    ).metrics
    p = softmax(z)
    ece, mce, conf, acc, count = reference_calibration(
        p.max(axis=1), (p.argmax(axis=1) == y).astype(float), w, 10
    )
    assert m["ece"] == pytest.approx(ece, rel=1e-9)
    assert m["mce"] == pytest.approx(mce, rel=1e-9)
    np.testing.assert_allclose(m["reliability"]["confidence"], conf, rtol=1e-12)
    np.testing.assert_allclose(m["reliability"]["accuracy"], acc, rtol=1e-12)
    np.testing.assert_allclose(m["reliability"]["count"], count, rtol=1e-12)


def test_everything_ignored_gives_none_means() -> None:
    z = RNG.standard_normal((4, 3))
    y = np.full(4, -100)
    m = ce_engine.evaluate("cross_entropy", z, y, metrics=ALL).metrics
    for name in ("accuracy", "nll", "perplexity", "entropy", "ece", "mce", "brier"):
        assert m[name] is None, name
    for name in ("macro_f1", "micro_f1", "weighted_f1"):
        assert m[name] is None, name
    assert m["top_k_accuracy"] == {"1": None}  # default top_k [1, 5]: 5 > C is dropped
    assert m["support"] == [0.0, 0.0, 0.0]
    assert m["confusion_matrix"] == [[0.0] * 3] * 3


# ---- errors -------------------------------------------------------------------------------


def test_metric_request_errors_name_the_field() -> None:
    z = RNG.standard_normal((6, 5))
    y = RNG.integers(0, 5, size=6)
    with pytest.raises(InputValidationError) as err:
        ce_engine.evaluate("cross_entropy", z, y, metrics=["accuracy", "auc"])
    assert [e.loc for e in err.value.errors] == [("metrics", 1)]
    assert err.value.errors[0].type == "unknown_metric"

    with pytest.raises(InputValidationError) as err:
        ce_engine.evaluate(
            "cross_entropy", z, y, options={"top_k": [1, 6, 2]}, metrics=["top_k_accuracy"]
        )
    assert [e.loc for e in err.value.errors] == [("options", "top_k", 1)]

    with pytest.raises(InputValidationError) as err:
        ce_engine.evaluate(
            "cross_entropy",
            z,
            y,
            options={"max_confusion_classes": 4},
            metrics=["accuracy", "confusion_matrix"],
        )
    assert [e.loc for e in err.value.errors] == [("metrics", 1)]
    assert "max_confusion_classes" in err.value.errors[0].msg
    # the per-class metrics need no C × C matrix and stay available
    m = ce_engine.evaluate(
        "cross_entropy", z, y, options={"max_confusion_classes": 4}, metrics=["f1"]
    ).metrics
    assert len(m["f1"]) == 5


def test_default_top_k_above_c_is_dropped_explicit_is_rejected() -> None:
    z = RNG.standard_normal((6, 3))
    y = RNG.integers(0, 3, size=6)
    m = ce_engine.evaluate("cross_entropy", z, y, metrics=["top_k_accuracy"]).metrics
    assert list(m["top_k_accuracy"]) == ["1"]
    m = ce_engine.evaluate(
        "cross_entropy", z, y, options={"top_k": [3]}, metrics=["top_k_accuracy"]
    ).metrics
    assert m["top_k_accuracy"] == {"3": 1.0}


@pytest.mark.parametrize(
    ("loss", "options", "names", "bad"),
    [
        ("binary_cross_entropy", {}, ["accuracy", "top_k_accuracy", "entropy", "auroc"], [1, 2]),
        ("focal", {}, ["subset_accuracy", "perplexity"], [1]),
        ("focal", {"variant": "softmax"}, ["top_k_accuracy", "samples_f1"], [1]),
        ("linear_cross_entropy", {}, ["accuracy", "confusion_matrix", "f1", "brier"], [1, 2]),
    ],
)
def test_metrics_a_loss_cannot_give_are_422_naming_what_it_offers(
    loss: str, options: dict[str, Any], names: list[str], bad: list[int]
) -> None:
    z = RNG.standard_normal((4, 3))
    y = (RNG.random((4, 3)) < 0.5).astype(float)
    kwargs: dict[str, Any] = {"logits": z}
    if loss == "linear_cross_entropy":
        kwargs = {"logits": None, "features": z, "weight": RNG.standard_normal((3, 3))}
        y = RNG.integers(0, 3, size=4)
    elif options.get("variant") == "softmax":
        y = RNG.integers(0, 3, size=4)
    with pytest.raises(InputValidationError) as err:
        ce_engine.evaluate(loss, targets=y, options=options, metrics=names, **kwargs)
    assert [e.loc for e in err.value.errors] == [("metrics", i) for i in bad]
    offered = supported_metrics(loss, get_loss(loss).parse_options(options))
    for i, item in zip(bad, err.value.errors, strict=True):
        assert item.type == "unsupported_metric"
        assert item.msg.startswith(f"metric {names[i]} is not supported for {loss}")
        assert item.msg.endswith(f"{loss} offers: {', '.join(offered)}")
        assert names[i] not in offered


# ---- mergeable state -----------------------------------------------------------------------


def batch_state(
    z: np.ndarray, y: np.ndarray, w: np.ndarray | None, opts: dict[str, Any]
) -> MetricState:
    res = ce_engine.evaluate("cross_entropy", z, y, options=opts, metrics=ALL, sample_weight=w)
    assert res.metric_state is not None
    assert_metrics_equal(res.metric_state.compute(), res.metrics, rtol=0)
    return res.metric_state


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(2, 40),
    c=st.integers(2, 6),
    cuts=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=4),
    weighted=st.booleans(),
    ignore=st.booleans(),
    probs=st.booleans(),
)
def test_merge_of_split_equals_whole(
    seed: int, n: int, c: int, cuts: list[float], weighted: bool, ignore: bool, probs: bool
) -> None:
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, c)) * 3
    if probs:  # probability inputs with many ties and confidences at the bin edges
        z = rng.integers(0, 3, size=(n, c)) / 2.0
    y = rng.integers(0, c, size=n)
    if ignore:
        y[rng.random(n) < 0.3] = -100
    w = rng.uniform(0.0, 2.0, size=n) if weighted else None
    opts = {"top_k": [1, 2], "n_bins": 5, "input_kind": "probabilities" if probs else "logits"}
    if probs:  # the tie-heavy rows are no distributions: let them in
        opts["sum_tolerance"] = float(c)
    bounds = sorted({0, n, *(min(n - 1, max(1, int(f * n))) for f in cuts)})
    parts = [
        batch_state(z[a:b], y[a:b], None if w is None else w[a:b], opts)
        for a, b in pairwise(bounds)
    ]
    merged = reduce(MetricState.merge, parts)
    whole = batch_state(z, y, w, opts)
    assert merged.stats["count"] == whole.stats["count"]
    assert_metrics_equal(merged.compute(), whole.compute(), rtol=1e-9)


@pytest.mark.parametrize("c", [6, 1000])
def test_merged_5_row_batches_of_float32_logits_equal_the_whole_set(c: int) -> None:
    """A run pushed in batches of 5 equals one evaluation of all rows up to float64 summation
    order (the per-row values are the same bits however the rows are batched)."""
    rng = np.random.default_rng(c)
    n = 4000 if c < 100 else 400
    z = (rng.standard_normal((n, c)) * 2).astype(np.float32)
    y = rng.integers(0, c, size=n)
    w = rng.uniform(0.5, 2.0, size=n)
    opts = {"top_k": [1, 5]}
    parts = [batch_state(z[i : i + 5], y[i : i + 5], w[i : i + 5], opts) for i in range(0, n, 5)]
    merged = reduce(MetricState.merge, parts)
    assert_metrics_equal(merged.compute(), batch_state(z, y, w, opts).compute(), rtol=1e-12)


def test_empty_state_is_the_merge_identity() -> None:
    z = RNG.standard_normal((10, 4))
    y = RNG.integers(0, 4, size=10)
    state = batch_state(z, y, None, {"top_k": [1, 3]})
    empty = MetricState.empty(ALL, 4, top_k=(1, 3), n_bins=15, log_base="e")
    assert_metrics_equal(empty.merge(state).compute(), state.compute(), rtol=0)
    assert empty.compute()["accuracy"] is None


def test_to_dict_from_dict_round_trip_through_json() -> None:
    z = RNG.standard_normal((30, 5))
    y = RNG.integers(0, 5, size=30)
    w = RNG.uniform(0.1, 1.0, size=30)
    state = batch_state(z, y, w, {"top_k": [1, 3], "log_base": 2})
    data = json.loads(json.dumps(state.to_dict()))
    back = MetricState.from_dict(data)
    assert back.log_base == "2" and back.top_k == (1, 3) and back.num_classes == 5
    assert back.compute() == state.compute()  # exact: floats round-trip through JSON
    assert back.merge(state).stats["count"] == 60

    broken = json.loads(json.dumps(state.to_dict()))
    broken["stats"]["confusion"] = [[0.0] * 4] * 4
    with pytest.raises(ValueError, match="confusion"):
        MetricState.from_dict(broken)
    del broken["stats"]["confusion"]
    with pytest.raises(ValueError, match="do not match"):
        MetricState.from_dict(broken)
    with pytest.raises(ValueError):
        MetricState.from_dict({"names": ["accuracy"]})
    broken = json.loads(json.dumps(state.to_dict()))
    broken["stats"]["count"] = None
    with pytest.raises(ValueError, match="count"):
        MetricState.from_dict(broken)


def test_large_statistics_are_packed_exactly_and_old_list_states_still_load() -> None:
    c = 40  # a 40 × 40 confusion matrix: 1600 ≥ PACKED_STAT_SIZE elements
    z = RNG.standard_normal((500, c))
    y = RNG.integers(0, c, size=500)
    w = RNG.uniform(0.1, 1.0, size=500)  # non-integral sums: exactness is visible
    state = batch_state(z, y, w, {})
    data = json.loads(json.dumps(state.to_dict()))
    packed = data["stats"]["confusion"]
    assert packed["dtype"] == "float64" and packed["shape"] == [c, c]
    assert isinstance(data["stats"]["tp"], list)  # small statistics stay lists
    back = MetricState.from_dict(data)
    np.testing.assert_array_equal(back.stats["confusion"].dense(), state.stats["confusion"].dense())
    assert back.compute() == state.compute()
    legacy = json.loads(json.dumps(state.to_dict()))
    legacy["stats"]["confusion"] = state.stats["confusion"].dense().tolist()  # the earlier format
    assert MetricState.from_dict(legacy).compute() == state.compute()
    for bad in (
        {**packed, "zlib_base64": "not base64!"},
        {**packed, "shape": [c, c + 1]},
        {**packed, "dtype": "float32"},
        {"shape": [c, c]},
        {**packed, "zlib_base64": "AAAA"},  # base64, but not zlib
        {**packed, "shape": [float("inf"), c]},
        {**packed, "shape": [-c, -c]},
    ):
        broken = json.loads(json.dumps(state.to_dict()))
        broken["stats"]["confusion"] = bad
        with pytest.raises(ValueError, match="confusion"):
            MetricState.from_dict(broken)


@pytest.mark.parametrize(
    ("field", "other_opts", "other_c", "other_names"),
    [
        ("num_classes", {}, 5, ALL),
        ("top_k", {"top_k": [1, 2]}, 4, ALL),
        ("n_bins", {"n_bins": 10}, 4, ALL),
        ("log_base", {"log_base": "2"}, 4, ALL),
        ("names", {}, 4, ["accuracy"]),
    ],
)
def test_merge_of_incompatible_states_raises(
    field: str, other_opts: dict[str, Any], other_c: int, other_names: list[str]
) -> None:
    z = RNG.standard_normal((8, 4))
    y = RNG.integers(0, 4, size=8)
    a = ce_engine.evaluate("cross_entropy", z, y, metrics=ALL).metric_state
    z2 = RNG.standard_normal((8, other_c))
    b = ce_engine.evaluate(
        "cross_entropy", z2, y, options=other_opts, metrics=other_names
    ).metric_state
    assert a is not None and b is not None
    with pytest.raises(ValueError, match=field):
        a.merge(b)


def test_no_metrics_no_state() -> None:
    res = ce_engine.evaluate("cross_entropy", np.zeros((2, 3)), np.array([0, 1]))
    assert res.metric_state is None and res.metrics == {}


@pytest.mark.gpu
def test_cupy_backend_matches_sklearn() -> None:
    from ce_engine.backend import cupy_status

    if cupy_status()[0] is None:
        pytest.skip(cupy_status()[1])
    z, y = logits_with_absent_class(60, 6)
    w = RNG.uniform(0.1, 3.0, size=60)
    y[::7] = -100
    res = ce_engine.evaluate(
        "cross_entropy",
        z,
        y,
        options={"top_k": [1, 2, 6]},
        metrics=ALL,
        sample_weight=w,
        backend="cupy",
    )
    assert res.backend == "cupy"
    keep = y != -100
    check_against_sklearn(res.metrics, y[keep], softmax(z[keep]), w[keep])


@pytest.mark.parametrize("nan_policy", ["omit", "propagate"])
def test_nan_probability_targets_are_not_counted_like_the_loss(nan_policy: str) -> None:
    z = RNG.standard_normal((10, 3))
    raw = RNG.random((10, 3))
    q = raw / raw.sum(axis=1, keepdims=True)
    q[4, 0] = np.nan
    res = ce_engine.evaluate(
        "cross_entropy", z, q, options={"nan_policy": nan_policy}, metrics=["accuracy", "support"]
    )
    keep = np.arange(10) != 4
    assert res.metric_state is not None and res.metric_state.stats["count"] == res.count == 9
    y = q[keep].argmax(axis=1)
    assert res.metrics["accuracy"] == pytest.approx(
        accuracy_score(y, softmax(z[keep]).argmax(axis=1))
    )
    np.testing.assert_allclose(res.metrics["support"], np.bincount(y, minlength=3))


def test_a_batch_confusion_table_holds_only_the_cells_it_touches() -> None:
    """At C = 4096 a 256-row batch's confusion statistic is ≤ 256 cells (not 16.8M zeros), and
    its dense form and merges equal a float64 reference built with np.add.at."""
    c, n = 4096, 256
    z = RNG.standard_normal((n, c))  # float64: the weights are summed as sent
    y = RNG.integers(0, c, size=n)
    w = RNG.uniform(0.1, 1.0, size=n)
    opts = {"max_confusion_classes": c}
    first = ce_engine.evaluate(
        "cross_entropy", z, y, options=opts, metrics=["confusion_matrix"], sample_weight=w
    ).metric_state
    second = ce_engine.evaluate(
        "cross_entropy", z[::-1], y[::-1], options=opts, metrics=["confusion_matrix"]
    ).metric_state
    assert first is not None and second is not None
    cells = first.stats["confusion"]
    assert cells.index.size <= n and cells.shape == (c, c)
    reference = np.zeros((c, c))
    np.add.at(reference, (y, z.argmax(axis=1)), w)
    np.testing.assert_array_equal(cells.dense(), reference)
    np.add.at(reference, (y[::-1], z[::-1].argmax(axis=1)), 1.0)
    np.testing.assert_array_equal(first.merge(second).stats["confusion"].dense(), reference)
    back = MetricState.from_dict(json.loads(json.dumps(first.to_dict())))
    np.testing.assert_array_equal(back.stats["confusion"].index, cells.index)
    np.testing.assert_array_equal(back.stats["confusion"].weight, cells.weight)
