"""``ce_engine.evaluate``: validate → loss → reduce → outputs (DESIGN §2).

Precision: float16/bfloat16/float32 inputs compute in float32 with float64 sums; every loss's
per-position terms are float64 sums (``sum`` and ``denominator`` always float64), softmax
log-sum-exp is taken after the max shift (temperature after the shift) with its sum in
float64, so a per-position loss carries a few float32 ulps of its own size, not of the row
maximum. ``outputs`` come back in the compute dtype.

Non-finite answers, never a silent null:
- where the float64 sums are finite they are answered (a float32 loss beyond float32's range
  included; then ``per_sample``, if requested, is a 422: it cannot hold it);
- weights whose counted sum overflows float64 (the ``valid`` denominator) are a 422
  ``weight_overflow`` naming ``sample_weight`` or ``options.weight``, whatever ``nan_policy``;
- a genuinely non-finite loss (target mass on a class of logit −inf; a product beyond
  float64) is, under ``nan_policy: raise`` (the default), a 422 ``non_finite_result``
  (:class:`~ce_engine.errors.NonFiniteResultError`) naming the first position and the reason;
  under ``propagate`` it is answered as is, under ``omit`` those positions are not counted; both
  list them, with the positions of NaN/+inf inputs, in ``EvaluationResult.non_finite``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ce_engine.backend import get_namespace, to_numpy
from ce_engine.dtypes import BFLOAT16, compute_dtype, is_floating
from ce_engine.errors import (
    MAX_GUESSES,
    ErrorItem,
    InputValidationError,
    NonFiniteResultError,
    unknown_name,
)
from ce_engine.kernels.cpu import row_max
from ce_engine.layout import Array, Layout
from ce_engine.losses._common import first_true, reject_first
from ce_engine.losses.linear_cross_entropy import linear_inputs
from ce_engine.metrics import MetricState, evaluate_metrics
from ce_engine.metrics.bootstrap import (
    ExampleStatistics,
    ReplicateState,
    check_weights,
    example_statistics,
    shared_positions,
)
from ce_engine.options import CommonOptions
from ce_engine.reduction import LN2, derivative_scale, reduction_denominator
from ce_engine.registry import ALL_OUTPUTS, PARAMETER_GRADS, LossInputs, LossTerms, get_loss


@dataclass
class EvaluationResult:
    """Reduced loss plus ``sum``/``denominator`` for exact aggregation across batches.

    ``value`` = sum / denominator for mean/batchmean, = sum for ``sum``, None for ``none`` (and
    for a mean over zero counted weight). ``count``/``ignored`` count predictions: positions for
    softmax losses, labels (positions × C) for element-wise sigmoid losses (binary
    cross-entropy, sigmoid focal), whose 1-D logits of N labels therefore count N.
    """

    loss: str
    value: float | None
    sum: float
    denominator: float
    count: int
    ignored: int
    reduction: str
    normalization: str
    unit: str
    outputs: dict[str, Array] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    metric_state: MetricState | None = None
    backend: str = "numpy"
    compute_dtype: str = "float32"
    extras: dict[str, float] = field(default_factory=dict)
    #: with ``nan_policy`` propagate or omit: the positions whose loss or input was not finite,
    #: ``{"count": k, "positions": [[i, …], …]}`` (the first ``MAX_REPORTED_POSITIONS``); empty
    #: when there were none
    non_finite: dict[str, Any] = field(default_factory=dict)
    #: with ``replicate_weights``: the batch's bootstrap replicates of the loss and of the
    #: metrics that have intervals (``ce_engine.metrics.bootstrap.example_statistics``)
    replicate_state: ReplicateState | None = None
    #: with ``replicate_weights``: the per-example sums behind it, for the replicates of a
    #: subset of the examples (a slice): ``example_statistics.replicates(weights, rows)``
    example_statistics: ExampleStatistics | None = None


def to_backend(xp: Any, array: Any, *, loc: str) -> Array:
    """Host/device array → ``xp`` array; bfloat16 is widened to float32 (CuPy has no bf16)."""
    if array is None:
        raise InputValidationError.single((loc,), "field required", "missing")
    if not hasattr(array, "dtype"):
        try:
            array = np.asarray(array)
        except ValueError as exc:
            raise InputValidationError.single((loc,), f"not a rectangular array: {exc}") from None
    if array.dtype == BFLOAT16:
        if xp is not np:
            # half the bytes over the bus: raw 16-bit words, widened on the device
            raw = xp.asarray(np.ascontiguousarray(array).view(np.uint16))
            return (raw.astype(xp.uint32) << 16).view(xp.float32)
        array = np.asarray(array).astype(np.float32)
    if array.dtype == object:
        raise InputValidationError.single((loc,), "not a numeric array", "dtype")
    return xp.asarray(array)


def _bad_logits(xp: Any, rows: Array, input_kind: str) -> Array:
    """(M, C) mask of inputs that ``nan_policy`` handles: NaN, +inf (any inf for probabilities)."""
    if input_kind == "probabilities":
        return ~xp.isfinite(rows)
    return xp.isnan(rows) | (rows == xp.inf)


def _apply_nan_policy(
    xp: Any, rows: Array, layout: Layout, opts: CommonOptions, softmax_rows: bool = True
) -> tuple[Array, Array | None, Array | None]:
    """Returns (rows, exclude mask or None, row maxima or None); raises on bad input for
    ``raise``. The row maxima (M,) come back when the screen computed them and every row
    passed: kernels reuse them instead of reading the logits once more.

    With ``softmax_rows`` a position whose logits are all −inf is bad too (p is undefined).
    """
    if opts.nan_policy == "propagate":
        return rows, None, None
    if opts.input_kind != "probabilities" and rows.size:
        # one read, no (M, C) masks: a row's max is NaN, +inf or −inf exactly when the row
        # holds a NaN or +inf or is all −inf; the full masks below only locate the culprit
        peak = row_max(rows) if xp is np else xp.max(rows, axis=-1)
        if bool(xp.isfinite(peak).all()):
            return rows, None, peak
    bad = _bad_logits(xp, rows, opts.input_kind)
    bad_rows = bad.any(axis=-1)
    if softmax_rows and opts.input_kind != "probabilities":
        bad_rows |= xp.all(rows == -xp.inf, axis=-1)
    if opts.nan_policy == "raise":
        reject_first(
            xp, bad, rows, layout, "logits", "logit is {value} (nan_policy='raise')", "non_finite"
        )
        bad_row = first_true(xp, bad_rows)
        if bad_row is not None:
            raise InputValidationError.single(
                ("logits", *layout.position(bad_row)),
                "all logits of this position are -inf",
                "non_finite",
            )
        return rows, None, None
    if not bool(bad_rows.any()):
        return rows, None, None
    return xp.where(bad_rows[:, None], 0, rows), bad_rows, None


def _sample_weight(xp: Any, sw: Any, layout: Layout, dtype: Any) -> Array | None:
    if sw is None:
        return None
    s = to_backend(xp, sw, loc="sample_weight")
    shape = tuple(s.shape)
    if shape == (layout.batch_size,) and layout.positions_shape:
        s = xp.broadcast_to(
            s.reshape((layout.batch_size,) + (1,) * (len(layout.positions_shape) - 1)),
            layout.positions_shape,
        )
    elif shape != layout.positions_shape:
        raise InputValidationError.single(
            ("sample_weight",),
            f"sample_weight must have shape [{layout.batch_size}] or "
            f"{list(layout.positions_shape)}, got {list(shape)}",
            "shape_mismatch",
        )
    s = layout.to_positions(s)
    if not (is_floating(s.dtype) or s.dtype.kind in "iub"):
        raise InputValidationError.single(("sample_weight",), "not a numeric array", "dtype")
    wide = s.astype(xp.float64, copy=False)
    bad = first_true(xp, ~xp.isfinite(wide) | (wide < 0))
    if bad is not None:
        raise InputValidationError.single(
            ("sample_weight", *layout.position(bad)),
            "sample weights must be finite and >= 0",
            "sample_weight",
        )
    with np.errstate(over="ignore"):
        s = s.astype(dtype, copy=False)
    bad = first_true(xp, ~xp.isfinite(s))
    if bad is not None:
        raise InputValidationError.single(
            ("sample_weight", *layout.position(bad)),
            f"sample weight {float(wide[bad])} is beyond the range of {np.dtype(dtype).name} "
            "(the compute dtype): send float64 logits",
            "sample_weight",
        )
    return s


def _check_outputs(
    requested: Iterable[str], supported: frozenset[str], loss: str
) -> frozenset[str]:
    want = []
    errors: list[ErrorItem] = []
    for i, name in enumerate(requested):
        if name not in ALL_OUTPUTS:
            guess = len(errors) < MAX_GUESSES
            msg = unknown_name("output", name, sorted(supported), owner=loss, guess=guess)
            errors.append(ErrorItem(("outputs", i), msg, "unknown_output"))
        elif name not in supported:
            errors.append(
                ErrorItem(
                    ("outputs", i),
                    f"output {name!r} is not supported for {loss}; supported: "
                    f"{', '.join(sorted(supported))}",
                    "unsupported_output",
                )
            )
        want.append(name)
    if errors:
        raise InputValidationError(errors)
    return frozenset(want)


def _no_linear_inputs(loss: str, **tensors: Any) -> None:
    given = [name for name, value in tensors.items() if value is not None]
    if given:
        raise InputValidationError.single(
            (given[0],),
            f"`{given[0]}` is only for linear-layer losses (linear_cross_entropy), not {loss}",
            "unexpected",
        )


#: Most positions listed in ``EvaluationResult.non_finite`` (the count covers them all).
MAX_REPORTED_POSITIONS = 100
_RAISE_HINT = " (nan_policy 'raise'; 'propagate' answers it, 'omit' leaves the position out)"


def _check_denominator(
    xp: Any, terms: LossTerms, opts: CommonOptions, sample_weight: Array | None
) -> None:
    """422 naming the weights when the ``valid`` denominator Σ_i s_i·w_{y_i} overflows float64."""
    if opts.reduction != "mean" or opts.normalization != "valid":
        return
    with np.errstate(over="ignore"):
        total = float(terms.valid_weight.sum(dtype=np.float64))
    if math.isfinite(total):
        return
    loc: tuple[str, ...] = ("sample_weight",)
    with np.errstate(over="ignore"):
        own_sum_finite = sample_weight is None or math.isfinite(
            float(sample_weight.sum(dtype=np.float64))
        )
    if own_sum_finite and getattr(opts, "weight", None) is not None:
        loc = ("options", "weight")
    raise InputValidationError.single(
        loc,
        f"the weights of the counted positions sum to {total} in float64: the mean's "
        "denominator is not finite; scale the weights down",
        "weight_overflow",
    )


def _raise_non_finite(
    xp: Any, per_sample: Array, bad: Array, layout: Layout, rows: Array | None, s: Array | None
) -> None:
    """422 ``non_finite_result`` at the first position whose loss (or running sum) is not
    finite, with the reason."""
    first = first_true(xp, bad)
    if first is None:  # every term is finite, their float64 sum is not
        running = xp.cumsum(per_sample.astype(xp.float64))
        first = first_true(xp, ~xp.isfinite(running))
        assert first is not None
        raise NonFiniteResultError.single(
            ("logits", *layout.position(first)),
            "the sum of the per-position losses overflows float64 at this position" + _RAISE_HINT,
            "non_finite_result",
        )
    value = float(per_sample[first])
    loc: tuple[str | int, ...] = ("logits", *layout.position(first))
    if math.isnan(value):
        reason = "the loss at this position is NaN"
    elif rows is not None and bool(xp.any(rows[first] == -xp.inf)):
        reason = (
            f"the loss at this position is {value}: the target puts mass on a class of "
            "probability 0 (a -inf entry of logits)"
        )
    elif s is not None and float(s[first]) > 1.0:
        reason = f"the loss at this position times its sample weight {float(s[first])} is {value}"
        loc = ("sample_weight", *layout.position(first))
    else:
        reason = f"the loss at this position is {value}: it overflows float64"
    raise NonFiniteResultError.single(loc, reason + _RAISE_HINT, "non_finite_result")


def _check_finite_answer(
    xp: Any, result: EvaluationResult, outputs: tuple[str, ...], layout: Layout
) -> None:
    """422 ``non_finite_result`` where a finite float64 sum still gives a non-finite answer: a
    mean that overflows, an extra, or a per-position loss beyond the compute dtype's range."""
    if result.value is not None and not math.isfinite(result.value):
        raise NonFiniteResultError.single(
            ("logits",),
            f"the mean overflows float64: sum {result.sum} / denominator {result.denominator}",
            "non_finite_result",
        )
    for name, extra in result.extras.items():
        if not math.isfinite(extra):
            raise NonFiniteResultError.single(
                ("logits",), f"extras.{name} is {extra}" + _RAISE_HINT, "non_finite_result"
            )
    per = result.outputs.get("per_sample")
    if per is not None:
        bad = first_true(xp, ~xp.isfinite(per))
        if bad is not None:
            raise NonFiniteResultError.single(
                ("outputs", list(outputs).index("per_sample")),
                f"per_sample at position {list(layout.position(bad))} is beyond the range of "
                f"{per.dtype} (the compute dtype; value and sum are float64): send float64 "
                "logits",
                "non_finite_result",
            )


