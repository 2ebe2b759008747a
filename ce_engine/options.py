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

MAX_TOP_K = 32
"""Most k values one ``top_k`` list may hold."""


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
    sum_tolerance: float = Field(
        1e-3,
        ge=0,
        description=(
            "Probability inputs of softmax losses: each position's probabilities must sum to "
            "1 within this (else 422); values must lie in [0, 1] (to 1e-6) for every loss."
        ),
    )
    nan_policy: NanPolicy = Field(
        "raise",
        description=(
            "NaN/+inf in inputs, or a non-finite loss (e.g. target mass on a -inf logit): "
            "raise (422 naming the position), propagate (answered; the response lists the "
            "positions in `non_finite`), omit (those positions are not counted, and listed)."
        ),
    )
    top_k: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: [1, 5],
        max_length=MAX_TOP_K,
        description=(
            f"k values for `top_k_accuracy`: at most {MAX_TOP_K}, distinct, each 1 ≤ k ≤ C."
        ),
    )
    n_bins: int = Field(15, ge=1, le=1000, description="Bins for ece/mce/reliability.")
    n_thresholds: int = Field(
        1000,
        ge=2,
        le=100_000,
        description=(
            "Score-histogram bins per class for the ranking metrics of runs (auroc, "
            "average_precision, roc_curve, pr_curve): thresholds linspace(0, 1, n_thresholds). "
            "A stateless evaluation computes them exactly."
        ),
    )
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

    @field_validator("top_k")
    @classmethod
    def _distinct_k(cls, value: list[int]) -> list[int]:
        seen: set[int] = set()
        for k in value:
            if k in seen:
                raise ValueError(f"top_k values must be distinct; {k} appears more than once")
            seen.add(k)
        return value


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


def _non_negative_finite(values: list[float], what: str) -> None:
    if any(not (v >= 0.0 and v < float("inf")) for v in values):
        raise ValueError(f"{what} must be finite and >= 0")


def _threshold_field() -> Any:
    return Field(
        0.5,
        description=(
            "Decision threshold of the threshold metrics (accuracy, f1, …): a label is predicted "
            "where σ(z) > threshold; a number in [0, 1] or one per label (C,)."
        ),
    )


def _check_threshold(value: float | list[float]) -> float | list[float]:
    values = [value] if isinstance(value, float) else value
    if any(not 0.0 <= v <= 1.0 for v in values):
        raise ValueError("threshold must lie in [0, 1]")
    return value


class BinaryCrossEntropyOptions(CommonOptions):
    """Options of sigmoid (multi-label) binary cross-entropy."""

    input_kind: Literal["logits", "probabilities"] = Field(
        "logits", description="What `logits` holds: logits, or probabilities σ(z)."
    )
    weight: list[float] | list[list[Any]] | None = Field(
        None,
        description=(
            "Element weights: per class, shape (C,), or a nested list of the logits' shape."
        ),
    )
    pos_weight: float | list[float] | None = Field(
        None, description="Weight pw of positive labels, a number or per class (C,)."
    )
    label_smoothing: float = Field(0.0, ge=0.0, le=1.0, description="y ← (1 − ε)·y + ε/2.")
    threshold: float | list[float] = _threshold_field()

    _threshold_range = field_validator("threshold")(_check_threshold)

    @field_validator("pos_weight")
    @classmethod
    def _pos_weight_non_negative(cls, value: float | list[float] | None) -> Any:
        if value is not None:
            _non_negative_finite([value] if isinstance(value, float) else value, "pos_weight")
        return value


class FocalOptions(CommonOptions):
    """Options of the focal loss (Lin et al. 2017)."""

    input_kind: Literal["logits"] = Field("logits", description="Focal loss takes logits.")
    variant: Literal["sigmoid", "softmax"] = Field(
        "sigmoid",
        description=(
            "sigmoid: per-label, targets of the logits' shape (torchvision sigmoid_focal_loss); "
            "softmax: one distribution per position, −α_t (1 − p_t)^γ log p_t."
        ),
    )
    alpha: float | list[float] | None = Field(
        0.25,
        description=(
            "Balancing α: a number in [0, 1] or per class (C,); null disables it. Sigmoid: "
            "α_t = α·y + (1 − α)(1 − y); softmax: α_t = α (or α_c of the target class)."
        ),
    )
    gamma: float = Field(2.0, ge=0.0, description="Focusing exponent γ.")
    target_format: Literal["auto", "index", "probabilities"] = Field(
        "auto",
        description="softmax variant: index (class ids) or probabilities; sigmoid: 0/1 or soft.",
    )
    ignore_index: int | None = Field(
        -100, description="softmax variant, index targets equal to this are not counted."
    )
    threshold: float | list[float] = _threshold_field()

    _threshold_range = field_validator("threshold")(_check_threshold)

    @field_validator("alpha")
    @classmethod
    def _alpha_range(cls, value: float | list[float] | None) -> Any:
        if value is not None:
            values = [value] if isinstance(value, float) else value
            if any(not 0.0 <= v <= 1.0 for v in values):
                raise ValueError("alpha must lie in [0, 1]")
        return value


class KLDivergenceOptions(CommonOptions):
    """Options of KL(q ‖ p)."""

    reduction: Reduction = Field(
        "batchmean", description="batchmean (default: Σ KL / N), mean, sum or none."
    )
    target_kind: Literal["probabilities", "logits", "log_probabilities"] = Field(
        "probabilities",
        description=(
            "How targets give q: probabilities, logits (q = softmax(t / T)) or "
            "log-probabilities (PyTorch log_target=True)."
        ),
    )


class MulticlassHingeOptions(CommonOptions):
    """Options of the multi-class hinge loss."""

    input_kind: Literal["logits"] = Field(
        "logits", description="Hinge losses take scores (logits)."
    )
    variant: Literal["weston_watkins", "crammer_singer"] = Field(
        "weston_watkins",
        description=(
            "weston_watkins: Σ_{j≠y} max(0, m − z_y + z_j); "
            "crammer_singer: max(0, m + max_{j≠y} z_j − z_y)."
        ),
    )
    margin: float = Field(1.0, ge=0.0, description="Margin m.")
    ignore_index: int | None = Field(
        -100, description="Targets equal to this are not counted (PyTorch default -100)."
    )


class LinearCrossEntropyOptions(CrossEntropyOptions):
    """Options of softmax cross-entropy on a linear layer's output z = X Wᵀ + b."""

    input_kind: Literal["logits"] = Field("logits", description="The logits are X Wᵀ + b.")
    l2: float = Field(
        0.0, ge=0.0, description="L2 penalty λ: adds (λ/2)·‖W‖² to the value and λ·W to dW."
    )
    chunk_elements: int = Field(
        1 << 23,
        ge=1,
        description=(
            "Row chunk size in logits elements (rows = max(1, E // C), "
            "E = max(chunk_elements, 65536))."
        ),
    )
