"""Loss options: one pydantic model per loss, the single source for validation, catalog and docs."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Reduction = Literal["mean", "sum", "none", "batchmean"]
Normalization = Literal["valid", "batch_size", "all", "none"]
LogBase = Literal["e", "2"]
InputKind = Literal["logits", "probabilities", "log_probabilities"]
NanPolicy = Literal["raise", "propagate", "omit"]
TargetFormat = Literal["auto", "index", "probabilities", "multi_hot"]


class CommonOptions(BaseModel):
    """Options every loss accepts (DESIGN §2)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    reduction: Reduction = Field(
        "mean", description="mean | sum | none | batchmean (sum / batch size N)."
    )
    normalization: Normalization = Field(
        "valid",
        description=(
            "Denominator of `mean`: valid (Σ weights of counted targets), batch_size (N), "
            "all (number of positions), none (1)."
        ),
    )
    log_base: LogBase = Field("e", description="e (nats) or 2 (bits).")
    class_axis: int = Field(-1, description="Axis of `logits` holding the classes.")
    temperature: float = Field(1.0, gt=0, description="p = softmax(z / T).")
    input_kind: InputKind = Field(
        "logits", description="What `logits` holds: logits, probabilities or log-probabilities."
    )
    eps: float = Field(
        1e-7, gt=0, lt=0.5, description="Clip for probability inputs: p ∈ [eps, 1 − eps]."
    )
    nan_policy: NanPolicy = Field(
        "raise",
        description="NaN/+inf in inputs: raise (422 naming the position), propagate, omit.",
    )
    top_k: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: [1, 5], description="k values for `top_k_accuracy`."
    )
    n_bins: int = Field(15, ge=1, le=1000, description="Bins for ece/mce/reliability.")
    max_confusion_classes: int = Field(
        1024,
        ge=1,
        le=4096,
        description="Largest number of classes for the `confusion_matrix` metric (C × C sums).",
    )

    @field_validator("log_base", mode="before")
    @classmethod
    def _log_base_number(cls, value: Any) -> Any:
        return str(value) if value == 2 else value


class CrossEntropyOptions(CommonOptions):
    """Options of softmax cross-entropy."""

    target_format: TargetFormat = Field(
        "auto",
        description=(
            "index (integer class ids), probabilities (same shape as logits), multi_hot "
            "(0/1 labels, q = y / Σy), auto (integer ids of the positions' shape → index; "
            "bool of logits' shape → multi_hot; numbers of logits' shape → probabilities)."
        ),
    )
    weight: list[float] | None = Field(None, description="Per-class weights w_c, shape (C,).")
    ignore_index: int | None = Field(
        -100, description="Index targets equal to this are not counted (PyTorch default -100)."
    )
    label_smoothing: float = Field(0.0, ge=0.0, le=1.0, description="q ← (1 − ε)·q + ε/C.")

    @field_validator("weight")
    @classmethod
    def _weights_non_negative(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and any(not (w >= 0.0 and w < float("inf")) for w in value):
            raise ValueError("class weights must be finite and >= 0")
        return value
