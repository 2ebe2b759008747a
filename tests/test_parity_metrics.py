"""Parity of the metrics with torchmetrics and torcheval (optional: `make parity`).

Binned ranking metrics (a run's state) against torchmetrics ``thresholds=T`` and torcheval
``BinaryBinnedAUROC`` / ``BinaryBinnedAUPRC(threshold=T)``; exact ones against torchmetrics
without thresholds and torcheval ``BinaryAUROC`` / ``BinaryAUPRC`` / ``Multi*AUPRC``; ROC and
PR curve points at the same thresholds; weighted tied AUROC, ``ignore_index`` and spatial
labels; threshold metrics (precision, recall, F1 and its
averages, exact match, confusion matrices, top-k accuracy), calibration, perplexity and the
log losses where the definitions match. torchmetrics returns float32, hence the 1e-7 to 1e-6
tolerances.

Where a peer's definition differs, the test compares what matches and says how they differ
(README, "Metrics"):

- torcheval predicts positive where p ≥ threshold; ce-eval (sklearn, torchmetrics) where
  p > threshold: they agree once torcheval's threshold is the next float above ours;
- a label without positives (AUROC and AP) or without negatives (AUROC) is ``null`` here and
  left out of ``macro``; torchmetrics scores it 0 (one-vs-rest AP: NaN) and averages the 0 in,
  torcheval's ``BinaryAUROC`` scores it 0.5;
- torcheval 0.0.7 ``MulticlassBinnedAUROC(average=None)`` sums over the class axis before the
  ROC (its value is per threshold-crossing sample, not one-vs-rest per class), so the binned
  one-vs-rest values are compared with ``BinaryBinnedAUROC`` on each class column instead;
- torchmetrics and sklearn ``roc_curve`` keep every threshold, ce-eval thins collinear
  points as sklearn's ``drop_intermediate=True``: the points we keep equal theirs at the same
  thresholds.
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


# ---- threshold metrics ---------------------------------------------------------------------


def rare_and_absent_labels() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(logits, σ, labels) with ties at p = 0.5, a label never positive nor predicted (the
    zero_division paths) and a rare one."""
    z, _, y = labelled(labels=4)
    y[:, 2], z[:, 2] = 0.0, -5.0 + RNG.standard_normal(N)
    y[:, 3] = (RNG.random(N) < 0.02).astype(np.float64)
    return z, 1 / (1 + np.exp(-z)), y


def test_multilabel_threshold_metrics_equal_torchmetrics() -> None:
    z, p, y = rare_and_absent_labels()
    names = ["precision", "recall", "f1", "macro_f1", "micro_f1", "weighted_f1"]
    names += ["subset_accuracy", "confusion_matrix"]
    m = ce_engine.evaluate("binary_cross_entropy", z, y, metrics=names).metrics
    preds, target = torch.tensor(p), torch.tensor(y).long()
    labels = y.shape[1]
    peers = {
        "precision": classification.MultilabelPrecision(labels, average=None),
        "recall": classification.MultilabelRecall(labels, average=None),
        "f1": classification.MultilabelF1Score(labels, average=None),
        **{
            f"{avg}_f1": classification.MultilabelF1Score(labels, average=avg)
            for avg in ("macro", "micro", "weighted")
        },
        "subset_accuracy": classification.MultilabelExactMatch(labels),
    }
    for name, peer in peers.items():
        np.testing.assert_allclose(m[name], peer(preds, target).numpy(), atol=2e-7, err_msg=name)
    confusion = classification.MultilabelConfusionMatrix(labels)(preds, target).numpy()
    np.testing.assert_array_equal(m["confusion_matrix"], confusion)
    assert m["f1"][2] == 0.0  # zero_division=0 on both sides


