"""KL(q ‖ p) vs a plain float64 reference: target/input kinds, decomposition, gradients."""

from __future__ import annotations

import math

import numpy as np
import pytest

import ce_engine
from ce_engine.errors import InputValidationError
from tests.reference import central_difference, log_softmax_row, reduce_reference

RNG = np.random.default_rng(5)
N, C = 5, 4


def reference(
    z: np.ndarray,
    t: np.ndarray,
    *,
    target_kind: str = "probabilities",
    input_kind: str = "logits",
    temperature: float = 1.0,
    eps: float = 1e-7,
    sample_weight: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(s_i KL_i, s_i H(q_i), s_i H(q_i, p_i)) with plain loops."""
    m, c = z.shape
    kl, ent, cross = np.zeros(m), np.zeros(m), np.zeros(m)
    for i in range(m):
        s = 1.0 if sample_weight is None else float(sample_weight[i])
        if target_kind == "probabilities":
            q = [float(v) for v in t[i]]
        elif target_kind == "logits":
            q = [math.exp(v) for v in log_softmax_row(np.asarray(t[i], float) / temperature)]
        else:
            q = [math.exp(float(v)) for v in t[i]]
        if input_kind == "logits":
            log_p = list(log_softmax_row(np.asarray(z[i], float) / temperature))
        elif input_kind == "log_probabilities":
            log_p = [float(v) for v in z[i]]
        else:
            log_p = [math.log(min(max(float(v), eps), 1 - eps)) for v in z[i]]
        for j in range(c):
            if q[j] > 0:
                kl[i] += s * q[j] * (math.log(q[j]) - log_p[j])
                ent[i] -= s * q[j] * math.log(q[j])
                cross[i] -= s * q[j] * log_p[j]
    return kl, ent, cross


def distributions(shape: tuple[int, int]) -> np.ndarray:
    raw = RNG.random(shape)
    raw[0, 1] = 0.0  # a zero-probability class: 0·log 0 = 0
    return raw / raw.sum(axis=1, keepdims=True)


CASES = [
    {},
    {"target_kind": "logits"},
    {"target_kind": "log_probabilities"},
    {"temperature": 2.0},
    {"target_kind": "logits", "temperature": 0.5},
    {"input_kind": "log_probabilities"},
    {"input_kind": "probabilities"},
]


@pytest.mark.parametrize("opts", CASES)
@pytest.mark.parametrize(
    ("reduction", "normalization"),
    [
        ("batchmean", "valid"),
        ("mean", "valid"),
        ("mean", "all"),
        ("sum", "valid"),
        ("none", "valid"),
    ],
)
@pytest.mark.parametrize("with_sample_weight", [False, True])
def test_value_decomposition_and_grad(opts, reduction, normalization, with_sample_weight):
    kind = opts.get("input_kind", "logits")
    q = distributions((N, C))
    t = {
        "probabilities": q,
        "logits": RNG.standard_normal((N, C)),
        "log_probabilities": np.log(distributions((N, C)) + 0.01),
    }[opts.get("target_kind", "probabilities")]
    z = {
        "logits": RNG.standard_normal((N, C)) * 2,
        "log_probabilities": np.log(distributions((N, C)) + 0.05),
        "probabilities": distributions((N, C)),
    }[kind]
    sw = RNG.random(N) + 0.1 if with_sample_weight else None
    kw = {k: opts[k] for k in ("target_kind", "input_kind", "temperature") if k in opts}
    res = ce_engine.evaluate(
        "kl_divergence",
        z,
        t,
        options={**opts, "reduction": reduction, "normalization": normalization},
        outputs=["per_sample", "grad"],
        sample_weight=sw,
    )
    kl, ent, cross = reference(z, t, sample_weight=sw, **kw)
    den = np.ones(N) if sw is None else sw
    expected = reduce_reference(kl, den, n=N, m=N, reduction=reduction, normalization=normalization)
    if expected is None:
        assert res.value is None
    else:
        assert res.value == pytest.approx(expected, rel=1e-10)
    np.testing.assert_allclose(res.outputs["per_sample"], kl, rtol=1e-10, atol=1e-14)
    red = "sum" if reduction == "none" else reduction
    for key, ref in (("entropy", ent), ("cross_entropy", cross)):
        assert res.extras[key] == pytest.approx(
            reduce_reference(ref, den, n=N, m=N, reduction=red, normalization=normalization),
            rel=1e-10,
        )
    assert res.extras["cross_entropy"] == pytest.approx(
        res.extras["entropy"] + (res.value if res.value is not None else res.sum), rel=1e-10
    )

    def f(zz: np.ndarray) -> float:
        value = reduce_reference(
            reference(zz, t, sample_weight=sw, **kw)[0],
            den,
            n=N,
            m=N,
            reduction=red,
            normalization=normalization,
        )
        return float(value)

    np.testing.assert_allclose(res.outputs["grad"], central_difference(f, z), rtol=1e-6, atol=1e-7)


def test_batchmean_is_the_default_and_matches_the_documented_torch_formula():
    """torch.kl_div(log p, q, 'batchmean') = Σ q (log q − log p) / N."""
    z = RNG.standard_normal((3, 2, C))
    q = distributions((6, C)).reshape(3, 2, C)
    log_p = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    expected = np.sum(np.where(q > 0, q * (np.log(np.where(q > 0, q, 1)) - log_p), 0)) / 3
    res = ce_engine.evaluate("kl_divergence", z, q)
    assert res.reduction == "batchmean" and res.denominator == 3
    assert res.value == pytest.approx(expected, rel=1e-12)


def test_bits_and_outputs():
    z = RNG.standard_normal((N, C))
    q = distributions((N, C))
    nats = ce_engine.evaluate("kl_divergence", z, q)
    bits = ce_engine.evaluate(
        "kl_divergence", z, q, options={"log_base": 2}, outputs=["probabilities"]
    )
    assert bits.value == pytest.approx(nats.value / math.log(2), rel=1e-12)
    assert bits.extras["entropy"] == pytest.approx(nats.extras["entropy"] / math.log(2))
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(bits.outputs["probabilities"], p, rtol=1e-12)


@pytest.mark.parametrize("scale", [1e4, 1e30])
def test_extreme_logits_stay_finite(scale):
    z = np.array([[scale, -scale, 0.0], [-scale, scale, scale]], dtype=np.float32)
    q = np.array([[0.0, 0.5, 0.5], [1.0, 0.0, 0.0]], dtype=np.float32)
    res = ce_engine.evaluate("kl_divergence", z, q, outputs=["per_sample", "grad", "hvp"], vector=z)
    assert np.isfinite(res.outputs["per_sample"]).all()
    assert np.isfinite(res.outputs["grad"]).all()
    assert res.outputs["per_sample"][1] == pytest.approx(2 * scale + math.log(2), rel=1e-5)


def test_identical_distributions_give_zero():
    z = RNG.standard_normal((N, C)).astype(np.float32)
    res = ce_engine.evaluate(
        "kl_divergence", z, z, options={"target_kind": "logits"}, outputs=["grad"]
    )
    assert abs(res.value) < 1e-6 and np.abs(res.outputs["grad"]).max() < 1e-6


def test_errors():
    z = np.zeros((2, 3))
    with pytest.raises(InputValidationError, match="needs targets of shape"):
        ce_engine.evaluate("kl_divergence", z, np.array([0, 1]))
    with pytest.raises(InputValidationError, match="targets must be >= 0"):
        ce_engine.evaluate("kl_divergence", z, -np.ones((2, 3)))
    bad = np.zeros((2, 3))
    bad[1, 2] = np.nan
    with pytest.raises(InputValidationError) as info:
        ce_engine.evaluate("kl_divergence", z, bad, options={"target_kind": "logits"})
    assert info.value.errors[0].loc == ("targets", 1, 2)
    with pytest.raises(InputValidationError, match="target_kind"):
        ce_engine.evaluate("kl_divergence", z, bad, options={"target_kind": "index"})
