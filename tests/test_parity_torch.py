"""Parity with PyTorch as a reference implementation (optional: `make parity`)."""

from __future__ import annotations

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