def test_multiclass_threshold_metrics_equal_torchmetrics() -> None:
    """Softmax: argmax predictions, a class never predicted nor a target (left out of macro by
    both, as sklearn's labels present), top-k from the probabilities."""
    classes = 6
    z = RNG.standard_normal((N, classes)) * 2
    z[:, -1] = -30.0
    y = RNG.integers(0, classes - 1, size=N)
    names = ["accuracy", "top_k_accuracy", "precision", "recall", "f1", "macro_f1"]
    names += ["micro_f1", "weighted_f1", "confusion_matrix"]
    m = ce_engine.evaluate("cross_entropy", z, y, metrics=names, options={"top_k": [2, 3]}).metrics
    probs = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    preds, target = torch.tensor(probs), torch.tensor(y)
    peers = {
        "accuracy": classification.MulticlassAccuracy(classes, average="micro"),
        "precision": classification.MulticlassPrecision(classes, average=None),
        "recall": classification.MulticlassRecall(classes, average=None),
        "f1": classification.MulticlassF1Score(classes, average=None),
        **{
            f"{avg}_f1": classification.MulticlassF1Score(classes, average=avg)
            for avg in ("macro", "micro", "weighted")
        },
    }
    for name, peer in peers.items():
        np.testing.assert_allclose(m[name], peer(preds, target).numpy(), atol=2e-7, err_msg=name)
    for k in (2, 3):
        peer = classification.MulticlassAccuracy(classes, average="micro", top_k=k)
        assert m["top_k_accuracy"][str(k)] == pytest.approx(float(peer(preds, target)), abs=2e-7)
        top_k = torcheval_metrics.MulticlassAccuracy(k=k)
        top_k.update(preds, target)
        assert m["top_k_accuracy"][str(k)] == pytest.approx(float(top_k.compute()), abs=2e-7)
    confusion = classification.MulticlassConfusionMatrix(classes)(preds, target).numpy()
    np.testing.assert_array_equal(m["confusion_matrix"], confusion)
    for avg in ("macro", "weighted"):
        f1 = torcheval_metrics.MulticlassF1Score(num_classes=classes, average=avg)
        f1.update(preds, target)
        assert m[f"{avg}_f1"] == pytest.approx(float(f1.compute()), abs=2e-7)


def test_torcheval_counts_a_score_on_the_threshold_as_positive() -> None:
    """torcheval predicts p ≥ threshold, ce-eval p > threshold: equal at the next float up.
    The first 20 rows lie on the threshold with every label positive, so at 0.5 torcheval
    counts their 60 elements (20 rows) right where ce-eval counts them wrong."""
    z, p, y = labelled()
    y[:20] = 1.0
    m = ce_engine.evaluate(
        "binary_cross_entropy", z, y, metrics=["accuracy", "subset_accuracy"]
    ).metrics
    preds, target = torch.tensor(p), torch.tensor(y).long()
    above = float(np.nextafter(0.5, 1.0))
    for name, criteria, gap in (
        ("accuracy", "hamming", 20 * L / (N * L)),
        ("subset_accuracy", "exact_match", 20 / N),
    ):
        shifted = torcheval_metrics.MultilabelAccuracy(threshold=above, criteria=criteria)
        shifted.update(preds, target)
        assert m[name] == pytest.approx(float(shifted.compute()), abs=2e-7)
        at_threshold = torcheval_metrics.MultilabelAccuracy(threshold=0.5, criteria=criteria)
        at_threshold.update(preds, target)
        assert float(at_threshold.compute()) - m[name] == pytest.approx(gap, abs=2e-7)


# ---- ranking metrics -----------------------------------------------------------------------


def test_exact_ranking_equals_torcheval() -> None:
    z, p, y = labelled()
    m = ce_engine.evaluate("binary_cross_entropy", z, y, metrics=["auroc", "average_precision"])
    preds, target = torch.tensor(p), torch.tensor(y).long()
    for label in range(L):
        auroc = torcheval_metrics.BinaryAUROC()
        auroc.update(preds[:, label], target[:, label])
        assert m.metrics["auroc"]["per_class"][label] == pytest.approx(
            float(auroc.compute()), abs=1e-12
        )
    auprc = torcheval_metrics.MultilabelAUPRC(num_labels=L, average=None)
    auprc.update(preds, target)
    np.testing.assert_allclose(
        m.metrics["average_precision"]["per_class"], auprc.compute().numpy(), atol=2e-7
    )


def test_weighted_exact_auroc_with_ties_equals_torcheval() -> None:
    """``sample_weight`` on logits with many ties: torcheval ``BinaryAUROC(weight=…)``."""
    z = RNG.integers(-4, 5, size=(N, L)) / 2.0
    y = (RNG.random((N, L)) < 0.4).astype(np.float64)
    w = RNG.uniform(0.1, 3.0, size=N)
    m = ce_engine.evaluate("binary_cross_entropy", z, y, metrics=["auroc"], sample_weight=w)
    for label in range(L):
        auroc = torcheval_metrics.BinaryAUROC()
        auroc.update(torch.tensor(z[:, label]), torch.tensor(y[:, label]), weight=torch.tensor(w))
        assert m.metrics["auroc"]["per_class"][label] == pytest.approx(
            float(auroc.compute()), abs=1e-12
        )