def _positions(xp: Any, mask: Array, layout: Layout) -> dict[str, Any]:
    """``{"count", "positions"}`` of the True entries of an (M,) mask ({} when none)."""
    flat = to_numpy(xp.nonzero(mask)[0])
    if not flat.size:
        return {}
    listed = [list(layout.position(int(i))) for i in flat[:MAX_REPORTED_POSITIONS]]
    return {"count": int(flat.size), "positions": listed}


#: Largest batches (N·C) the small-batch lane takes (larger ones: the fused kernels).
SMALL_BATCH_ELEMENTS = 16_384
_SMALL_OUTPUTS = frozenset({"loss", "per_sample", "grad"})


@functools.lru_cache(maxsize=64)
def _arange(n: int) -> np.ndarray:
    """0, 1, …, n − 1, read-only (shared between calls)."""
    rows = np.arange(n)
    rows.flags.writeable = False
    return rows


def _small_cross_entropy(
    logits: Any, targets: Any, outputs: Iterable[str], backend: str
) -> EvaluationResult | None:
    """Cross-entropy with default options on a small clean NumPy batch, in a dozen ufuncs.

    Small batches cost more in per-call overhead than in arithmetic, so this lane skips the
    general machinery for the common case: ``cross_entropy`` with no options, (N, C) float32 or
    float64 logits whose row maxima are finite, (N,) integer class ids in [0, C), outputs among
    loss / per_sample / grad, no metrics or weights. Same math as the general path (mean over N,
    ℓ_i = log Σ_c exp(z_ic − m_i) − (z_iy − m_i), ∂/∂z_ij = (p_ij − [j = y_i]) / N, the row
    sums and ℓ_i in float64, p_iy − 1 as −Σ_{c≠y} exp(z_ic − m_i)/Σ_c exp(z_ic − m_i)). Anything
    else, including any input the general path would reject or treat specially (NaN, ±∞
    losses, ignore_index), returns None: the general path answers, with its errors.
    """
    # exact types: subclasses (masked arrays, np.matrix) take the general path, which converts
    if backend not in ("numpy", "auto") or type(logits) is not np.ndarray:
        return None
    if type(targets) is not np.ndarray or logits.dtype.char not in "fd":  # float32, float64
        return None
    want = frozenset(outputs)
    if not want <= _SMALL_OUTPUTS or logits.ndim != 2 or targets.ndim != 1:
        return None
    n, c = logits.shape
    if (
        not 0 < n * c <= SMALL_BATCH_ELEMENTS
        or targets.shape != (n,)
        or targets.dtype.kind not in "iu"
    ):
        return None
    if backend == "auto" and get_namespace("auto")[0] is not np:
        return None
    classes = targets.astype(np.uint64)  # a negative id becomes ≥ 2⁶³: one bound to check
    if int(np.maximum.reduce(classes)) >= c:
        return None
    rows = _arange(n)
    # ufunc methods, not ndarray.max/sum: their Python wrappers cost as much as these reductions
    with np.errstate(all="ignore"):  # a NaN or +inf logit, or an all −inf row, makes ℓ NaN
        shifted = logits - np.maximum.reduce(logits, axis=1, keepdims=True)
        picked = shifted[rows, classes]
        e = np.exp(shifted)
        total = np.add.reduce(e, axis=1, dtype=np.float64)  # the row sums in float64 …
        nll = np.log(total)  # … so is ℓ_i: a confident row's ℓ_i ≪ 1 keeps its precision
        nll -= picked
    loss_sum = float(np.add.reduce(nll))
    if not math.isfinite(loss_sum):  # finite exactly when every ℓ_i is (at most 16k terms)
        return None
    arrays: dict[str, Array] = {}
    if "per_sample" in want:
        arrays["per_sample"] = nll.astype(logits.dtype.type, copy=False)  # native order
    if "grad" in want:
        grad = e
        target = grad[rows, classes] - total  # −Σ_{c≠y} e_c: p_y − 1 without cancellation
        target /= total
        grad *= np.divide(1.0, total, dtype=grad.dtype)[:, None]
        grad[rows, classes] = target
        grad *= grad.dtype.type(1.0 / n)
        arrays["grad"] = grad
    return EvaluationResult(
        loss="cross_entropy",
        value=loss_sum / n,
        sum=loss_sum,
        denominator=float(n),
        count=n,
        ignored=0,
        reduction="mean",
        normalization="valid",
        unit="nats",
        outputs=arrays,
        backend="numpy",
        compute_dtype=logits.dtype.type.__name__,
    )


