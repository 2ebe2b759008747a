"""Parity with PyTorch as a reference implementation (optional: `make parity`)."""

from __future__ import annotations

import math

import numpy as np
import pytest

import ce_engine

torch = pytest.importorskip("torch")
F = torch.nn.functional

pytestmark = pytest.mark.parity

RNG = np.random.default_rng(2024)


def grad_of(loss_fn, z: np.ndarray) -> tuple[float, np.ndarray]:
    t = torch.tensor(z, dtype=torch.float64, requires_grad=True)
    value = loss_fn(t)
    value.backward()
    return float(value.detach()), t.grad.numpy()


@pytest.mark.parametrize(
    "opts",
    [
        {},
        {"weight": [0.5, 1.0, 2.0, 0.1, 3.0]},
        {"ignore_index": 3},
        {"label_smoothing": 0.15},
        {"weight": [0.5, 1.0, 2.0, 0.1, 3.0], "ignore_index": 1, "label_smoothing": 0.2},
    ],
)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy(opts, reduction):
    z = RNG.standard_normal((16, 5)) * 3
    y = RNG.integers(0, 5, size=16)
    y[[2, 7]] = opts.get("ignore_index", -100)
    res = ce_engine.evaluate(
        "cross_entropy",
        z,
        y,
        options={**opts, "reduction": reduction},
        outputs=["grad", "per_sample"],
    )
    kw = {
        "weight": torch.tensor(opts["weight"], dtype=torch.float64) if "weight" in opts else None,
        "ignore_index": opts.get("ignore_index", -100),
        "label_smoothing": opts.get("label_smoothing", 0.0),
    }
    target = torch.tensor(y)
    per = F.cross_entropy(torch.tensor(z), target, reduction="none", **kw).numpy()
    np.testing.assert_allclose(res.outputs["per_sample"], per, rtol=1e-12, atol=1e-15)
    red = "sum" if reduction == "none" else reduction
    value, grad = grad_of(lambda t: F.cross_entropy(t, target, reduction=red, **kw), z)
    if reduction != "none":
        assert res.value == pytest.approx(value, rel=1e-12)
    np.testing.assert_allclose(res.outputs["grad"], grad, rtol=1e-10, atol=1e-15)


