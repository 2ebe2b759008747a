"""Every loss and output through POST /v1/evaluate, 422s for unsupported combinations, and the
GET /v1/losses catalog."""

from __future__ import annotations

import base64
import math

import numpy as np
import pytest

import ce_engine
from ce_engine.registry import ALL_OUTPUTS
from tests.reference import reduce_reference, softmax_ce

RNG = np.random.default_rng(99)
N, C = 4, 3
Z = RNG.standard_normal((N, C)).round(3)
INDEX = np.array([0, 2, 1, 2])
LABELS = np.array([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
PROBS = np.array([[0.2, 0.3, 0.5], [0.1, 0.1, 0.8], [0.6, 0.4, 0.0], [1 / 3, 1 / 3, 1 / 3]])
FEATURES = RNG.standard_normal((N, 2)).round(3)
WEIGHT = RNG.standard_normal((C, 2)).round(3)
BIAS = np.array([0.1, -0.2, 0.3])

TARGETS = {
    "cross_entropy": INDEX,
    "binary_cross_entropy": LABELS,
    "focal": LABELS,
    "kl_divergence": PROBS,
    "multiclass_hinge": INDEX,
    "linear_cross_entropy": INDEX,
}
SPECS = ce_engine.all_losses()


def request(loss: str, outputs: list[str], **extra: object) -> dict:
    body: dict = {"loss": loss, "targets": TARGETS[loss].tolist(), "outputs": outputs, **extra}
    if SPECS[loss].inputs == "linear":
        body |= {"features": FEATURES.tolist(), "weight": WEIGHT.tolist(), "bias": BIAS.tolist()}
    else:
        body["logits"] = Z.tolist()
    if "hvp" in outputs:
        body["vector"] = np.ones((N, C)).tolist()
    return body


def direct(loss: str, outputs: list[str]) -> ce_engine.EvaluationResult:
    if SPECS[loss].inputs == "linear":
        return ce_engine.evaluate(
            loss, None, TARGETS[loss], outputs=outputs, features=FEATURES, weight=WEIGHT, bias=BIAS
        )
    vector = np.ones((N, C)) if "hvp" in outputs else None
    return ce_engine.evaluate(loss, Z, TARGETS[loss], outputs=outputs, vector=vector)


SUPPORTED = [(name, out) for name, spec in sorted(SPECS.items()) for out in sorted(spec.outputs)]
UNSUPPORTED = [
    (name, out)
    for name, spec in sorted(SPECS.items())
    for out in ALL_OUTPUTS
    if out not in spec.outputs
]


@pytest.mark.parametrize(("loss", "output"), SUPPORTED)
async def test_each_loss_and_output(client, loss, output):
    r = await client.post("/v1/evaluate", json=request(loss, [output]))
    assert r.status_code == 200, r.text
    body = r.json()
    expected = direct(loss, [output])
    assert body["loss"] == loss
    assert body["value"] == pytest.approx(expected.value, rel=1e-12)
    assert body["sum"] == pytest.approx(expected.sum, rel=1e-12)
    assert body["denominator"] == pytest.approx(expected.denominator)
    if output != "loss":
        np.testing.assert_allclose(
            np.array(body["outputs"][output]), expected.outputs[output], rtol=1e-12, atol=1e-15
        )


@pytest.mark.parametrize(("loss", "output"), UNSUPPORTED)
async def test_unsupported_outputs_are_422(client, loss, output):
    r = await client.post("/v1/evaluate", json=request(loss, [output]))
    assert r.status_code == 422, r.text
    problem = r.json()
    assert r.headers["content-type"].startswith("application/problem+json")
    assert problem["errors"][0]["loc"] == ["outputs", 0]
    assert f"not supported for {loss}" in problem["errors"][0]["msg"]


async def test_http_cross_entropy_matches_plain_reference(client):
    r = await client.post(
        "/v1/evaluate", json=request("cross_entropy", ["loss"], options={"log_base": 2})
    )
    per, den, _ = softmax_ce(Z, INDEX, fmt="index")
    expected = reduce_reference(per, den, n=N, m=N, reduction="mean")
    assert r.json()["value"] == pytest.approx(expected / math.log(2), rel=1e-12)
    assert r.json()["unit"] == "bits"


async def test_kl_extras_in_response(client):
    r = await client.post("/v1/evaluate", json=request("kl_divergence", ["loss"]))
    body = r.json()
    assert body["reduction"] == "batchmean"
    assert body["extras"]["cross_entropy"] == pytest.approx(
        body["extras"]["entropy"] + body["value"], rel=1e-12
    )


async def test_hessian_too_many_classes_suggests_hvp(client):
    z = np.zeros((1, 300))
    body = {"loss": "cross_entropy", "logits": z.tolist(), "targets": [1], "outputs": ["hessian"]}
    r = await client.post("/v1/evaluate", json=body)
    assert r.status_code == 422
    assert "hvp" in r.json()["errors"][0]["msg"]


async def test_hvp_without_vector_is_422(client):
    body = request("cross_entropy", ["hvp"])
    del body["vector"]
    r = await client.post("/v1/evaluate", json=body)
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["vector"]


async def test_linear_with_base64_tensors_and_l2(client):
    def b64(a: np.ndarray) -> dict:
        a = np.ascontiguousarray(a, dtype="<f4")
        return {"dtype": "float32", "shape": list(a.shape), "data": base64.b64encode(a).decode()}

    body = {
        "loss": "linear_cross_entropy",
        "targets": INDEX.tolist(),
        "features": b64(FEATURES),
        "weight": b64(WEIGHT),
        "options": {"l2": 0.5},
        "outputs": ["grad_weight"],
        "tensor_encoding": "base64",
    }
    r = await client.post("/v1/evaluate", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["compute_dtype"] == "float32"
    z = FEATURES @ WEIGHT.T
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    dw = (p - np.eye(C)[INDEX]).T @ FEATURES / N + 0.5 * WEIGHT
    got = out["outputs"]["grad_weight"]
    assert got["shape"] == [C, 2]
    values = np.frombuffer(base64.b64decode(got["data"]), dtype="<f4").reshape(C, 2)
    np.testing.assert_allclose(values, dw, rtol=1e-5, atol=1e-6)
    nll = -np.log(p[np.arange(N), INDEX]).mean()
    assert out["value"] == pytest.approx(nll + 0.25 * (WEIGHT**2).sum(), rel=1e-5)


@pytest.mark.parametrize(
    ("patch", "loc"),
    [
        ({"features": None}, ["features"]),
        ({"weight": [[1.0, 2.0, 3.0]] * C}, ["weight"]),
        ({"bias": [0.0, 1.0]}, ["bias"]),
        ({"logits": Z.tolist()}, ["logits"]),
    ],
)
async def test_linear_input_errors_are_422(client, patch, loc):
    body = request("linear_cross_entropy", ["loss"]) | patch
    r = await client.post("/v1/evaluate", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["errors"][0]["loc"] == loc


async def test_missing_logits_is_422(client):
    r = await client.post("/v1/evaluate", json={"loss": "focal", "targets": [[1.0]]})
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["logits"]


async def test_option_errors_name_the_option(client):
    cases = [
        ("focal", {"gamma": -1}, ["options", "gamma"]),
        ("binary_cross_entropy", {"pos_weight": [1.0]}, ["options", "pos_weight"]),
        ("kl_divergence", {"target_kind": "index"}, ["options", "target_kind"]),
        ("multiclass_hinge", {"variant": "ovr"}, ["options", "variant"]),
        ("linear_cross_entropy", {"l2": -1}, ["options", "l2"]),
    ]
    for loss, options, loc in cases:
        r = await client.post("/v1/evaluate", json=request(loss, ["loss"], options=options))
        assert r.status_code == 422, r.text
        assert r.json()["errors"][0]["loc"] == loc


async def test_catalog_lists_every_loss_with_schema_outputs_defaults(client):
    r = await client.get("/v1/losses")
    assert r.status_code == 200
    catalog = {entry["name"]: entry for entry in r.json()["losses"]}
    assert set(catalog) >= {
        "cross_entropy",
        "binary_cross_entropy",
        "focal",
        "kl_divergence",
        "multiclass_hinge",
        "linear_cross_entropy",
    }
    for name, entry in catalog.items():
        assert entry["outputs"] == sorted(SPECS[name].outputs)
        assert entry["options_schema"]["type"] == "object"
        assert entry["options_schema"]["additionalProperties"] is False
        assert set(entry["defaults"]) == set(entry["options_schema"]["properties"])
        assert entry["formula"]
    assert catalog["kl_divergence"]["defaults"]["reduction"] == "batchmean"
    focal = catalog["focal"]["defaults"]
    assert (focal["alpha"], focal["gamma"], focal["variant"]) == (0.25, 2.0, "sigmoid")
    assert "pos_weight" in catalog["binary_cross_entropy"]["options_schema"]["properties"]
    assert catalog["multiclass_hinge"]["defaults"]["margin"] == 1.0
    assert catalog["linear_cross_entropy"]["defaults"]["l2"] == 0.0
    assert "hessian" in catalog["cross_entropy"]["outputs"]
    assert "hessian" not in catalog["focal"]["outputs"]


async def test_openapi_has_every_options_model(client):
    schema = (await client.get("/openapi.json")).json()
    components = schema["components"]["schemas"]
    for model in (
        "BinaryCrossEntropyOptions",
        "FocalOptions",
        "KLDivergenceOptions",
        "MulticlassHingeOptions",
        "LinearCrossEntropyOptions",
    ):
        assert model in components
    assert "linear_cross_entropy" in components["EvaluateRequest"]["properties"]["loss"]["enum"]