def evaluate(
    loss: str,
    logits: Any,
    targets: Any,
    *,
    options: Mapping[str, Any] | CommonOptions | None = None,
    outputs: Iterable[str] = ("loss",),
    metrics: Iterable[str] = (),
    sample_weight: Any = None,
    vector: Any = None,
    backend: str = "auto",
    features: Any = None,
    weight: Any = None,
    bias: Any = None,
    metric_values: Iterable[str] | None = None,
    replicate_weights: Any = None,
) -> EvaluationResult:
    """Evaluate ``loss`` on a batch.

    Shapes: logits (N, C) or (N, d1.., C) with classes on ``class_axis``; targets by
    ``target_format``. Returns the reduced loss, ``sum``/``denominator``/``count``, the requested
    ``outputs`` (arrays in the backend's namespace, logits' layout) and ``metrics``.
    Linear-layer losses (``linear_cross_entropy``) take ``features`` (N, D), ``weight`` (C, D)
    and optional ``bias`` (C,) instead of logits (pass ``logits=None``).
    Non-finite results follow the module's rule: 422 under ``nan_policy: raise``, listed in
    ``non_finite`` under ``propagate`` and ``omit``. ``metric_values``: the metrics whose values
    go in ``metrics`` (default all); ``metric_state`` holds every requested one either way (a
    run keeps the state and answers scalars, so it skips e.g. the C × C list).
    ``replicate_weights`` (N, B): the bootstrap weights of the batch's N examples
    (``ce_engine.metrics.bootstrap.poisson_weights``); then ``replicate_state`` holds the
    batch's B replicates of the loss and of the metrics with intervals, and
    ``example_statistics`` the per-example sums behind them (for slices).
    """
    outputs, metric_names = tuple(outputs), list(metrics)
    if (
        loss == "cross_entropy"
        and not options
        and not metric_names
        and sample_weight is None
        and vector is None
        and features is None
        and weight is None
        and bias is None
        and replicate_weights is None
    ):  # no generator: this test runs on every call
        small = _small_cross_entropy(logits, targets, outputs, backend)
        if small is not None:
            return small
    spec = get_loss(loss)
    opts = spec.parse_options(options)
    want = _check_outputs(outputs, spec.outputs, loss)
    xp, backend_name = get_namespace(backend)

    linear: dict[str, Array] = {}
    if spec.inputs == "linear":
        layout, cdt, exclude, linear = linear_inputs(
            xp, logits, features, weight, bias, opts, metric_names, targets
        )
        rows = peak = None
    else:
        _no_linear_inputs(loss, features=features, weight=weight, bias=bias)
        z = to_backend(xp, logits, loc="logits")
        if z.dtype.kind == "b" or not (is_floating(z.dtype) or z.dtype.kind in "iu"):
            raise InputValidationError.single(
                ("logits",), f"logits must be numeric, got {z.dtype}", "dtype"
            )
        cdt = compute_dtype(logits.dtype if hasattr(logits, "dtype") else z.dtype)
        layout = Layout.of(tuple(z.shape), opts.class_axis)
        rows = layout.to_rows(xp, z.astype(cdt, copy=False))
        rows, exclude, peak = _apply_nan_policy(
            xp, rows, layout, opts, softmax_rows=not spec.elementwise(opts)
        )
    t = to_backend(xp, targets, loc="targets")
    s = _sample_weight(xp, sample_weight, layout, cdt)
    v = None
    if vector is not None:
        v_arr = to_backend(xp, vector, loc="vector")
        if tuple(v_arr.shape) != layout.shape:
            raise InputValidationError.single(
                ("vector",),
                f"vector must have the logits' shape {list(layout.shape)}",
                "shape_mismatch",
            )
        v = layout.to_rows(xp, v_arr.astype(cdt, copy=False))
    elif "hvp" in want:
        raise InputValidationError.single(("vector",), "output 'hvp' needs `vector`", "missing")

    def compute(excluded: Array | None) -> LossTerms:
        return spec.compute(
            LossInputs(
                xp,
                layout,
                rows,
                t,
                opts,
                s,
                excluded,
                want,
                v,
                row_max=peak,
                metrics=tuple(metric_names) if spec.inputs == "linear" else (),
                **linear,
            )
        )

    # Non-finite answers (module docstring): weights → 422; a non-finite loss → 422 under
    # nan_policy raise, left out under omit, answered under propagate; both list the positions
    terms = compute(exclude)
    _check_denominator(xp, terms, opts, s)
    result = reduce_terms(terms, layout, opts, spec.name, want, xp, dtype=cdt)
    non_finite = None
    if not math.isfinite(result.sum):
        bad = ~xp.isfinite(terms.per_sample)
        if opts.nan_policy == "raise":
            _raise_non_finite(xp, terms.per_sample, bad, layout, rows, s)
        non_finite = bad
        if opts.nan_policy == "omit" and bool(bad.any()):
            exclude = bad if exclude is None else exclude | bad
            terms = compute(exclude)
            result = reduce_terms(terms, layout, opts, spec.name, want, xp, dtype=cdt)
    if opts.nan_policy == "raise":
        _check_finite_answer(xp, result, outputs, layout)
    if exclude is not None:
        non_finite = exclude if non_finite is None else non_finite | exclude
    if non_finite is not None:
        result.non_finite = _positions(xp, non_finite, layout)
    result.backend = backend_name
    result.compute_dtype = cdt.type.__name__
    positions = None
    if metric_names:
        if terms.metric_state is not None:  # reduced by the loss (linear: chunk by chunk)
            result.metric_state = terms.metric_state
            result.metrics = terms.metric_state.compute(metric_values)
        else:
            if replicate_weights is not None:
                positions = shared_positions(
                    spec.name, metric_names, xp, rows, t, layout, opts, s, exclude
                )
            result.metric_state, result.metrics = evaluate_metrics(
                metric_names,
                xp,
                rows,
                t,
                layout,
                opts,
                s,
                exclude,
                loss=spec.name,
                only=metric_values,
                positions=positions,
            )
    if replicate_weights is not None:
        check_weights(replicate_weights, layout.batch_size)
        result.example_statistics = example_statistics(
            spec.name,
            xp,
            rows,
            t,
            layout,
            opts,
            s,
            exclude,
            per_sample=terms.per_sample,
            valid_weight=terms.valid_weight,
            metrics=metric_names,
            positions=positions,
        )
        result.replicate_state = result.example_statistics.replicates(replicate_weights)
    return result


