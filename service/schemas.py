"""Pydantic request/response models of the REST API (v1). Loss options come from the registry."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SkipValidation

from ce_engine.registry import ALL_OUTPUTS
from ce_eval_client.wire import WIRE_DTYPES

TensorEncoding = Literal["list", "base64"]


class TensorData(BaseModel):
    """A tensor as little-endian C-order bytes, base64-encoded."""

    model_config = ConfigDict(extra="forbid")

    dtype: str = Field(..., json_schema_extra={"enum": list(WIRE_DTYPES)})
    shape: list[int] = Field(..., description="Dimensions; the product must match the bytes.")
    data: str = Field(..., description="base64 of the little-endian C-order bytes.")


#: A tensor on the wire: nested lists of numbers, or TensorData.
Tensor = list[Any] | TensorData
#: A request tensor field: documented as ``Tensor``, passed through as is (NumPy arrays from
#: the binary transports too); ``service.codecs.tensors.decode_tensor`` validates and locates
#: errors.
RequestTensor = Annotated[Tensor | Any, SkipValidation]


#: Tensors of a run batch: logits (or, for linear_cross_entropy, features, weight and bias),
#: targets and sample weights.
BATCH_TENSORS = ("logits", "targets", "sample_weight", "features", "weight", "bias")
MAX_OPTION_KEYS = 64
"""Keys of a request's ``options`` (a loss has about 20): more is 422 before any is looked at."""
MAX_METRIC_NAMES = 64
"""Names in a request's or run's ``metrics`` list."""
MAX_OUTPUT_NAMES = 32
"""Names in a request's ``outputs`` list."""


class EvaluateRequest(BaseModel):
    """POST /v1/evaluate body."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    loss: str = Field(..., description="A loss name from GET /v1/losses.")
    logits: RequestTensor | None = Field(
        None,
        description="(N, C) or (N, d1.., C); see class_axis. Required except for linear losses.",
    )
    targets: RequestTensor = Field(..., description="By target_format (see the loss options).")
    sample_weight: RequestTensor | None = Field(None, description="(N,) or positions' shape.")
    options: dict[str, Any] = Field(
        default_factory=dict,
        max_length=MAX_OPTION_KEYS,
        description="Loss options; schema per loss in GET /v1/losses.",
    )
    outputs: list[str] = Field(
        default_factory=lambda: ["loss"],
        max_length=MAX_OUTPUT_NAMES,
        description=f"Any of {', '.join(ALL_OUTPUTS)} that the loss supports.",
    )
    vector: RequestTensor | None = Field(None, description="Direction for `hvp` (logits' shape).")
    metrics: list[str] = Field(
        default_factory=list, max_length=MAX_METRIC_NAMES, description="Metric names (DESIGN §2)."
    )
    features: RequestTensor | None = Field(
        None, description="linear_cross_entropy: features X (N, D); logits = X Wᵀ + b."
    )
    weight: RequestTensor | None = Field(
        None, description="linear_cross_entropy: weight W (C, D) (not the class weights option)."
    )
    bias: RequestTensor | None = Field(None, description="linear_cross_entropy: bias b (C,).")
    backend: Literal["auto", "numpy", "cupy"] | None = Field(
        None, description="Array backend; the server default when absent."
    )
    tensor_encoding: TensorEncoding = Field(
        "list", description="How output tensors are returned: nested lists or base64."
    )


class NonFinitePositions(BaseModel):
    """Positions whose input or loss was not finite (left out under omit, in the sums under
    propagate)."""

    count: int = Field(..., description="How many positions.")
    positions: list[list[int]] = Field(..., description="The first 100, as index lists.")


class EvaluateResponse(BaseModel):
    """POST /v1/evaluate answer. ``value`` = sum / denominator for mean reductions."""

    loss: str
    value: float | None = Field(None, description="Reduced loss (absent for reduction none).")
    sum: float
    denominator: float
    count: int = Field(
        ...,
        description=(
            "Predictions counted: positions for softmax losses, labels (positions × C) for "
            "element-wise ones (binary_cross_entropy, sigmoid focal)."
        ),
    )
    ignored: int = Field(..., description="Predictions not counted (ignore_index, omitted, …).")
    reduction: str
    normalization: str
    unit: Literal["nats", "bits"]
    outputs: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    extras: dict[str, float] = Field(default_factory=dict)
    non_finite: NonFinitePositions | None = Field(
        None,
        description=(
            "Only with nan_policy propagate or omit, when some positions had a non-finite "
            "input or loss (raise answers 422 non_finite_result instead)."
        ),
    )
    backend: str
    compute_dtype: str
    elapsed_ms: float


class ProblemItem(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class Problem(BaseModel):
    """RFC 9457 problem details."""

    type: str
    title: str
    status: int
    detail: str
    errors: list[ProblemItem] | None = Field(None, description="At most the first 20 items.")
    errors_total: int | None = Field(
        None, description="How many items there were, when `errors` holds only the first 20."
    )
    instance: str | None = None


class LossInfo(BaseModel):
    name: str
    summary: str
    formula: str
    options_schema: dict[str, Any]
    defaults: dict[str, Any]
    outputs: list[str]
    metrics: list[str] = Field(description="Metric names the loss accepts (every variant).")
    metrics_by_variant: dict[str, list[str]] | None = Field(
        None, description="Where the metrics depend on options.variant (focal): variant → names."
    )


class LossCatalog(BaseModel):
    losses: list[LossInfo]


class Health(BaseModel):
    status: str
    checks: dict[str, str] = Field(default_factory=dict)
