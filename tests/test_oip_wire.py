"""OIP v2 wire details: metrics as a BYTES output, ``error`` on every /v2 error, range checks."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import orjson
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from service.config import Settings
from service.http.app import create_app

LOGITS = [[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]]
TARGETS = [0, 2]
FLAT_LOGITS = [v for row in LOGITS for v in row]


def _ref_accuracy() -> float:
    z = np.array(LOGITS, np.float64)
    return float(np.mean(z.argmax(1) == np.array(TARGETS)))


def _ref_ce() -> float:
    z = np.array(LOGITS, np.float64)
    logp = z - z.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    return float(-logp[np.arange(2), TARGETS].mean())


def _infer_body(**extra: object) -> dict[str, object]:
    return {
        "inputs": [
            {
                "name": "logits",
                "datatype": "FP64",
                "shape": [2, 3],
                "data": [v for row in LOGITS for v in row],
            },
            {"name": "targets", "datatype": "INT64", "shape": [2], "data": TARGETS},
        ],
        **extra,
    }


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    app = create_app(
        Settings(
            max_body_bytes=64 * 1024,
            max_elements=100_000,
            log_level="warning",
            database_url=f"sqlite:///{tmp_path / 'ce-eval.db'}",
        )
    )
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


# --- metrics as an output tensor -------------------------------------------------------------


def test_metrics_come_back_as_a_bytes_output_holding_json(client: TestClient) -> None:
    r = client.post(
        "/v2/models/cross_entropy/infer", json=_infer_body(parameters={"metrics": ["accuracy"]})
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert "metrics" not in body["parameters"]
    (metrics,) = [o for o in body["outputs"] if o["name"] == "metrics"]
    assert metrics["datatype"] == "BYTES" and metrics["shape"] == [1]
    decoded = orjson.loads(metrics["data"][0])
    assert decoded["accuracy"] == pytest.approx(_ref_accuracy(), rel=1e-12)


def test_no_metrics_output_without_metrics(client: TestClient) -> None:
    r = client.post("/v2/models/cross_entropy/infer", json=_infer_body())
    assert r.status_code == 200, r.text
    assert [o["name"] for o in r.json()["outputs"]] == ["loss"]


def test_metrics_output_in_binary_tensor_extension(client: TestClient) -> None:
    body = _infer_body(
        parameters={"metrics": "accuracy", "binary_data_output": True},
        outputs=[{"name": "loss"}, {"name": "metrics"}],
    )
    r = client.post("/v2/models/cross_entropy/infer", json=body)
    assert r.status_code == 200, r.text
    size = int(r.headers["inference-header-content-length"])
    header = orjson.loads(r.content[:size])
    names = [o["name"] for o in header["outputs"]]
    assert names == ["loss", "metrics"]
    tail = r.content[size:]
    loss_size = header["outputs"][0]["parameters"]["binary_data_size"]
    assert loss_size == 8
    assert np.frombuffer(tail[:8], "<f8")[0] == pytest.approx(_ref_ce(), rel=1e-12)
    blob = tail[8:]
    assert header["outputs"][1]["parameters"]["binary_data_size"] == len(blob)
    (length,) = struct.unpack("<I", blob[:4])  # Triton BYTES: 4-byte LE length, then the bytes
    assert length == len(blob) - 4
    assert orjson.loads(blob[4:])["accuracy"] == pytest.approx(_ref_accuracy(), rel=1e-12)


def test_sdk_reads_the_metrics_output(client: TestClient) -> None:
    from ce_eval_client.sdk import Client

    sdk = Client(transport="oip", http=client)
    result = sdk.evaluate(
        "cross_entropy", np.array(LOGITS), np.array(TARGETS), metrics=["accuracy"]
    )
    assert result.metrics["accuracy"] == pytest.approx(_ref_accuracy(), rel=1e-12)


# --- every /v2 error carries "error" ---------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/v2/nope", 404),
        ("GET", "/v2/models/cross_entropy/versions/1/nope", 404),
        ("GET", "/v2/models/nope", 404),
        ("DELETE", "/v2/models/cross_entropy/infer", 405),
        ("POST", "/v2/health/live", 405),
    ],
)
def test_every_oip_error_has_an_error_member(
    client: TestClient, method: str, path: str, status: int
) -> None:
    r = client.request(method, path)
    assert r.status_code == status
    body = r.json()
    assert isinstance(body["error"], str) and body["error"] and "\n" not in body["error"]


def test_oip_validation_error_has_an_error_member(client: TestClient) -> None:
    r = client.post("/v2/models/cross_entropy/infer", content=b"{not json")
    assert r.status_code == 400 and r.json()["error"]
    r = client.post("/v2/models/cross_entropy/infer", json={"inputs": [{"name": "logits"}]})
    assert r.status_code == 422 and "inputs.0" in r.json()["error"]


def test_rest_errors_stay_plain_problems(client: TestClient) -> None:
    r = client.get("/v1/nope")
    assert r.status_code == 404 and "error" not in r.json()


# --- values outside the datatype's range -----------------------------------------------------


@pytest.mark.parametrize(
    ("datatype", "value", "why"),
    [
        ("UINT8", -1, "out of range"),
        ("UINT8", 300, "out of range"),
        ("INT64", 2**63, "out of range"),
        ("INT64", -(2**64), "out of range"),
        ("UINT64", 2**64, "out of range"),
        ("INT8", 1e10, "out of range"),
        ("INT32", 1.5, "integer"),
        ("INT64", 1.0, "integer"),
        ("INT64", "1", "number"),
        ("FP32", "NaN", "number"),
        ("FP16", 1e10, "out of range"),
        ("FP32", 1e300, "out of range"),
        ("BOOL", 2, "true or false"),
        ("INT64", None, "not a number"),
        ("FP64", [1.0], "not an array"),
    ],
)
def test_out_of_range_data_is_422_naming_the_field(
    client: TestClient, datatype: str, value: object, why: str
) -> None:
    body = _infer_body()
    body["inputs"][1] = {"name": "targets", "datatype": datatype, "shape": [2], "data": [0, value]}  # type: ignore[index]
    r = client.post("/v2/models/cross_entropy/infer", json=body)
    assert r.status_code == 422, r.text
    problem = r.json()
    assert problem["errors"][0]["loc"] == ["inputs", 1, "data"]
    assert why in problem["errors"][0]["msg"]
    assert "inputs.1.data" in problem["error"]


def test_in_range_integer_targets_still_work(client: TestClient) -> None:
    body = _infer_body()
    body["inputs"][1]["datatype"] = "UINT8"  # type: ignore[index]
    r = client.post("/v2/models/cross_entropy/infer", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][0]["data"][0] == pytest.approx(_ref_ce(), rel=1e-12)


_DATATYPES = ["BOOL", "UINT8", "INT8", "INT16", "INT32", "INT64", "UINT64", "FP16", "FP32", "FP64"]
_json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=5),
)
_data = st.recursive(
    st.lists(_json_scalars, max_size=8), lambda c: st.lists(c, max_size=3), max_leaves=12
)
_input = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["logits", "targets", "sample_weight", "x"]),
        "datatype": st.one_of(st.sampled_from(_DATATYPES), st.text(max_size=4)),
        "shape": st.one_of(
            st.lists(st.integers(min_value=-2, max_value=6), max_size=3), _json_scalars
        ),
        "data": st.one_of(_data, _json_scalars),
    }
)
_well_formed_input = st.builds(
    lambda name, datatype, data, nested: {
        "name": name,
        "datatype": datatype,
        "shape": [1, len(data)] if nested else [len(data)],
        "data": [data] if nested else data,
    },
    st.sampled_from(["logits", "targets", "sample_weight"]),
    st.sampled_from(_DATATYPES),
    st.lists(_json_scalars, min_size=1, max_size=6),
    st.booleans(),
)
_input = st.one_of(_well_formed_input, _well_formed_input, _input)
_bodies = st.one_of(
    st.fixed_dictionaries(
        {"inputs": st.lists(_input, max_size=3)},
        optional={
            "parameters": st.dictionaries(
                st.sampled_from(["metrics", "reduction", "binary_data_output", "backend"]),
                _json_scalars,
                max_size=2,
            ),
            "outputs": st.lists(
                st.fixed_dictionaries({"name": st.sampled_from(["loss", "grad", "metrics", "z"])}),
                max_size=2,
            ),
        },
    ),
    st.dictionaries(st.text(max_size=4), _json_scalars, max_size=3),
)


@hyp_settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(body=_bodies)
def test_fuzz_oip_json_never_5xx(client: TestClient, body: dict[str, object]) -> None:
    content = json.dumps(body).encode()  # stdlib: integers past 64 bits too
    r = client.post("/v2/models/cross_entropy/infer", content=content)
    assert r.status_code < 500, (body, r.text)
    if r.status_code >= 400:
        assert r.json()["error"]


# --- non_finite positions --------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["propagate", "omit"])
@pytest.mark.parametrize("binary_output", [False, True])
def test_non_finite_positions_come_back_as_a_bytes_output(
    client: TestClient, policy: str, binary_output: bool
) -> None:
    """Target mass on a -inf logit (row 1): ℓ = +inf; the position is listed, as over REST."""
    z = np.array([[0.5, 1.0, 0.0], [0.0, -np.inf, 1.0]], "<f4")
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "logits",
                    "datatype": "FP32",
                    "shape": [2, 3],
                    "parameters": {"binary_data_size": z.nbytes},
                },
                {"name": "targets", "datatype": "INT64", "shape": [2], "data": [0, 1]},
            ],
            "outputs": [
                {"name": "loss", "parameters": {"binary_data": False}},
                {"name": "non_finite", "parameters": {"binary_data": binary_output}},
            ],
            "parameters": {"nan_policy": policy},
        }
    )
    r = client.post(
        "/v2/models/cross_entropy/infer",
        content=header + z.tobytes(),
        headers={"inference-header-content-length": str(len(header))},
    )
    assert r.status_code == 200, r.text
    size = int(r.headers.get("inference-header-content-length", len(r.content)))
    answer = orjson.loads(r.content[:size])
    (entry,) = [o for o in answer["outputs"] if o["name"] == "non_finite"]
    assert entry["datatype"] == "BYTES" and entry["shape"] == [1]
    if binary_output:
        blob = r.content[size:]
        assert int.from_bytes(blob[:4], "little") == len(blob) - 4
        listed = orjson.loads(blob[4:])
    else:
        listed = orjson.loads(entry["data"][0])
    assert listed == {"count": 1, "positions": [[1]]}


def test_sdk_reads_an_answer_with_non_finite_positions(client: TestClient) -> None:
    from ce_eval_client.sdk import Client

    z = np.array([[0.5, 1.0, 0.0], [0.0, -np.inf, 1.0]], np.float32)
    result = Client(transport="oip", http=client).evaluate(
        "cross_entropy", z, np.array([0, 1]), options={"nan_policy": "omit"}
    )
    row = z[0].astype(np.float64)
    expected = np.log(np.exp(row).sum()) - row[0]
    assert result.count == 1 and result.value == pytest.approx(expected, rel=1e-6)
    assert result.non_finite == {"count": 1, "positions": [[1]]}


def test_middleware_errors_under_v2_have_an_error_member(tmp_path: Path) -> None:
    """413 (body limit) and 401 (API key) are answered before routing; they carry it too."""
    app = create_app(
        Settings(
            max_body_bytes=1024,
            api_keys="k1",
            log_level="warning",
            database_url=f"sqlite:///{tmp_path / 'ce-eval.db'}",
        )
    )
    with TestClient(app) as c:
        r = c.post("/v2/models/cross_entropy/infer", json={})
        assert r.status_code == 401 and r.json()["error"]
        r = c.post(
            "/v2/models/cross_entropy/infer", content=b"x" * 4096, headers={"x-api-key": "k1"}
        )
        assert r.status_code == 413 and "1024" in r.json()["error"]
        assert "error" not in c.post("/v1/evaluate", json={}).json()


@pytest.mark.parametrize("key", ["name", "datatype"])
def test_a_huge_input_name_or_datatype_is_echoed_clipped(client: TestClient, key: str) -> None:
    item: dict[str, object] = {"name": "logits", "shape": [1, 2], "datatype": "FP32"}
    item[key] = "x" * 50_000
    item["data"] = [1.0, 2.0]
    r = client.post("/v2/models/cross_entropy/infer", json={"inputs": [item]})
    assert r.status_code == 422
    assert len(r.content) < 16_384
    assert "(50000 characters)" in r.json()["error"]