def reduce_terms(
    terms: LossTerms,
    layout: Layout,
    opts: CommonOptions,
    name: str,
    want: frozenset[str],
    xp: Any,
    dtype: Any = None,
) -> EvaluationResult:
    """Apply ``reduction``/``normalization``/``log_base`` to per-position terms.

    ``sum`` is Σ_i per_sample in float64 (per-position losses may be float64 where the compute
    dtype is float32); ``outputs["per_sample"]`` comes back in ``dtype`` (the compute dtype).
    """
    base_scale = 1.0 / LN2 if opts.log_base == "2" else 1.0
    total = float(terms.per_sample.sum(dtype=np.float64)) * base_scale
    predictions = terms.predictions_per_position
    count = int(terms.valid.sum()) * predictions
    denominator = reduction_denominator(opts, layout, terms.valid_weight)
    if opts.reduction in ("mean", "batchmean"):
        value = total / denominator if denominator > 0 else None
    else:
        value = total if opts.reduction == "sum" else None
    # kernels that fold the scale into their single write of the gradient say so
    grad_scale = 1.0 if terms.derivatives_scaled else derivative_scale(opts, denominator)

    outputs: dict[str, Array] = {}
    for key, arr in terms.arrays.items():
        if key in PARAMETER_GRADS:  # owned by the loss (may be large, e.g. dW): in place
            if grad_scale != 1.0:
                arr *= arr.dtype.type(grad_scale)
            if key in terms.penalty_grads:
                arr += terms.penalty_grads[key]
            outputs[key] = arr
            continue
        if key in ("grad", "hessian", "hessian_diag", "hvp"):
            arr = arr * arr.dtype.type(grad_scale) if grad_scale != 1.0 else arr
        if key in ("hessian",):
            outputs[key] = arr.reshape((*layout.positions_shape, *arr.shape[1:]))
        elif arr.ndim == 2:
            outputs[key] = layout.from_rows(xp, arr)
        else:
            outputs[key] = layout.from_positions(arr)
    extras = {k: v * base_scale for k, v in terms.extras.items()}
    if terms.penalty:
        extras["penalty"] = terms.penalty
        value = value + terms.penalty if value is not None else None
    for key, per_position in terms.per_sample_extras.items():
        extra_total = float(per_position.sum(dtype=np.float64)) * base_scale
        mean_like = opts.reduction in ("mean", "batchmean") and denominator > 0
        extras[key] = extra_total / denominator if mean_like else extra_total
    if "per_sample" in want:
        per = terms.per_sample
        if base_scale != 1.0:
            per = per * base_scale
        if dtype is not None and per.dtype != dtype:
            with np.errstate(over="ignore"):  # beyond float32: inf, caught by the callers
                per = per.astype(dtype)
        outputs["per_sample"] = layout.from_positions(per)
    return EvaluationResult(
        loss=name,
        value=value,
        sum=total,
        denominator=denominator,
        count=count,
        ignored=layout.num_positions * predictions - count,
        reduction=opts.reduction,
        normalization="batch_size" if opts.reduction == "batchmean" else opts.normalization,
        unit="bits" if opts.log_base == "2" else "nats",
        outputs=outputs,
        extras=extras,
    )
