"""Parity of the metrics with torchmetrics and torcheval (optional: `make parity`).

Binned ranking metrics (a run's state) against torchmetrics ``thresholds=T`` and torcheval
``BinaryBinnedAUROC(threshold=T)``; exact ones against torchmetrics without thresholds;
calibration, multi-label accuracy and perplexity where the definitions match. torchmetrics
returns float32, hence the 1e-7 to 1e-6 tolerances.
"""

from __future__ import annotations

import numpy as np
import pytest

import ce_engine

torch = pytest.importorskip("torch")
classification = pytest.importorskip("torchmetrics.classification")
text = pytest.importorskip("torchmetrics.text")
torcheval_metrics = pytest.importorskip("torcheval.metrics")

pytestmark = [
    pytest.mark.parity,
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]
RNG = np.random.default_rng(31)
N, L = 3000, 3


def labelled(n: int = N, labels: int = L) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(logits, σ(logits), labels drawn from σ(logits)): informative, with ties at p = 0.5."""
    z = RNG.standard_normal((n, labels)) * 2
    z[:20] = 0.0
    p = 1 / (1 + np.exp(-z))
    return z, p, (RNG.random((n, labels)) < p).astype(np.float64)


@pytest.mark.parametrize("n_thresholds", [5, 11, 200, 1000])
def test_binned_ranking_equals_torchmetrics_and_torcheval(n_thresholds: int) -> None:
    z, p, y = labelled()
    res = ce_engine.evaluate(
        "binary_cross_entropy",
        z,
        y,
        metrics=["auroc", "average_precision"],
        options={"n_thresholds": n_thresholds},
    )
    assert res.metric_state is not None
    binned = res.metric_state.compute()
    preds, target = torch.tensor(p), torch.tensor(y).long()
    edges = torch.tensor(np.linspace(0.0, 1.0, n_thresholds))  # float64 (int: float32 edges)
    auroc = classification.MultilabelAUROC(L, average=None, thresholds=edges)
    ap = classification.MultilabelAveragePrecision(L, average=None, thresholds=edges)
    np.testing.assert_allclose(
        binned["auroc"]["per_class"], auroc(preds, target).numpy(), atol=2e-7
    )
    np.testing.assert_allclose(
        binned["average_precision"]["per_class"], ap(preds, target).numpy(), atol=2e-7
    )
    for label in range(L):
        metric = torcheval_metrics.BinaryBinnedAUROC(threshold=edges)
        metric.update(preds[:, label], target[:, label].double())
        value = metric.compute()[0]
        assert binned["auroc"]["per_class"][label] == pytest.approx(float(value), abs=1e-9)


def test_exact_ranking_equals_torchmetrics_without_thresholds() -> None:
    z, p, y = labelled()
    m = ce_engine.evaluate("binary_cross_entropy", z, y, metrics=["auroc", "average_precision"])
    preds, target = torch.tensor(p), torch.tensor(y).long()
    auroc = classification.MultilabelAUROC(L, average=None)(preds, target).numpy()
    ap = classification.MultilabelAveragePrecision(L, average=None)(preds, target).numpy()
    np.testing.assert_allclose(m.metrics["auroc"]["per_class"], auroc, atol=1e-6)
    np.testing.assert_allclose(m.metrics["average_precision"]["per_class"], ap, atol=1e-6)


def test_softmax_one_vs_rest_binned_equals_torchmetrics_multiclass() -> None:
    z = RNG.standard_normal((N, 4)) * 2
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    y = np.array([RNG.choice(4, p=row) for row in p])
    res = ce_engine.evaluate(
        "cross_entropy", z, y, metrics=["auroc", "average_precision"], options={"n_thresholds": 100}
    )
    assert res.metric_state is not None
    binned = res.metric_state.compute()
    preds, target = torch.tensor(p), torch.tensor(y)
    auroc = classification.MulticlassAUROC(4, average=None, thresholds=100)(preds, target)
    ap = classification.MulticlassAveragePrecision(4, average=None, thresholds=100)(preds, target)
    np.testing.assert_allclose(binned["auroc"]["per_class"], auroc.numpy(), atol=1e-6)
    np.testing.assert_allclose(binned["average_precision"]["per_class"], ap.numpy(), atol=1e-6)


@pytest.mark.parametrize("norm", ["l1", "max"])
def test_calibration_equals_torchmetrics(norm: str) -> None:
    z, p, y = labelled()
    name = "ece" if norm == "l1" else "mce"
    binary = ce_engine.evaluate("binary_cross_entropy", z, y, metrics=[name]).metrics[name]
    want = classification.BinaryCalibrationError(n_bins=15, norm=norm)(
        torch.tensor(p.ravel()), torch.tensor(y.ravel()).long()
    )
    assert binary == pytest.approx(float(want), abs=1e-6)
    logits = RNG.standard_normal((N, 5)) * 2
    classes = RNG.integers(0, 5, size=N)
    softmax = ce_engine.evaluate("cross_entropy", logits, classes, metrics=[name]).metrics[name]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    want = classification.MulticlassCalibrationError(5, n_bins=15, norm=norm)(
        torch.tensor(probs), torch.tensor(classes)
    )
    assert softmax == pytest.approx(float(want), abs=1e-6)


def test_multilabel_accuracy_and_perplexity_equal_torchmetrics() -> None:
    z, p, y = labelled()
    m = ce_engine.evaluate("binary_cross_entropy", z, y, metrics=["accuracy", "hamming_loss"])
    accuracy = classification.MultilabelAccuracy(L, average="micro")
    hamming = classification.MultilabelHammingDistance(L, average="micro")
    preds, target = torch.tensor(p), torch.tensor(y).long()
    assert m.metrics["accuracy"] == pytest.approx(float(accuracy(preds, target)), abs=1e-6)
    assert m.metrics["hamming_loss"] == pytest.approx(float(hamming(preds, target)), abs=1e-6)
    logits = RNG.standard_normal((8, 50, 30))
    tokens = RNG.integers(0, 30, size=(8, 50))
    ours = ce_engine.evaluate("cross_entropy", logits, tokens, metrics=["perplexity"])
    want = text.Perplexity()(torch.tensor(logits), torch.tensor(tokens))
    assert ours.metrics["perplexity"] == pytest.approx(float(want), rel=1e-6)
