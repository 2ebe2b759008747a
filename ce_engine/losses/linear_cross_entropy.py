"""Softmax cross-entropy of a linear layer, z = X Wᵀ + b, computed in row chunks.

The (N, C) logits are never materialised whole: each chunk of rows forms its logits, runs
:func:`ce_engine.losses.cross_entropy.cross_entropy` on them (same options: weights,
ignore_index, label smoothing, temperature, target formats) and folds the logits gradient G
into dX = G W, dW += Gᵀ X, db += Σ_rows G. Peak extra memory is O(chunk·C + C·D).
Metrics (``ce_engine.metrics.LINEAR_METRICS``) are reduced from each chunk's logits to a
mergeable state and merged over the chunks, so they add O(N) per-row temporaries, no (N, C).
Reference: the fused linear cross-entropy of Liger-Kernel / Apple's Cut Cross-Entropy
(Wijmans et al. 2024), here without a custom kernel.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from ce_engine.dtypes import compute_dtype, is_floating
from ce_engine.errors import ErrorItem, InputValidationError
from ce_engine.layout import Array, Layout
from ce_engine.losses._common import first_true, resolve_target_format
from ce_engine.losses.cross_entropy import cross_entropy
from ce_engine.metrics.check import check_request
from ce_engine.metrics.softmax import softmax_metric_state
from ce_engine.metrics.state import MetricState
from ce_engine.options import LinearCrossEntropyOptions
from ce_engine.registry import LossInputs, LossSpec, LossTerms, register

FORMULA = (
    "z = X Wᵀ + b,  ℓ_i = cross_entropy(z_i, y_i),  J = reduce(ℓ) + (λ/2)‖W‖²;  "
    "G = ∂reduce/∂z (= (P − Y)/N for mean),  dX = G W,  dW = Gᵀ X + λ W,  db = Σ_i G_i"
)


def _tensor(xp: ModuleType, value: Any, loc: str, ndim: int) -> Array:
    if value is None:
        raise InputValidationError.single(
            (loc,), f"`{loc}` is required for linear_cross_entropy", "missing"
        )
    array = np.asarray(value) if not hasattr(value, "dtype") else value
    if array.dtype.kind == "b" or not (is_floating(array.dtype) or array.dtype.kind in "iu"):
        raise InputValidationError.single((loc,), f"{loc} must be numeric", "dtype")
    if array.ndim != ndim:
        raise InputValidationError.single(
            (loc,),
            f"{loc} must have {ndim} dimension(s), got shape {list(array.shape)}",
            "shape_mismatch",
        )
    return array


def _check_finite(xp: ModuleType, array: Array, loc: str) -> None:
    bad = first_true(xp, ~xp.isfinite(array))
    if bad is not None:
        index = tuple(int(i) for i in np.unravel_index(bad, array.shape))
        raise InputValidationError.single(
            (loc, *index), f"{loc} is not finite (nan_policy applies to rows of features)"
        )


def linear_inputs(
    xp: ModuleType,
    logits: Any,
    features: Any,
    weight: Any,
    bias: Any,
    opts: LinearCrossEntropyOptions,
    metrics: list[str],
    targets: Any = None,
) -> tuple[Layout, np.dtype[Any], Array | None, dict[str, Array | None]]:
    """Validate X (N, D), W (C, D), b (C,) → (layout of (N, C), compute dtype, exclude, arrays);
    ``metrics`` are checked against the loss before any logits are formed.

    NaN/inf in a row of X is handled by ``nan_policy`` (raise | omit the row | propagate);
    W and b must be finite unless ``propagate``.
    """
    if logits is not None:
        raise InputValidationError.single(
            ("logits",),
            "linear_cross_entropy takes `features`, `weight` and `bias`, not logits",
            "unexpected",
        )
    x = _tensor(xp, features, "features", 2)
    w = _tensor(xp, weight, "weight", 2)
    if w.shape[1] != x.shape[1]:
        raise InputValidationError.single(
            ("weight",),
            f"weight must have shape [C, {x.shape[1]}] to match features {list(x.shape)}, "
            f"got {list(w.shape)}",
            "shape_mismatch",
        )
    b = None if bias is None else _tensor(xp, bias, "bias", 1)
    if b is not None and b.shape[0] != w.shape[0]:
        raise InputValidationError.single(
            ("bias",),
            f"bias must have shape [{w.shape[0]}] (classes of weight), got {list(b.shape)}",
            "shape_mismatch",
        )
    if opts.class_axis not in (-1, 1):
        raise InputValidationError.single(
            ("options", "class_axis"), "the logits X Wᵀ + b have classes on axis -1", "value_error"
        )
    cdt = compute_dtype(x.dtype)
    x, w = (xp.asarray(a).astype(cdt, copy=False) for a in (x, w))
    b = None if b is None else xp.asarray(b).astype(cdt, copy=False)
    layout = Layout.of((x.shape[0], w.shape[0]), -1)
    if metrics and targets is not None:
        targets = np.asarray(targets) if not hasattr(targets, "dtype") else targets
        fmt = resolve_target_format(opts.target_format, targets, layout)
        check_request(metrics, "linear_cross_entropy", opts, fmt, layout.num_classes)
    exclude = None
    if opts.nan_policy != "propagate":
        for array, loc in ((w, "weight"), (b, "bias")):
            if array is not None:
                _check_finite(xp, array, loc)
        if opts.nan_policy == "raise":
            _check_finite(xp, x, "features")
        else:
            exclude = ~xp.all(xp.isfinite(x), axis=-1)
            x = xp.where(exclude[:, None], 0, x)
    return layout, cdt, exclude, {"features": x, "weight": w, "bias": b}


def _shifted(exc: InputValidationError, start: int) -> InputValidationError:
    """Move ``targets`` error locations of a chunk to the whole batch."""
    items = []
    for e in exc.errors:
        loc = e.loc
        if len(loc) > 1 and loc[0] == "targets" and isinstance(loc[1], int):
            loc = (loc[0], loc[1] + start, *loc[2:])
        items.append(ErrorItem(loc, e.msg, e.type))
    return InputValidationError(items)


MIN_CHUNK_ELEMENTS = 1 << 16
"""Floor of the elements per chunk: smaller ``chunk_elements`` run as this many, so the Python
loop over chunks and class blocks stays short (N = C = 2048 with ``chunk_elements: 1`` would
otherwise loop N·C times)."""


def linear_cross_entropy(inp: LossInputs) -> LossTerms:
    """Cross-entropy of z = X Wᵀ + b per row, with dX, dW, db, chunked over rows.

    With E = max(``chunk_elements``, ``MIN_CHUNK_ELEMENTS``): rows per chunk = max(1, E // C),
    so at most a few (chunk, C) arrays live at once besides dW (C, D) and a request runs at most
    ⌈N·C / E⌉ + N chunks; dW accumulates in class blocks of max(1, E // D) rows so no
    (C, D) temporary is made. ``l2`` λ adds (λ/2)‖W‖² to the reduced value (``extras.penalty``)
    and λW to dW, unscaled by the reduction. ``inp.metrics`` are reduced per chunk (before the
    loss, which may reuse the chunk's logits) and merged.
    """
    xp, opts, layout = inp.xp, inp.options, inp.layout
    o: LinearCrossEntropyOptions = opts
    x, w, b = inp.features, inp.weight, inp.bias
    assert x is not None and w is not None
    n, d = x.shape
    c = w.shape[0]
    dtype = x.dtype
    fmt = resolve_target_format(o.target_format, inp.targets, layout)
    chunk_opts = o.model_copy(update={"target_format": fmt})
    elements = max(o.chunk_elements, MIN_CHUNK_ELEMENTS)
    rows_per_chunk = max(1, elements // c)
    classes_per_block = max(1, elements // max(d, 1))
    want_grad = inp.want & {"grad_features", "grad_weight", "grad_bias"}
    per_sample = xp.zeros(n, dtype=xp.float64)  # float64 per row, as cross_entropy's
    valid_weight = xp.zeros(n, dtype=xp.float64)
    valid = xp.zeros(n, dtype=bool)
    g_x = xp.zeros((n, d), dtype=dtype) if "grad_features" in want_grad else None
    g_w = xp.zeros((c, d), dtype=dtype) if "grad_weight" in want_grad else None
    g_b = xp.zeros(c, dtype=dtype) if "grad_bias" in want_grad else None
    chunk_want = frozenset({"grad"}) if want_grad else frozenset()
    state: MetricState | None = None
    for start in range(0, n, rows_per_chunk):
        stop = min(n, start + rows_per_chunk)
        xc = x[start:stop]
        z = xc @ w.T
        if b is not None:
            z += b
        if inp.metrics:
            try:
                part_state, _ = softmax_metric_state(
                    inp.metrics,
                    xp,
                    z,
                    inp.targets[start:stop],
                    Layout((stop - start, c), 1),
                    chunk_opts,
                    None if inp.sample_weight is None else inp.sample_weight[start:stop],
                    None if inp.exclude is None else inp.exclude[start:stop],
                    "linear_cross_entropy",
                )
            except InputValidationError as exc:
                raise _shifted(exc, start) from None
            state = part_state if state is None else state.merge(part_state)
        part = LossInputs(
            xp,
            Layout((stop - start, c), 1),
            z,
            inp.targets[start:stop],
            chunk_opts,
            None if inp.sample_weight is None else inp.sample_weight[start:stop],
            None if inp.exclude is None else inp.exclude[start:stop],
            chunk_want,
            fold_reduction=False,  # chunks are reduced together below
        )
        try:
            terms = cross_entropy(part)
        except InputValidationError as exc:
            raise _shifted(exc, start) from None
        per_sample[start:stop] = terms.per_sample
        valid_weight[start:stop] = terms.valid_weight
        valid[start:stop] = terms.valid
        del z
        if not want_grad:
            continue
        g = terms.arrays.pop("grad")
        if g_x is not None:
            g_x[start:stop] = g @ w
        if g_b is not None:
            g_b += g.sum(axis=0)
        if g_w is not None:
            for c0 in range(0, c, classes_per_block):
                c1 = min(c, c0 + classes_per_block)
                g_w[c0:c1] += g[:, c0:c1].T @ xc
        del g, terms
    arrays = {
        k: v
        for k, v in (("grad_features", g_x), ("grad_weight", g_w), ("grad_bias", g_b))
        if v is not None
    }
    penalty, penalty_grads = 0.0, {}
    if o.l2:
        penalty = 0.5 * o.l2 * float(xp.sum(w.astype(np.float64) ** 2))
        if g_w is not None:
            penalty_grads["grad_weight"] = w * dtype.type(o.l2)
    if inp.metrics and state is None:  # no rows: the state of zero positions
        request = check_request(list(inp.metrics), "linear_cross_entropy", chunk_opts, fmt, c)
        state = MetricState.empty(
            request.names, c, request.top_k, o.n_bins, o.log_base, n_thresholds=o.n_thresholds
        )
    return LossTerms(
        per_sample=per_sample,
        valid_weight=valid_weight,
        valid=valid,
        arrays=arrays,
        penalty=penalty,
        penalty_grads=penalty_grads,
        metric_state=state,
    )


register(
    LossSpec(
        name="linear_cross_entropy",
        compute=linear_cross_entropy,
        options_model=LinearCrossEntropyOptions,
        outputs=frozenset({"loss", "per_sample", "grad_features", "grad_weight", "grad_bias"}),
        summary=(
            "Softmax cross-entropy of a linear layer X Wᵀ + b with dX, dW, db, computed in "
            "row chunks (the (N, C) logits are never formed whole)."
        ),
        formula=FORMULA,
        inputs="linear",
    )
)