def softmax_batch(classes: int = 5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(logits, probabilities, class ids drawn from them)."""
    z = RNG.standard_normal((N, classes)) * 2
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    return z, p, np.array([RNG.choice(classes, p=row) for row in p])


def test_softmax_exact_one_vs_rest_equals_torchmetrics_and_torcheval() -> None:
    z, p, y = softmax_batch()
    m = ce_engine.evaluate("cross_entropy", z, y, metrics=["auroc", "average_precision"]).metrics
    preds, target = torch.tensor(p), torch.tensor(y)
    for name, tm_peer, te_peer in (
        ("auroc", classification.MulticlassAUROC, torcheval_metrics.MulticlassAUROC),
        (
            "average_precision",
            classification.MulticlassAveragePrecision,
            torcheval_metrics.MulticlassAUPRC,
        ),
    ):
        per_class = tm_peer(5, average=None)(preds, target).numpy()
        np.testing.assert_allclose(m[name]["per_class"], per_class, atol=2e-7, err_msg=name)
        macro = float(tm_peer(5, average="macro")(preds, target))
        assert m[name]["macro"] == pytest.approx(macro, abs=2e-7), name
        metric = te_peer(num_classes=5, average=None)
        metric.update(preds, target)
        np.testing.assert_allclose(
            m[name]["per_class"], metric.compute().numpy(), atol=2e-7, err_msg=name
        )


def test_binned_ap_and_softmax_binned_ranking_equal_torcheval_binary_binned() -> None:
    """Binary: ``BinaryBinnedAUPRC`` per label and ``MultilabelBinnedAUPRC``; softmax one-vs-rest:
    ``BinaryBinnedAUROC`` / ``BinaryBinnedAUPRC`` on each class column (module docstring)."""
    n_thresholds = 200
    edges = torch.tensor(np.linspace(0.0, 1.0, n_thresholds))
    z, p, y = labelled()
    state = ce_engine.evaluate(
        "binary_cross_entropy",
        z,
        y,
        metrics=["average_precision"],
        options={"n_thresholds": n_thresholds},
    ).metric_state
    assert state is not None
    binned = state.compute()["average_precision"]["per_class"]
    preds, target = torch.tensor(p), torch.tensor(y).long()
    for label in range(L):
        ap = torcheval_metrics.BinaryBinnedAUPRC(threshold=edges)
        ap.update(preds[:, label], target[:, label])
        assert binned[label] == pytest.approx(float(ap.compute()), abs=2e-7)
    multilabel = torcheval_metrics.MultilabelBinnedAUPRC(
        num_labels=L, threshold=edges, average=None
    )
    multilabel.update(preds, target)
    np.testing.assert_allclose(binned, multilabel.compute().numpy(), atol=2e-7)

    zs, ps, ys = softmax_batch()
    state = ce_engine.evaluate(
        "cross_entropy",
        zs,
        ys,
        metrics=["auroc", "average_precision"],
        options={"n_thresholds": n_thresholds},
    ).metric_state
    assert state is not None
    ovr = state.compute()
    for c in range(5):
        column, hit = torch.tensor(ps[:, c]), torch.tensor((ys == c).astype(np.int64))
        auroc = torcheval_metrics.BinaryBinnedAUROC(threshold=edges)
        auroc.update(column, hit)
        assert ovr["auroc"]["per_class"][c] == pytest.approx(float(auroc.compute()[0]), abs=1e-9)
        ap = torcheval_metrics.BinaryBinnedAUPRC(threshold=edges)
        ap.update(column, hit)
        assert ovr["average_precision"]["per_class"][c] == pytest.approx(
            float(ap.compute()), abs=2e-7
        )


def at_thresholds(theirs: np.ndarray, want: list[float | None]) -> np.ndarray:
    """Indices into ``theirs`` of the thresholds ``want`` (None: the origin, skipped); each must
    be present (torchmetrics keeps float32-rounded thresholds, hence the 1e-7)."""
    index = []
    for t in want[1:]:
        assert t is not None
        i = int(np.argmin(np.abs(theirs - t)))
        assert abs(theirs[i] - t) < 1e-7, t
        index.append(i)
    return np.array(index)


@pytest.mark.parametrize("n_thresholds", [None, 50])
def test_curves_equal_torchmetrics_at_the_same_thresholds(n_thresholds: int | None) -> None:
    """Exact (stateless) and binned (a run's state) ROC and PR curves: every point ce-eval
    reports equals torchmetrics' point at that threshold (it keeps all, we thin the ROC)."""
    z, p, y = labelled()
    names = ["roc_curve", "pr_curve"]
    if n_thresholds is None:
        m = ce_engine.evaluate("binary_cross_entropy", z, y, metrics=names).metrics
        edges = None
    else:
        state = ce_engine.evaluate(
            "binary_cross_entropy", z, y, metrics=names, options={"n_thresholds": n_thresholds}
        ).metric_state
        assert state is not None
        m = state.compute()
        edges = torch.tensor(np.linspace(0.0, 1.0, n_thresholds))
    preds, target = torch.tensor(p), torch.tensor(y).long()
    fpr, tpr, roc_thr = classification.MultilabelROC(L, thresholds=edges)(preds, target)
    precision, recall, pr_thr = classification.MultilabelPrecisionRecallCurve(L, thresholds=edges)(
        preds, target
    )
    for label in range(L):
        label_thr = roc_thr if edges is not None else roc_thr[label]
        roc = m["roc_curve"][label]
        i = at_thresholds(label_thr.numpy(), roc["thresholds"])
        np.testing.assert_allclose(roc["fpr"][1:], fpr[label].numpy()[i], atol=1e-7)
        np.testing.assert_allclose(roc["tpr"][1:], tpr[label].numpy()[i], atol=1e-7)
        label_thr = pr_thr if edges is not None else pr_thr[label]
        pr = m["pr_curve"][label]
        i = at_thresholds(label_thr.numpy(), pr["thresholds"])
        np.testing.assert_allclose(pr["precision"][1:], precision[label].numpy()[i], atol=1e-7)
        np.testing.assert_allclose(pr["recall"][1:], recall[label].numpy()[i], atol=1e-7)


def test_undefined_labels_are_null_here_and_zero_in_torchmetrics() -> None:
    """No positives (AUROC, AP) or no negatives (AUROC): null and out of ``macro`` here;
    torchmetrics gives 0 and averages it in, torcheval ``BinaryAUROC`` gives 0.5."""
    z, p, y = labelled(labels=4)
    y[:, 1] = 0.0
    y[:, 3] = 1.0
    m = ce_engine.evaluate(
        "binary_cross_entropy", z, y, metrics=["auroc", "average_precision"]
    ).metrics
    preds, target = torch.tensor(p), torch.tensor(y).long()
    auroc = classification.MultilabelAUROC(4, average=None)(preds, target).numpy()
    ap = classification.MultilabelAveragePrecision(4, average=None)(preds, target).numpy()
    assert m["auroc"]["per_class"][1] is None and m["auroc"]["per_class"][3] is None
    assert auroc[1] == 0.0 and auroc[3] == 0.0
    assert m["average_precision"]["per_class"][1] is None and ap[1] == 0.0
    for label in (0, 2):
        assert m["auroc"]["per_class"][label] == pytest.approx(float(auroc[label]), abs=1e-7)
    assert m["auroc"]["macro"] == pytest.approx(float(auroc[[0, 2]].mean()), abs=1e-7)
    assert m["average_precision"]["macro"] == pytest.approx(float(ap[[0, 2, 3]].mean()), abs=2e-7)
    no_positives = torcheval_metrics.BinaryAUROC()
    no_positives.update(preds[:, 1], target[:, 1])
    assert float(no_positives.compute()) == 0.5


# ---- log losses and linear_cross_entropy ---------------------------------------------------


def test_nll_is_the_mean_log_loss_of_torch() -> None:
    """Binary (and sigmoid focal) ``nll`` = mean ``binary_cross_entropy_with_logits`` over the
    elements; softmax ``nll`` = mean ``cross_entropy``."""
    F = torch.nn.functional
    z, _, y = labelled()
    want = float(F.binary_cross_entropy_with_logits(torch.tensor(z), torch.tensor(y)))
    for loss in ("binary_cross_entropy", "focal"):
        nll = ce_engine.evaluate(loss, z, y, metrics=["nll"]).metrics["nll"]
        assert nll == pytest.approx(want, rel=1e-12), loss
    zs, _, ys = softmax_batch()
    nll = ce_engine.evaluate("cross_entropy", zs, ys, metrics=["nll"]).metrics["nll"]
    assert nll == pytest.approx(float(F.cross_entropy(torch.tensor(zs), torch.tensor(ys))))


def test_linear_cross_entropy_metrics_equal_the_peers_on_the_full_logits() -> None:
    """The chunked metrics against torch / torchmetrics / torcheval on X Wᵀ + b materialised."""
    x, w, b = RNG.standard_normal((400, 16)), RNG.standard_normal((30, 16)), RNG.standard_normal(30)
    logits = torch.tensor(x @ w.T + b)
    y = torch.distributions.Categorical(logits=logits).sample().numpy()
    m = ce_engine.evaluate(
        "linear_cross_entropy",
        None,
        y,
        features=x,
        weight=w,
        bias=b,
        metrics=["accuracy", "top_k_accuracy", "nll", "perplexity", "entropy", "ece"],
        options={"top_k": [5], "chunk_elements": 997},
    ).metrics
    probs, target = torch.softmax(logits, dim=-1), torch.tensor(y)
    accuracy = classification.MulticlassAccuracy(30, average="micro")(probs, target)
    top5 = classification.MulticlassAccuracy(30, average="micro", top_k=5)(probs, target)
    ece = classification.MulticlassCalibrationError(30, n_bins=15, norm="l1")(probs, target)
    assert m["accuracy"] == pytest.approx(float(accuracy), abs=2e-7)
    assert m["top_k_accuracy"]["5"] == pytest.approx(float(top5), abs=2e-7)
    assert m["ece"] == pytest.approx(float(ece), abs=1e-6)
    nll = float(torch.nn.functional.cross_entropy(logits, target))
    assert m["nll"] == pytest.approx(nll, rel=1e-12)
    perplexity = torcheval_metrics.Perplexity()
    perplexity.update(logits[None], target[None])
    assert m["perplexity"] == pytest.approx(float(perplexity.compute()), rel=1e-12)
    entropy = torch.distributions.Categorical(logits=logits).entropy().mean()
    assert m["entropy"] == pytest.approx(float(entropy), rel=1e-12)


def test_ignore_index_and_spatial_labels_equal_torchmetrics() -> None:
    """Softmax ``ignore_index`` (torchmetrics ``ignore_index=-100``), exact and binned; binary
    logits (N, d, L) against torchmetrics' (N, L, d) layout, extra axes pooled."""
    z, _, y = softmax_batch(4)
    y[::7] = -100
    res = ce_engine.evaluate(
        "cross_entropy",
        z,
        y,
        metrics=["accuracy", "macro_f1", "auroc", "ece"],
        options={"n_thresholds": 100},
    )
    assert res.metric_state is not None
    binned = res.metric_state.compute()
    preds, target = torch.softmax(torch.tensor(z), -1), torch.tensor(y)
    keep = {"ignore_index": -100}
    peers = {
        "accuracy": classification.MulticlassAccuracy(4, average="micro", **keep),
        "macro_f1": classification.MulticlassF1Score(4, average="macro", **keep),
        "ece": classification.MulticlassCalibrationError(4, n_bins=15, **keep),
    }
    for name, peer in peers.items():
        assert res.metrics[name] == pytest.approx(float(peer(preds, target)), abs=1e-6), name
    exact = classification.MulticlassAUROC(4, average=None, **keep)(preds, target)
    np.testing.assert_allclose(res.metrics["auroc"]["per_class"], exact.numpy(), atol=2e-7)
    peer = classification.MulticlassAUROC(4, average=None, thresholds=100, **keep)
    np.testing.assert_allclose(binned["auroc"]["per_class"], peer(preds, target).numpy(), atol=2e-7)

    z3 = RNG.standard_normal((40, 5, L)) * 2
    y3 = (RNG.random((40, 5, L)) < 1 / (1 + np.exp(-z3))).astype(np.float64)
    m = ce_engine.evaluate("binary_cross_entropy", z3, y3, metrics=["auroc", "macro_f1"]).metrics
    preds = torch.sigmoid(torch.tensor(z3)).permute(0, 2, 1)
    target = torch.tensor(y3).long().permute(0, 2, 1)
    auroc = classification.MultilabelAUROC(L, average=None)(preds, target)
    np.testing.assert_allclose(m["auroc"]["per_class"], auroc.numpy(), atol=2e-7)
    f1 = classification.MultilabelF1Score(L, average="macro")(preds, target)
    assert m["macro_f1"] == pytest.approx(float(f1), abs=2e-7)
