"""Ranking metrics (AUROC, average precision, ROC / PR curves): exact in a stateless evaluation
(vs scikit-learn and a plain pairwise reference), binned in a run's state (vs the exact values
on quantised scores, and within the documented bound on random ones)."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
from sklearn.metrics import (
    average_precision_score,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

import ce_engine
from ce_engine.errors import InputValidationError
from ce_engine.metrics import MetricState, ranking
from tests.test_metrics import softmax
from tests.test_metrics_binary import assert_nested_close

RNG = np.random.default_rng(4242)
RANKED = ["auroc", "average_precision", "roc_curve", "pr_curve"]


def pairwise_auroc(score: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> float:
    """Σ_ij a_i b_j ([s_i > s_j] + ½[s_i = s_j]) / (A B), by a double loop."""
    total = 0.0
    for si, ai in zip(score, pos, strict=True):
        for sj, bj in zip(score, neg, strict=True):
            total += ai * bj * (1.0 if si > sj else 0.5 if si == sj else 0.0)
    return total / (pos.sum() * neg.sum())


def tied_logits(n: int, labels: int) -> np.ndarray:
    """Logits on a coarse grid: many ties within each label."""
    return RNG.integers(-4, 5, size=(n, labels)) / 2.0


def evaluate(loss: str, z: np.ndarray, y: np.ndarray, **kwargs: Any) -> ce_engine.EvaluationResult:
    return ce_engine.evaluate(loss, z, y, metrics=kwargs.pop("metrics", RANKED), **kwargs)


# ---- exact (stateless) ---------------------------------------------------------------------


@pytest.mark.parametrize("weighted", [False, True])
def test_binary_exact_auroc_and_ap_equal_sklearn_with_ties(weighted: bool) -> None:
    z = tied_logits(120, 4)
    y = (RNG.random((120, 4)) < 0.4).astype(np.float64)
    w = RNG.uniform(0.1, 3.0, size=120) if weighted else None
    m = evaluate("binary_cross_entropy", z, y, sample_weight=w).metrics
    auroc = roc_auc_score(y, z, average=None, sample_weight=w)
    ap = average_precision_score(y, z, average=None, sample_weight=w)
    np.testing.assert_allclose(m["auroc"]["per_class"], auroc, rtol=0, atol=1e-12)
    np.testing.assert_allclose(m["average_precision"]["per_class"], ap, rtol=0, atol=1e-12)
    assert m["auroc"]["macro"] == pytest.approx(
        roc_auc_score(y, z, average="macro", sample_weight=w), abs=1e-12
    )
    assert m["average_precision"]["macro"] == pytest.approx(
        average_precision_score(y, z, average="macro", sample_weight=w), abs=1e-12
    )
    ones = np.ones(120) if w is None else w
    for label in range(4):
        want = pairwise_auroc(z[:, label], ones * y[:, label], ones * (1 - y[:, label]))
        assert m["auroc"]["per_class"][label] == pytest.approx(want, abs=1e-12)
    assert "warnings" not in m


def test_binary_exact_curves_equal_sklearn() -> None:
    z = tied_logits(90, 3)
    y = (RNG.random((90, 3)) < 0.5).astype(np.float64)
    m = evaluate("binary_cross_entropy", z, y).metrics
    p = 1.0 / (1.0 + np.exp(-z))
    for label in range(3):
        fpr, tpr, thr = roc_curve(y[:, label], z[:, label])
        got = m["roc_curve"][label]
        np.testing.assert_allclose(got["fpr"], fpr, atol=1e-15)
        np.testing.assert_allclose(got["tpr"], tpr, atol=1e-15)
        assert got["thresholds"][0] is None and thr[0] == np.inf
        np.testing.assert_allclose(got["thresholds"][1:], 1 / (1 + np.exp(-thr[1:])), rtol=1e-15)
        precision, recall, pr_thr = precision_recall_curve(y[:, label], p[:, label])
        got = m["pr_curve"][label]
        np.testing.assert_allclose(got["precision"], precision[::-1], atol=1e-15)
        np.testing.assert_allclose(got["recall"], recall[::-1], atol=1e-15)
        assert got["thresholds"][0] is None
        np.testing.assert_allclose(got["thresholds"][1:], pr_thr[::-1], rtol=1e-15)


def test_zero_sample_weights_leave_the_curves_as_if_absent() -> None:
    z = tied_logits(40, 1)
    y = (RNG.random((40, 1)) < 0.5).astype(np.float64)
    w = np.where(RNG.random(40) < 0.3, 0.0, 1.0)
    got = evaluate("binary_cross_entropy", z, y, sample_weight=w).metrics
    keep = w > 0
    want = evaluate("binary_cross_entropy", z[keep], y[keep]).metrics
    assert_nested_close(got, want, rtol=1e-15)


def test_soft_labels_equal_sklearn_on_duplicated_elements() -> None:
    """An element of soft label y weighs s·y as a positive and s·(1 − y) as a negative."""
    z = tied_logits(50, 2)
    y = RNG.random((50, 2))
    y[RNG.random((50, 2)) < 0.3] = 1.0
    w = RNG.uniform(0.5, 2.0, size=50)
    m = evaluate("binary_cross_entropy", z, y, sample_weight=w).metrics
    for label in range(2):
        scores = np.concatenate([z[:, label], z[:, label]])
        truth = np.concatenate([np.ones(50), np.zeros(50)])
        weights = np.concatenate([w * y[:, label], w * (1 - y[:, label])])
        assert m["auroc"]["per_class"][label] == pytest.approx(
            roc_auc_score(truth, scores, sample_weight=weights), abs=1e-12
        )
        assert m["average_precision"]["per_class"][label] == pytest.approx(
            average_precision_score(truth, scores, sample_weight=weights), abs=1e-12
        )


def test_label_without_positives_or_negatives_is_null_with_warnings() -> None:
    z = RNG.standard_normal((30, 4))
    y = (RNG.random((30, 4)) < 0.5).astype(np.float64)
    y[:, 1] = 0.0  # no positives
    y[:, 3] = 1.0  # no negatives
    for m in (
        evaluate("binary_cross_entropy", z, y).metrics,
        evaluate("binary_cross_entropy", z, y).metric_state.compute(),  # type: ignore[union-attr]
    ):
        auroc, ap = m["auroc"], m["average_precision"]
        assert auroc["per_class"][1] is None and auroc["per_class"][3] is None
        assert ap["per_class"][1] is None and ap["per_class"][3] == pytest.approx(1.0)
        assert m["roc_curve"][1] is None and m["roc_curve"][3] is None
        assert m["pr_curve"][1] is None and m["pr_curve"][3] is not None
        defined = [auroc["per_class"][0], auroc["per_class"][2]]
        assert auroc["macro"] == pytest.approx(sum(defined) / 2)  # type: ignore[arg-type]
        assert ap["macro"] == pytest.approx(
            (ap["per_class"][0] + ap["per_class"][2] + ap["per_class"][3]) / 3
        )
        got = {(w["metric"], w["type"]): w["classes"] for w in m["warnings"]}
        assert got == {
            ("auroc", "no_positives"): [1],
            ("auroc", "no_negatives"): [3],
            ("average_precision", "no_positives"): [1],
            ("roc_curve", "no_positives"): [1],
            ("roc_curve", "no_negatives"): [3],
            ("pr_curve", "no_positives"): [1],
        }
        assert all("undefined" in w["msg"] for w in m["warnings"])
        assert list(m)[-1] == "warnings"


@pytest.mark.parametrize("weighted", [False, True])
def test_softmax_one_vs_rest_equals_sklearn(weighted: bool) -> None:
    pool = RNG.standard_normal((12, 5)) * 2
    z = pool[RNG.integers(0, 12, size=150)]  # repeated rows: exact ties between rows
    y = RNG.integers(0, 5, size=150)
    w = RNG.uniform(0.1, 3.0, size=150) if weighted else None
    m = evaluate("cross_entropy", z, y, sample_weight=w).metrics
    p = softmax(z)
    assert m["auroc"]["macro"] == pytest.approx(
        roc_auc_score(y, p, multi_class="ovr", average="macro", sample_weight=w), abs=1e-12
    )
    assert m["average_precision"]["macro"] == pytest.approx(
        average_precision_score(y, p, average="macro", sample_weight=w), abs=1e-12
    )
    for c in range(5):
        hit = (y == c).astype(int)
        assert m["auroc"]["per_class"][c] == pytest.approx(
            roc_auc_score(hit, p[:, c], sample_weight=w), abs=1e-12
        )
        assert m["average_precision"]["per_class"][c] == pytest.approx(
            average_precision_score(hit, p[:, c], sample_weight=w), abs=1e-12
        )
        fpr, tpr, _ = roc_curve(hit, p[:, c], sample_weight=w)
        np.testing.assert_allclose(m["roc_curve"][c]["fpr"], fpr, atol=1e-12)
        np.testing.assert_allclose(m["roc_curve"][c]["tpr"], tpr, atol=1e-12)


def test_softmax_ranks_by_log_probability_where_p_underflows() -> None:
    z = np.zeros((6, 3))
    z[:, 0] = [0.0, 800.0, 900.0, 1000.0, 760.0, 850.0]  # p_1 = p_2 = 0 in float64 below row 0
    z[:, 1] = [0.0, 10.0, 20.0, 30.0, 40.0, 5.0]
    y = np.array([1, 1, 0, 0, 2, 1])
    m = evaluate("cross_entropy", z, y, metrics=["auroc"]).metrics
    log_p = (
        z - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)) - z.max(1)[:, None]
    )
    for c in range(3):
        want = pairwise_auroc(log_p[:, c], (y == c) * 1.0, (y != c) * 1.0)
        assert m["auroc"]["per_class"][c] == pytest.approx(want, abs=1e-12)


def test_probability_inputs_rank_by_p_and_ignore_index_is_not_counted() -> None:
    p = RNG.integers(0, 5, size=(40, 3)) / 4.0
    y = RNG.integers(0, 3, size=40)
    y[::5] = -100
    # per-class scores, not distributions: rows may sum to anything in [0, 3]
    options = {"input_kind": "probabilities", "sum_tolerance": 3.0}
    m = evaluate("cross_entropy", p, y, options=options).metrics
    keep = y != -100
    for c in range(3):
        want = roc_auc_score(y[keep] == c, p[keep, c])
        assert m["auroc"]["per_class"][c] == pytest.approx(want, abs=1e-12)


def test_softmax_class_absent_is_null_and_multi_hot_is_422() -> None:
    z = RNG.standard_normal((20, 4))
    y = RNG.integers(0, 3, size=20)  # class 3 never occurs
    m = evaluate("cross_entropy", z, y, metrics=["auroc"]).metrics
    assert m["auroc"]["per_class"][3] is None
    assert m["warnings"][0]["classes"] == [3]
    with pytest.raises(InputValidationError) as err:
        evaluate("cross_entropy", z, RNG.random((20, 4)) < 0.5, metrics=["nll", "auroc"])
    assert [e.loc for e in err.value.errors] == [("metrics", 1)]


# ---- binned (runs) -------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["binary_cross_entropy", "cross_entropy"])
def test_binned_equals_exact_on_scores_quantised_to_the_bin_edges(loss: str) -> None:
    n_thr = 11
    edges = np.linspace(0.0, 1.0, n_thr)
    p = edges[RNG.integers(0, n_thr, size=(200, 3))]
    w = RNG.uniform(0.5, 2.0, size=200)
    if loss == "binary_cross_entropy":
        y: np.ndarray = (RNG.random((200, 3)) < 0.4).astype(np.float64)
    else:
        y = RNG.integers(0, 3, size=200)
    res = evaluate(
        loss,
        p,
        y,
        sample_weight=w,
        # per-class scores on the bin edges, not distributions (rows sum to anything in [0, 3])
        options={"input_kind": "probabilities", "n_thresholds": n_thr, "sum_tolerance": 3.0},
    )
    assert res.metric_state is not None
    binned = res.metric_state.compute()
    assert_nested_close(binned, res.metrics, rtol=1e-12)


def test_binned_auroc_within_1e_3_and_the_bound_on_100k_random_scores() -> None:
    n = 100_000
    z = RNG.standard_normal((n, 2)) * 1.5
    y = (RNG.random((n, 2)) < 1 / (1 + np.exp(-z))).astype(np.float64)  # informative scores
    res = evaluate("binary_cross_entropy", z, y, metrics=["auroc", "average_precision"])
    assert res.metric_state is not None
    binned = res.metric_state.compute()
    bound = ranking.binned_bound(
        res.metric_state.stats["rank_pos"], res.metric_state.stats["rank_neg"]
    )
    for label in range(2):
        exact = res.metrics["auroc"]["per_class"][label]
        approx = binned["auroc"]["per_class"][label]
        assert abs(approx - exact) <= 1e-3
        assert abs(approx - exact) <= bound[label]  # type: ignore[operator]
        ap_gap = (
            binned["average_precision"]["per_class"][label]
            - res.metrics["average_precision"]["per_class"][label]
        )
        assert abs(ap_gap) <= 1e-3
    assert 0.7 < res.metrics["auroc"]["macro"] < 0.9


def test_binned_histogram_counts_by_hand() -> None:
    p = np.array([[0.0], [0.24], [0.25], [0.5], [0.99], [1.0]])
    y = np.array([[1.0], [0.0], [1.0], [0.0], [1.0], [0.5]])
    res = evaluate(
        "binary_cross_entropy",
        p,
        y,
        metrics=["auroc"],
        options={"input_kind": "probabilities", "n_thresholds": 5},
    )
    assert res.metric_state is not None
    # bins j = max{j : t_j ≤ p} on t = 0, .25, .5, .75, 1
    np.testing.assert_array_equal(res.metric_state.stats["rank_pos"], [[1, 1, 0, 1, 0.5]])
    np.testing.assert_array_equal(res.metric_state.stats["rank_neg"], [[1, 0, 1, 0, 0.5]])
    # binned pairs: a tie within a bin counts ½
    pos = np.array([1, 1, 0, 1, 0.5])
    neg = np.array([1, 0, 1, 0, 0.5])
    above = sum(pos[i] * neg[j] for i in range(5) for j in range(i))
    tied = sum(pos[i] * neg[i] for i in range(5))
    want = (above + tied / 2) / (pos.sum() * neg.sum())
    assert res.metric_state.compute()["auroc"]["per_class"][0] == pytest.approx(want)
    assert math.isclose(
        res.metrics["auroc"]["macro"], pairwise_auroc(p[:, 0], y[:, 0], 1 - y[:, 0])
    )


def test_histogram_limit_applies_to_ranking_states_only() -> None:
    """A 1100-class confusion state (no ranking metric) loads whatever n_thresholds says."""
    z = RNG.standard_normal((50, 1100))
    y = RNG.integers(0, 1100, size=50)
    options = {"max_confusion_classes": 1100}
    state = evaluate(
        "cross_entropy", z, y, metrics=["confusion_matrix"], options=options
    ).metric_state
    assert state is not None
    data = state.to_dict()
    assert data["num_classes"] * data["n_thresholds"] > ranking.MAX_RANKING_CELLS
    back = MetricState.from_dict(json.loads(json.dumps(data)))
    assert back.compute() == state.compute()
    legacy = {k: v for k, v in data.items() if k not in ("family", "n_thresholds", "threshold")}
    assert MetricState.from_dict(legacy).compute() == state.compute()  # written before them
    with pytest.raises(InputValidationError, match="n_thresholds"):
        evaluate("cross_entropy", z, y, metrics=["auroc"])


@pytest.mark.parametrize("n", [2, 3, 11, 16, 1000, 4097])
@pytest.mark.parametrize("side", ["left", "right"])
def test_uniform_searchsorted_equals_the_binary_search(n: int, side: str) -> None:
    from ce_engine.metrics.bins import uniform_searchsorted

    edges = np.linspace(0.0, 1.0, n)
    x = np.concatenate(
        [
            RNG.random(20_000),
            edges,
            np.nextafter(edges, 2.0),
            np.nextafter(edges, -1.0),
            np.arange(n) / (n - 1),  # j/(n − 1), which may differ from edges[j] by an ulp
            [0.0, 1.0],
        ]
    )
    x = np.clip(x, 0.0, 1.0)
    want = np.searchsorted(edges, x, side=side)  # type: ignore[call-overload]
    np.testing.assert_array_equal(uniform_searchsorted(np, edges, x, side), want)  # type: ignore[arg-type]