def test_cross_entropy_probability_targets_and_spatial_float32():
    z = RNG.standard_normal((3, 5, 4, 2)).astype(np.float32)
    raw = RNG.random((3, 5, 4, 2))
    q = (raw / raw.sum(axis=1, keepdims=True)).astype(np.float32)
    res = ce_engine.evaluate(
        "cross_entropy", z, q, options={"class_axis": 1, "label_smoothing": 0.1}
    )
    expected = F.cross_entropy(torch.tensor(z), torch.tensor(q), label_smoothing=0.1)
    assert res.value == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize(
    "opts",
    [
        {},
        {"pos_weight": [0.5, 2.0, 3.0, 1.0]},
        {"pos_weight": [0.5, 2.0, 3.0, 1.0], "weight": [1.0, 0.2, 2.0, 1.0]},
    ],
)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_binary_cross_entropy_with_logits(opts, reduction):
    z = RNG.standard_normal((8, 4)) * 4
    y = (RNG.random((8, 4)) > 0.4).astype(np.float64)
    y[0, 0] = 0.25
    res = ce_engine.evaluate(
        "binary_cross_entropy",
        z,
        y,
        options={**opts, "reduction": reduction},
        outputs=["grad"],
    )
    kw = {
        k: torch.tensor(opts[k], dtype=torch.float64) for k in ("pos_weight", "weight") if k in opts
    }
    target = torch.tensor(y)
    value, grad = grad_of(
        lambda t: F.binary_cross_entropy_with_logits(t, target, reduction=reduction, **kw), z
    )
    assert res.value == pytest.approx(value, rel=1e-12)
    np.testing.assert_allclose(res.outputs["grad"], grad, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("target_kind", ["probabilities", "log_probabilities"])
@pytest.mark.parametrize("reduction", ["batchmean", "sum"])
def test_kl_div(target_kind, reduction):
    z = RNG.standard_normal((6, 5))
    raw = RNG.random((6, 5))
    raw[0, 2] = 0.0
    q = raw / raw.sum(axis=1, keepdims=True)
    target = q if target_kind == "probabilities" else np.log(q + 1e-3)
    res = ce_engine.evaluate(
        "kl_divergence",
        z,
        target,
        options={"target_kind": target_kind, "reduction": reduction},
        outputs=["grad"],
    )
    tt = torch.tensor(target)
    value, grad = grad_of(
        lambda t: F.kl_div(
            F.log_softmax(t, dim=-1),
            tt,
            reduction=reduction,
            log_target=target_kind == "log_probabilities",
        ),
        z,
    )
    assert res.value == pytest.approx(value, rel=1e-12)
    np.testing.assert_allclose(res.outputs["grad"], grad, rtol=1e-10, atol=1e-15)


def torchvision_sigmoid_focal_loss(inputs, targets, alpha: float = 0.25, gamma: float = 2.0):
    """torchvision.ops.sigmoid_focal_loss (v0.20), written out, reduction 'none'."""
    p = torch.sigmoid(inputs)
    ce_loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce_loss * ((1 - p_t) ** gamma)
    if alpha >= 0:
        alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
        loss = alpha_t * loss
    return loss


@pytest.mark.parametrize(("alpha", "gamma"), [(0.25, 2.0), (-1.0, 1.0), (0.7, 0.5), (0.5, 0.0)])
def test_sigmoid_focal_loss(alpha, gamma):
    z = RNG.standard_normal((10, 3)) * 3
    y = (RNG.random((10, 3)) > 0.5).astype(np.float64)
    options = {"alpha": alpha if alpha >= 0 else None, "gamma": gamma}
    res = ce_engine.evaluate("focal", z, y, options=options, outputs=["grad"])
    target = torch.tensor(y)
    value, grad = grad_of(
        lambda t: torchvision_sigmoid_focal_loss(t, target, alpha, gamma).mean(), z
    )
    assert res.value == pytest.approx(value, rel=1e-12)
    np.testing.assert_allclose(res.outputs["grad"], grad, rtol=1e-9, atol=1e-14)


def test_softmax_focal_against_autograd():
    z = RNG.standard_normal((10, 4)) * 2
    y = RNG.integers(0, 4, size=10)
    res = ce_engine.evaluate(
        "focal", z, y, options={"variant": "softmax", "gamma": 1.5}, outputs=["grad"]
    )
    target = torch.tensor(y)

    def loss_fn(t):
        log_p = F.log_softmax(t, dim=-1).gather(1, target[:, None])[:, 0]
        return (-0.25 * (1 - log_p.exp()) ** 1.5 * log_p).mean()

    value, grad = grad_of(loss_fn, z)
    assert res.value == pytest.approx(value, rel=1e-12)
    np.testing.assert_allclose(res.outputs["grad"], grad, rtol=1e-9, atol=1e-14)


def test_multi_margin_loss_is_weston_watkins_over_c():
    z = RNG.standard_normal((9, 4))
    y = RNG.integers(0, 4, size=9)
    res = ce_engine.evaluate("multiclass_hinge", z, y, outputs=["grad"])
    value, grad = grad_of(lambda t: F.multi_margin_loss(t, torch.tensor(y)), z)
    assert res.value / 4 == pytest.approx(value, rel=1e-12)
    np.testing.assert_allclose(res.outputs["grad"] / 4, grad, rtol=1e-10, atol=1e-15)


def test_cross_entropy_hessian_against_autograd():
    z = RNG.standard_normal((3, 4))
    y = np.array([0, 3, 1])
    res = ce_engine.evaluate(
        "cross_entropy", z, y, options={"label_smoothing": 0.1}, outputs=["hessian"]
    )
    target = torch.tensor(y)
    full = torch.autograd.functional.hessian(
        lambda t: F.cross_entropy(t, target, label_smoothing=0.1), torch.tensor(z)
    ).numpy()  # (3, 4, 3, 4)
    for i in range(3):
        np.testing.assert_allclose(res.outputs["hessian"][i], full[i, :, i, :], atol=1e-14)


def test_linear_cross_entropy_against_autograd():
    x = RNG.standard_normal((20, 6))
    w = RNG.standard_normal((7, 6))
    b = RNG.standard_normal(7)
    y = RNG.integers(0, 7, size=20)
    res = ce_engine.evaluate(
        "linear_cross_entropy",
        None,
        y,
        features=x,
        weight=w,
        bias=b,
        options={"l2": 0.1, "label_smoothing": 0.05, "chunk_elements": 21},
        outputs=["grad_features", "grad_weight", "grad_bias"],
    )
    tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    loss = F.cross_entropy(tx @ tw.T + tb, torch.tensor(y), label_smoothing=0.05)
    loss = loss + 0.05 * (tw**2).sum()
    loss.backward()
    assert res.value == pytest.approx(float(loss.detach()), rel=1e-12)
    for key, t in (("grad_features", tx), ("grad_weight", tw), ("grad_bias", tb)):
        np.testing.assert_allclose(res.outputs[key], t.grad.numpy(), rtol=1e-10, atol=1e-14)


# ------------------------------------------------ float32 accuracy: at most 2× torch's error


def float32_errors(z: np.ndarray, y: np.ndarray, value, per, grad) -> np.ndarray:
    """(|value − v|, max |per − ℓ|, max |grad − g|) against float64 from the float32 logits,
    each floored at half a float32 ulp of the exact number (no float32 answer is nearer)."""
    z64 = torch.tensor(z, dtype=torch.float64, requires_grad=True)
    exact = F.cross_entropy(z64, torch.tensor(y))
    exact.backward()
    exact_per = F.cross_entropy(z64.detach(), torch.tensor(y), reduction="none").numpy()
    exact_grad = z64.grad.numpy()
    errors = np.array(
        [
            abs(float(value) - float(exact.detach())),
            np.max(np.abs(np.asarray(per, np.float64) - exact_per)),
            np.max(np.abs(np.asarray(grad, np.float64) - exact_grad)),
        ]
    )
    floor = (
        np.array([float(exact.detach()), np.max(np.abs(exact_per)), np.max(np.abs(exact_grad))])
        * 2.0**-25
    )
    return np.maximum(errors, floor)


def torch_float32_errors(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    zt = torch.tensor(z, requires_grad=True)
    value = F.cross_entropy(zt, torch.tensor(y))
    value.backward()
    per = F.cross_entropy(zt.detach(), torch.tensor(y), reduction="none").numpy()
    return float32_errors(z, y, float(value.detach()), per, zt.grad.numpy())


PARITY_PATHS = {  # (options, outputs): see tests/test_numerics.py
    "lane": ({}, ["per_sample", "grad"]),
    "kernel": ({"ignore_index": -100}, ["per_sample", "grad"]),
    "kernel+log_probabilities": ({}, ["per_sample", "grad", "log_probabilities"]),
    "generic": ({}, ["per_sample", "grad", "hessian_diag"]),
}
PARITY_BATCHES = [  # (N, C, row maxima near, target margin)
    (20000, 4, 12.0, 0.0),  # the audit's shape
    (200, 10, 12.0, 14.0),
    (600, 10, -1e4, 8.0),
    (100, 1000, 1e4, 16.0),
    (64, 300, 30.0, 3.0),
    (16, 32000, 0.0, 6.0),
    (2000, 64, -30.0, 0.0),
]


@pytest.mark.parametrize(
    ("path", "n", "c", "offset", "margin"),
    [
        (path, *batch)
        for batch in PARITY_BATCHES
        for path in PARITY_PATHS
        if path != "lane" or batch[0] * batch[1] <= 16_384  # the lane takes small batches
    ],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_float32_error_at_most_twice_torch_float32(path, n, c, offset, margin, seed):
    """value, per_sample and grad: error vs float64 ≤ 2× torch float32's on the same input."""
    rng = np.random.default_rng(seed)
    z = (rng.standard_normal((n, c)) * 2 + offset).astype(np.float32)
    y = rng.integers(0, c, size=n)
    if n == 20000:  # the audit's reproducer: confident rows, maxima in [10, 14]
        z = np.zeros((n, c), np.float32)
        z[:, 0] = np.linspace(10, 14, n)
        y = np.zeros(n, np.int64)
    z[np.arange(n), y] += np.float32(margin)
    options, outputs = PARITY_PATHS[path]
    res = ce_engine.evaluate(
        "cross_entropy", z, y, options=options, outputs=outputs, backend="numpy"
    )
    ours = float32_errors(z, y, res.value, res.outputs["per_sample"], res.outputs["grad"])
    theirs = torch_float32_errors(z, y)
    assert np.all(ours <= 2 * theirs), (ours / theirs).round(3)


# ------------------------------------- the documented differences (README, "Numerical conventions")


def test_zero_times_minus_inf_is_nan_in_torch_and_the_limit_here():
    """A −inf logit on a class of weight 0 under label smoothing, and KL with q_c = 0 there."""
    z = np.array([[0.0, -np.inf, 1.0]])
    weight = [1.0, 0.0, 1.0]
    ours = ce_engine.evaluate(
        "cross_entropy", z, np.array([2]), options={"label_smoothing": 0.1, "weight": weight}
    )
    theirs = F.cross_entropy(
        torch.tensor(z),
        torch.tensor([2]),
        weight=torch.tensor(weight, dtype=torch.float64),
        label_smoothing=0.1,
    )
    assert math.isnan(float(theirs)) and math.isfinite(ours.value)
    q = np.array([[0.5, 0.0, 0.5]])
    kl = ce_engine.evaluate("kl_divergence", z, q)
    kl_torch = F.kl_div(F.log_softmax(torch.tensor(z), dim=-1), torch.tensor(q), reduction="sum")
    assert math.isnan(float(kl_torch)) and math.isfinite(kl.value)


def test_kl_mean_divides_by_positions_where_torch_divides_by_elements():
    z = RNG.standard_normal((6, 5))
    raw = RNG.random((6, 5))
    q = raw / raw.sum(axis=1, keepdims=True)
    ours = ce_engine.evaluate("kl_divergence", z, q, options={"reduction": "mean"})
    with pytest.warns(UserWarning, match="batchmean"):  # torch's own note on its 'mean'
        theirs = F.kl_div(F.log_softmax(torch.tensor(z), dim=-1), torch.tensor(q), reduction="mean")
    assert ours.value == pytest.approx(float(theirs) * 5, rel=1e-12)  # C = 5
