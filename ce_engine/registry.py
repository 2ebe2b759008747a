"""The loss registry: name → compute function, options model, supported outputs.

One registry drives validation, the `/v1/losses` catalog, the OpenAPI schema, gRPC and docs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal

import pydantic

from ce_engine.errors import MAX_GUESSES, ErrorItem, InputValidationError, unknown_name
from ce_engine.layout import Array, Layout
from ce_engine.options import CommonOptions

if TYPE_CHECKING:
    from ce_engine.metrics.state import MetricState

#: Array outputs every loss may offer; a spec lists the subset it supports.
ALL_OUTPUTS = (
    "loss",
    "per_sample",
    "grad",
    "probabilities",
    "log_probabilities",
    "hessian",
    "hessian_diag",
    "hvp",
    "grad_features",
    "grad_weight",
    "grad_bias",
)

#: Outputs of a loss on logits, up to first order; ``ce_engine.hessian.SECOND_ORDER`` adds
#: the Hessian ones.
LOGIT_OUTPUTS = frozenset({"loss", "per_sample", "grad", "probabilities", "log_probabilities"})

#: Gradients w.r.t. parameters of ``inputs="linear"`` losses: returned in their own shapes.
PARAMETER_GRADS = frozenset({"grad_features", "grad_weight", "grad_bias"})


@dataclass
class LossInputs:
    """What a loss function receives: rows (M, C) in compute dtype plus raw targets."""

    xp: ModuleType
    layout: Layout
    logits: Array  # (M, C), compute dtype, class axis last
    targets: Array  # as sent (xp array), the loss flattens it with `layout`
    options: Any  # the loss's options model instance
    sample_weight: Array | None  # (M,) compute dtype, or None
    exclude: Array | None  # (M,) bool: positions dropped by nan_policy="omit"
    want: frozenset[str]  # requested outputs
    vector: Array | None = None  # (M, C) direction for hvp
    # inputs="linear" losses: logits = features @ weight.T + bias are never formed whole
    features: Array | None = None  # (N, D), compute dtype
    weight: Array | None = None  # (C, D), compute dtype
    bias: Array | None = None  # (C,), compute dtype, or None
    #: (M,) max_c of ``logits`` when the NaN screen computed it (all finite), else None
    row_max: Array | None = None
    #: a fused kernel may fold the reduction's 1/denominator into its derivative arrays
    #: (False when the caller reduces several calls itself, e.g. row chunks)
    fold_reduction: bool = True
    #: metrics for losses that reduce them themselves (``inputs="linear"``: the rows exist
    #: only chunk by chunk); other losses get () and the caller reduces ``logits``
    metrics: tuple[str, ...] = ()


@dataclass
class LossTerms:
    """What a loss function returns, before reduction (all in nats, sample weights applied).

    ``per_sample`` (M,) is s_i·ℓ_i (0 where not counted); ``valid_weight`` (M,) is each
    position's share of the ``valid`` denominator; derivative arrays are of Σ_i per_sample.
    """

    per_sample: Array
    valid_weight: Array
    valid: Array
    arrays: dict[str, Array] = field(default_factory=dict)  # grad, probabilities, …
    extras: dict[str, float] = field(default_factory=dict)  # loss-specific scalars
    #: (M,) per-position companions of ``per_sample`` (e.g. KL's entropy and cross-entropy),
    #: reduced into ``EvaluationResult.extras`` with the loss's own reduction
    per_sample_extras: dict[str, Array] = field(default_factory=dict)
    #: a parameter penalty added to the reduced value as is (e.g. (λ/2)·‖W‖²), and its
    #: gradients, added to the matching outputs after reduction scaling
    penalty: float = 0.0
    penalty_grads: dict[str, Array] = field(default_factory=dict)
    #: True when the derivative arrays already include the reduction's scale (a fused kernel
    #: folds 1/denominator into its one write of the gradient); reduce_terms then leaves them
    derivatives_scaled: bool = False
    #: the merged metric state of ``LossInputs.metrics`` (losses that reduce metrics themselves)
    metric_state: MetricState | None = None
    #: predictions per position that ``count``/``ignored`` count: 1 for softmax losses (one
    #: distribution per position), C for element-wise sigmoid losses (each label is its own)
    predictions_per_position: int = 1


LossFn = Callable[[LossInputs], LossTerms]


@dataclass(frozen=True)
class LossSpec:
    name: str
    compute: LossFn
    options_model: type[CommonOptions]
    outputs: frozenset[str]
    summary: str
    formula: str = ""
    #: "logits": rows of logits; "linear": ``features``, ``weight``, ``bias`` (no logits)
    inputs: Literal["logits", "linear"] = "logits"
    #: True when each logit is an independent sigmoid (a position of only −inf is then valid)
    elementwise: Callable[[Any], bool] = lambda options: False

    def parse_options(self, options: Mapping[str, Any] | CommonOptions | None) -> Any:
        """Validate raw options against the loss's model (errors located under ``options``)."""
        if isinstance(options, self.options_model):
            return options
        if isinstance(options, CommonOptions):
            options = options.model_dump(exclude_unset=True)
        if not options:  # the defaults: models are frozen, so one validated instance serves all
            return _defaults(self.options_model)
        try:
            return self.options_model.model_validate(dict(options or {}))
        except pydantic.ValidationError as exc:
            raise InputValidationError(
                [
                    self._option_error(e, i < MAX_GUESSES)
                    for i, e in enumerate(exc.errors(include_url=False))
                ]
            ) from None

    def _option_error(self, error: Any, guess: bool) -> ErrorItem:
        """One pydantic error → an item under ``options``; an unknown key names the option meant
        (when ``guess``)."""
        if error["type"] == "extra_forbidden" and len(error["loc"]) == 1:
            name = error["loc"][0]
            fields = self.options_model.model_fields
            msg = unknown_name("option", name, fields, owner=self.name, guess=guess)
            return ErrorItem(("options", name), msg, "unknown_option")
        return ErrorItem(("options", *error["loc"]), error["msg"], error["type"])

    def defaults(self) -> dict[str, Any]:
        return self.options_model().model_dump()

    def options_schema(self) -> dict[str, Any]:
        return self.options_model.model_json_schema()


REGISTRY: dict[str, LossSpec] = {}


@functools.cache
def _defaults(model: type[CommonOptions]) -> CommonOptions:
    return model()


def register(spec: LossSpec) -> LossSpec:
    if spec.name in REGISTRY:
        raise ValueError(f"loss {spec.name!r} registered twice")
    unknown = spec.outputs - set(ALL_OUTPUTS)
    if unknown:
        raise ValueError(f"loss {spec.name!r} declares unknown outputs {sorted(unknown)}")
    REGISTRY[spec.name] = spec
    return spec


def get_loss(name: str) -> LossSpec:
    import ce_engine.losses  # noqa: F401  (registers the built-in losses)

    try:
        return REGISTRY[name]
    except KeyError:
        raise InputValidationError.single(
            ("loss",), unknown_name("loss", name, sorted(REGISTRY)), "unknown_loss"
        ) from None


def all_losses() -> dict[str, LossSpec]:
    import ce_engine.losses  # noqa: F401

    return dict(REGISTRY)
