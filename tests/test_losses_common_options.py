"""Options every loss shares (class_axis, log_base, nan_policy, eps, normalization), per loss."""

from __future__ import annotations

import math

import numpy as np
import pytest

import ce_engine
from ce_engine.errors import InputValidationError
from tests import test_losses_binary_cross_entropy as bce_ref
from tests import test_losses_kl_divergence as kl_ref

RNG = np.random.default_rng(31)
N, C = 5, 3
LOSSES = ["cross_entropy", "binary_cross_entropy", "focal", "kl_divergence", "multiclass_hinge"]


def targets_for(loss: str, positions: tuple[int, ...]) -> np.ndarray:
    """Targets with classes last for ``positions``."""
    if loss in ("cross_entropy", "multiclass_hinge"):
        return RNG.integers(0, C, size=positions)
    if loss in ("binary_cross_entropy", "focal"):
        return (RNG.random((*positions, C)) > 0.5).astype(np.float64)
    raw = RNG.random((*positions, C))
    return raw / raw.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize("loss", LOSSES)
def test_class_axis_moves_classes(loss):
    z = RNG.standard_normal((2, 4, C))
    t = targets_for(loss, (2, 4))
    last = ce_engine.evaluate(loss, z, t, outputs=["per_sample", "grad"])
    moved_t = t if t.ndim == 2 else np.moveaxis(t, -1, 1)
    moved = ce_engine.evaluate(
        loss,
        np.moveaxis(z, -1, 1),
        moved_t,
        options={"class_axis": 1},
        outputs=["per_sample", "grad"],
    )
    assert moved.value == pytest.approx(last.value, rel=1e-12)
    np.testing.assert_allclose(moved.outputs["per_sample"], last.outputs["per_sample"], rtol=1e-12)
    np.testing.assert_allclose(np.moveaxis(moved.outputs["grad"], 1, -1), last.outputs["grad"])


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_bits_are_nats_over_ln2(loss, reduction):
    z = RNG.standard_normal((N, C))
    t = targets_for(loss, (N,))
    opts = {"reduction": reduction}
    nats = ce_engine.evaluate(loss, z, t, options=opts, outputs=["per_sample", "grad"])
    bits = ce_engine.evaluate(
        loss, z, t, options={**opts, "log_base": "2"}, outputs=["per_sample", "grad"]
    )
    assert bits.unit == "bits" and nats.unit == "nats"
    assert bits.sum == pytest.approx(nats.sum / math.log(2), rel=1e-12)
    for key in ("per_sample", "grad"):
        np.testing.assert_allclose(bits.outputs[key], nats.outputs[key] / math.log(2), rtol=1e-12)


@pytest.mark.parametrize("loss", LOSSES)
def test_nan_policy(loss):
    z = RNG.standard_normal((N, C))
    z[3, 1] = np.nan
    t = targets_for(loss, (N,))
    keep = [0, 1, 2, 4]
    with pytest.raises(InputValidationError) as info:
        ce_engine.evaluate(loss, z, t)
    assert info.value.errors[0].loc == ("logits", 3, 1)
    opts = {"nan_policy": "omit", "reduction": "sum"}
    omitted = ce_engine.evaluate(loss, z, t, options=opts, outputs=["grad"])
    kept = ce_engine.evaluate(loss, z[keep], t[keep], options={"reduction": "sum"})
    assert omitted.value == pytest.approx(kept.value, rel=1e-12)
    per_label = C if loss in ("binary_cross_entropy", "focal") else 1  # labels count there
    assert omitted.ignored == per_label and np.all(omitted.outputs["grad"][3] == 0)
    propagated = ce_engine.evaluate(loss, z, t, options={"nan_policy": "propagate"})
    assert propagated.value is not None and math.isnan(propagated.value)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("normalization", ["valid", "batch_size", "all", "none"])
def test_normalization_denominators(loss, normalization):
    z = RNG.standard_normal((2, 3, C))
    t = targets_for(loss, (2, 3))
    res = ce_engine.evaluate(
        loss, z, t, options={"normalization": normalization, "reduction": "mean"}
    )
    per_label = C if loss in ("binary_cross_entropy", "focal") else 1
    expected = {"valid": 6 * per_label, "batch_size": 2, "all": 6, "none": 1}[normalization]
    assert res.denominator == expected
    assert res.value == pytest.approx(res.sum / res.denominator, rel=1e-12)


def test_kl_default_batchmean_divides_by_the_batch():
    z = RNG.standard_normal((2, 3, C))
    t = targets_for("kl_divergence", (2, 3))
    res = ce_engine.evaluate("kl_divergence", z, t)
    assert res.denominator == 2 and res.normalization == "batch_size"


@pytest.mark.parametrize("eps", [1e-7, 0.05])
def test_eps_clips_probability_inputs(eps):
    x = RNG.uniform(0.0, 1.0, (N, C))
    x[0, 0], x[1, 2] = 0.0, 1.0
    y = (RNG.random((N, C)) > 0.5).astype(np.float64)
    opts = {"input_kind": "probabilities", "eps": eps}
    bce = ce_engine.evaluate("binary_cross_entropy", x, y, options=opts)
    per, den = bce_ref.reference(x, y, input_kind="probabilities", eps=eps)
    assert bce.value == pytest.approx(per.sum() / den.sum(), rel=1e-12)
    p = x / x.sum(axis=1, keepdims=True)  # softmax inputs are distributions (sum_tolerance)
    p[1] = np.eye(C)[2]  # an exact 1 (and zeros) to clip
    q = RNG.uniform(0.1, 1.0, (N, C))
    q /= q.sum(axis=1, keepdims=True)
    kl = ce_engine.evaluate("kl_divergence", p, q, options=opts)
    expected = kl_ref.reference(p, q, input_kind="probabilities", eps=eps)[0].sum() / N
    assert kl.value == pytest.approx(expected, rel=1e-12)
