"""Binary / multi-label metrics (binary_cross_entropy, sigmoid focal) vs scikit-learn and plain
float64 references; mergeable-state properties."""

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
    f1_score,
    hamming_loss,
    log_loss,
    multilabel_confusion_matrix,
    precision_recall_fscore_support,
)

import ce_engine
from ce_engine.errors import InputValidationError
from ce_engine.metrics import BINARY_METRICS, RANKING_METRICS, MetricState
from tests.reference import sigmoid, softplus
from tests.test_metrics import assert_metrics_equal, reference_calibration

RNG = np.random.default_rng(1717)
THRESHOLD_METRICS = [n for n in BINARY_METRICS if n not in RANKING_METRICS]


def assert_nested_close(got: Any, want: Any, rtol: float = 1e-9, where: str = "") -> None:
    """Same structure (dicts, lists, None, strings), numbers equal to ``rtol``."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), where
        for key in want:
            assert_nested_close(got[key], want[key], rtol, f"{where}.{key}")
    elif isinstance(want, (list, tuple, np.ndarray)) and not isinstance(want, str):
        assert len(got) == len(want), where
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            assert_nested_close(a, b, rtol, f"{where}[{i}]")
    elif want is None or isinstance(want, str):
        assert got == want, where
    else:
        assert got == pytest.approx(want, rel=rtol, abs=1e-12), where


def plain_sigmoid(z: np.ndarray) -> np.ndarray:
    return np.vectorize(sigmoid)(np.asarray(z, dtype=np.float64))


def check_against_sklearn(
    m: dict[str, Any], y: np.ndarray, p: np.ndarray, w: np.ndarray | None, t: Any = 0.5
) -> None:
    """Threshold and probability metrics in ``m`` for hard labels y (n, L), probabilities p."""
    pred = (p > np.asarray(t)).astype(int)
    n, labels = y.shape
    ones = np.ones(n) if w is None else w
    rep = np.repeat(ones, labels)  # element weights of the flattened (position, label) pairs
    prec, rec, f1, sup = precision_recall_fscore_support(y, pred, sample_weight=w, zero_division=0)
    ece, mce, conf, acc, count = reference_calibration(p.ravel(), y.ravel(), rep, 15)
    want: dict[str, Any] = {
        "accuracy": accuracy_score(y.ravel(), pred.ravel(), sample_weight=rep),
        "subset_accuracy": accuracy_score(y, pred, sample_weight=w),
        "hamming_loss": hamming_loss(y, pred, sample_weight=w),
        "precision": prec,
        "recall": rec,
        "f1": f1,
        "support": sup,
        **{
            f"{avg}_f1": f1_score(y, pred, average=avg, sample_weight=w, zero_division=0)
            for avg in ("macro", "micro", "weighted", "samples")
        },
        "nll": log_loss(y.ravel(), p.ravel(), sample_weight=rep, labels=[0, 1]),
        "brier": brier_score_loss(y.ravel(), p.ravel(), sample_weight=rep),
        "ece": ece,
        "mce": mce,
        "reliability": {
            "bin_edges": np.linspace(0, 1, 16),
            "confidence": conf,
            "accuracy": acc,
            "count": count,
        },
        "confusion_matrix": multilabel_confusion_matrix(y, pred, sample_weight=w),
    }
    assert_metrics_equal(m, {name: want[name] for name in m}, rtol=1e-9)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("loss", ["binary_cross_entropy", "focal"])
def test_threshold_and_probability_metrics_match_sklearn(loss: str, weighted: bool) -> None:
    z = RNG.standard_normal((80, 6)) * 2
    y = (RNG.random((80, 6)) < 0.35).astype(np.float64)
    y[:, 5] = 0.0  # a label never positive: zero_division paths
    z[:5, :] = 0.0  # p exactly 0.5: not predicted (p > threshold)
    w = RNG.uniform(0.1, 3.0, size=80) if weighted else None
    res = ce_engine.evaluate(loss, z, y, metrics=THRESHOLD_METRICS, sample_weight=w)
    assert list(res.metrics) == THRESHOLD_METRICS
    check_against_sklearn(res.metrics, y, plain_sigmoid(z), w)


def test_per_label_threshold_and_probability_inputs() -> None:
    p = RNG.random((60, 3))
    y = (RNG.random((60, 3)) < 0.5).astype(np.float64)
    t = [0.2, 0.5, 0.9]
    res = ce_engine.evaluate(
        "binary_cross_entropy",
        p,
        y,
        options={"input_kind": "probabilities", "threshold": t},
        metrics=THRESHOLD_METRICS,
    )
    check_against_sklearn(res.metrics, y, p, None, t)


def test_nd_logits_with_label_axis_and_temperature() -> None:
    z = RNG.standard_normal((4, 3, 5)) * 3  # (N, L, d) with class_axis=1
    y = (RNG.random((4, 3, 5)) < 0.5).astype(np.float64)
    w = RNG.uniform(0.5, 2.0, size=4)
    res = ce_engine.evaluate(
        "binary_cross_entropy",
        z,
        y,
        options={"class_axis": 1, "temperature": 2.0},
        metrics=THRESHOLD_METRICS,
        sample_weight=w,
    )
    rows = np.moveaxis(z, 1, -1).reshape(-1, 3) / 2.0
    labels = np.moveaxis(y, 1, -1).reshape(-1, 3)
    check_against_sklearn(res.metrics, labels, plain_sigmoid(rows), np.repeat(w, 5))


def test_soft_labels_count_as_weights_y_and_one_minus_y() -> None:
    """A soft label y is a positive element of weight s·y plus a negative one of s·(1 − y)."""
    z = RNG.standard_normal((30, 4)) * 2
    y = RNG.random((30, 4))
    w = RNG.uniform(0.5, 2.0, size=30)
    names = ["accuracy", "hamming_loss", "precision", "recall", "f1", "support", "macro_f1"]
    names += ["micro_f1", "weighted_f1", "nll", "brier", "ece", "confusion_matrix"]
    m = ce_engine.evaluate("binary_cross_entropy", z, y, metrics=names, sample_weight=w).metrics
    p = plain_sigmoid(z)
    pred = p > 0.5
    a, b = w[:, None] * y, w[:, None] * (1 - y)
    tp, fp = (a * pred).sum(0), (b * pred).sum(0)
    fn, tn = (a * ~pred).sum(0), (b * ~pred).sum(0)
    elements = w.sum() * 4
    nll = sum(
        w[i] * (y[i, j] * softplus(-z[i, j]) + (1 - y[i, j]) * softplus(z[i, j]))
        for i in range(30)
        for j in range(4)
    )
    f1 = 2 * tp / (2 * tp + fp + fn)
    assert m["accuracy"] == pytest.approx((tp + tn).sum() / elements, rel=1e-12)
    assert m["hamming_loss"] == pytest.approx((fp + fn).sum() / elements, rel=1e-12)
    np.testing.assert_allclose(m["precision"], tp / (tp + fp), rtol=1e-12)
    np.testing.assert_allclose(m["recall"], tp / (tp + fn), rtol=1e-12)
    np.testing.assert_allclose(m["f1"], f1, rtol=1e-12)
    np.testing.assert_allclose(m["support"], tp + fn, rtol=1e-12)
    assert m["macro_f1"] == pytest.approx(f1.mean(), rel=1e-12)
    assert m["micro_f1"] == pytest.approx(2 * tp.sum() / (2 * tp.sum() + fp.sum() + fn.sum()))
    assert m["weighted_f1"] == pytest.approx((f1 * (tp + fn)).sum() / (tp + fn).sum())
    assert m["nll"] == pytest.approx(nll / elements, rel=1e-12)
    assert m["brier"] == pytest.approx((w[:, None] * (p - y) ** 2).sum() / elements, rel=1e-12)
    ece = reference_calibration(p.ravel(), y.ravel(), np.repeat(w, 4), 15)[0]
    assert m["ece"] == pytest.approx(ece, rel=1e-9)
    np.testing.assert_allclose(
        m["confusion_matrix"], np.stack([np.stack([tn, fp], -1), np.stack([fn, tp], -1)], -2)
    )


def test_subset_accuracy_and_samples_f1_by_hand() -> None:
    z = np.array([[3.0, -2.0, 1.0], [-1.0, -1.0, -1.0], [2.0, 2.0, -4.0], [-1.0, 1.0, -1.0]])
    y = np.array([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.5, 1.0, 0.0]])
    m = ce_engine.evaluate(
        "binary_cross_entropy", z, y, metrics=["subset_accuracy", "samples_f1"]
    ).metrics
    # rows: exact, exact (nothing predicted, nothing true), one extra label, soft: 0.5 · 1 · 1
    assert m["subset_accuracy"] == pytest.approx((1 + 1 + 0 + 0.5) / 4)
    # F1_i: 1, 0 (empty/empty: zero_division 0), 2·1/(2 + 1), 2·1/(1 + 1.5)
    assert m["samples_f1"] == pytest.approx((1 + 0 + 2 / 3 + 2 / 2.5) / 4)


def test_nan_policy_omit_and_nan_labels_drop_positions() -> None:
    z = RNG.standard_normal((20, 3))
    y = (RNG.random((20, 3)) < 0.5).astype(np.float64)
    z[4, 1] = np.nan
    y[9, 2] = np.nan
    res = ce_engine.evaluate(
        "binary_cross_entropy", z, y, options={"nan_policy": "omit"}, metrics=THRESHOLD_METRICS
    )
    keep = np.ones(20, bool)
    keep[[4, 9]] = False
    assert res.metric_state is not None and res.metric_state.stats["count"] == 18
    check_against_sklearn(res.metrics, y[keep], plain_sigmoid(z[keep]), None)


def test_huge_logits_keep_a_finite_nll() -> None:
    z = np.array([[800.0, -800.0], [-900.0, 50.0]])
    y = np.array([[1.0, 0.0], [0.0, 0.0]])
    m = ce_engine.evaluate("binary_cross_entropy", z, y, metrics=["nll", "brier"]).metrics
    assert m["nll"] == pytest.approx(50.0 / 4, rel=1e-12)  # softplus(50) ≈ 50
    assert m["brier"] == pytest.approx(1.0 / 4, rel=1e-12)


def test_everything_omitted_gives_none_means() -> None:
    z = np.full((3, 2), np.nan)
    y = np.zeros((3, 2))
    m = ce_engine.evaluate(
        "binary_cross_entropy",
        z,
        y,
        options={"nan_policy": "omit"},
        metrics=[*THRESHOLD_METRICS, "auroc"],
    ).metrics
    for name in ("accuracy", "subset_accuracy", "hamming_loss", "macro_f1", "nll", "ece"):
        assert m[name] is None, name
    assert m["support"] == [0.0, 0.0]
    assert m["auroc"] == {"macro": None, "per_class": [None, None]}


def test_request_errors() -> None:
    z = RNG.standard_normal((5, 3))
    y = (RNG.random((5, 3)) < 0.5).astype(np.float64)
    with pytest.raises(InputValidationError) as err:
        ce_engine.evaluate(
            "binary_cross_entropy", z, y, options={"threshold": [0.5, 0.5]}, metrics=["f1"]
        )
    assert [e.loc for e in err.value.errors] == [("options", "threshold")]
    with pytest.raises(InputValidationError) as err:
        ce_engine.evaluate("binary_cross_entropy", z, y, options={"threshold": 1.5})
    assert err.value.errors[0].loc[:2] == ("options", "threshold")
    with pytest.raises(InputValidationError) as err:
        ce_engine.evaluate(  # 11 labels × 100 000 bins > MAX_RANKING_CELLS
            "binary_cross_entropy",
            np.zeros((2, 11)),
            np.zeros((2, 11)),
            options={"n_thresholds": 100_000},
            metrics=["auroc"],
        )
    assert [e.loc for e in err.value.errors] == [("metrics", 0)]
    assert "n_thresholds" in err.value.errors[0].msg


# ---- mergeable state -----------------------------------------------------------------------


def batch_state(z: np.ndarray, y: np.ndarray, w: np.ndarray | None, opts: dict) -> MetricState:
    res = ce_engine.evaluate(
        "binary_cross_entropy", z, y, options=opts, metrics=BINARY_METRICS, sample_weight=w
    )
    assert res.metric_state is not None
    return res.metric_state


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(2, 40),
    labels=st.integers(1, 4),
    cuts=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=4),
    weighted=st.booleans(),
    soft=st.booleans(),
)
def test_merge_of_split_equals_whole(
    seed: int, n: int, labels: int, cuts: list[float], weighted: bool, soft: bool
) -> None:
    rng = np.random.default_rng(seed)
    z = rng.integers(-3, 4, size=(n, labels)) / 2.0  # ties and p = 0.5 exactly
    y = rng.random((n, labels)) if soft else (rng.random((n, labels)) < 0.5).astype(float)
    w = rng.uniform(0.0, 2.0, size=n) if weighted else None
    opts = {"n_bins": 5, "n_thresholds": 7, "threshold": [0.4] * labels}
    bounds = sorted({0, n, *(min(n - 1, max(1, int(f * n))) for f in cuts)})
    parts = [
        batch_state(z[a:b], y[a:b], None if w is None else w[a:b], opts)
        for a, b in pairwise(bounds)
    ]
    merged = reduce(MetricState.merge, parts)
    whole = batch_state(z, y, w, opts)
    assert merged.stats["count"] == whole.stats["count"]
    assert_nested_close(merged.compute(), whole.compute())


def test_state_round_trips_through_json_and_refuses_other_thresholds() -> None:
    z = RNG.standard_normal((40, 3))
    y = (RNG.random((40, 3)) < 0.5).astype(np.float64)
    state = batch_state(z, y, None, {"n_thresholds": 500})  # 3 × 500 ≥ PACKED_STAT_SIZE: packed
    data = json.loads(json.dumps(state.to_dict()))
    assert data["family"] == "binary" and data["stats"]["rank_pos"]["shape"] == [3, 500]
    back = MetricState.from_dict(data)
    assert back.compute() == state.compute()
    other = batch_state(z, y, None, {"n_thresholds": 500, "threshold": 0.3})
    with pytest.raises(ValueError, match="threshold"):
        state.merge(other)
    softmax = ce_engine.evaluate("cross_entropy", z, np.zeros(40, int), metrics=["accuracy"])
    assert softmax.metric_state is not None
    with pytest.raises(ValueError, match="family"):
        state.merge(softmax.metric_state)
    data["family"] = "mystery"
    with pytest.raises(ValueError, match="family"):
        MetricState.from_dict(data)


def test_focal_sigmoid_gives_the_metrics_of_bce() -> None:
    z = RNG.standard_normal((25, 3))
    y = (RNG.random((25, 3)) < 0.5).astype(np.float64)
    a = ce_engine.evaluate("focal", z, y, metrics=BINARY_METRICS).metrics
    b = ce_engine.evaluate("binary_cross_entropy", z, y, metrics=BINARY_METRICS).metrics
    assert a == b
    assert math.isfinite(a["nll"])


def test_minus_infinite_logits_give_p_zero_and_a_finite_nll() -> None:
    z = np.array([[-np.inf, 0.5], [1.0, -np.inf]])
    y = np.array([[0.0, 1.0], [1.0, 0.0]])
    m = ce_engine.evaluate(
        "binary_cross_entropy", z, y, metrics=["nll", "brier", "auroc", "accuracy"]
    ).metrics
    assert m["nll"] == pytest.approx((softplus(-0.5) + softplus(-1.0)) / 4, rel=1e-12)
    want = ((1 - sigmoid(0.5)) ** 2 + (1 - sigmoid(1.0)) ** 2) / 4
    assert m["brier"] == pytest.approx(want, rel=1e-12)
    assert m["auroc"]["per_class"] == [1.0, 1.0]
    assert m["accuracy"] == 1.0
