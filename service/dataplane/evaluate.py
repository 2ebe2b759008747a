"""Protocol-agnostic data plane: decode → validate → engine → encode.

REST (JSON and protobuf), gRPC and OIP v2 adapters all call these functions; none computes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from types import SimpleNamespace
from typing import Any, TypeVar

import anyio
import numpy as np
import pydantic

import ce_engine
from ce_engine.backend import to_numpy
from ce_engine.errors import (
    BackendUnavailableError,
    InputValidationError,
    NonFiniteResultError,
    set_echo_max_chars,
)
from ce_engine.metrics import metric_family, metrics_by_variant, supported_metrics
from ce_engine.registry import PARAMETER_GRADS
from ce_eval_client.wire import encode_tensor
from service.codecs.tensors import decode_tensor
from service.config import Settings
from service.dataplane.admission import Admission, current_principal
from service.dataplane.buffers import BufferBudget
from service.dataplane.mapped import MAPPED_MAX_ANSWER_BYTES, MappedEvaluator
from service.errors import (
    MalformedBody,
    NonFiniteResult,
    PayloadTooLarge,
    PreconditionFailed,
    ValidationFailed,
    truncate,
)
from service.schemas import EvaluateRequest, LossCatalog, LossInfo
from service.shared_memory import MappedTensor, SharedMemoryRegistry
from service.telemetry import count_in_place, observe_evaluate

T = TypeVar("T")


def validation_error_from_pydantic(
    exc: pydantic.ValidationError, echo_max_chars: int | None = None, prefix: tuple[str, ...] = ()
) -> ValidationFailed:
    """pydantic errors → 422 with ``errors[{loc, msg, type, input}]`` (input echo truncated)."""
    items = []
    for err in exc.errors(include_url=False):
        item: dict[str, Any] = {
            "loc": [*prefix, *err["loc"]],
            "msg": err["msg"],
            "type": err["type"],
        }
        if "input" in err and err["type"] != "missing":
            item["input"] = truncate(err["input"], echo_max_chars)
        items.append(item)
    summary = "; ".join(f"{'.'.join(map(str, i['loc']))}: {i['msg']}" for i in items[:5])
    return ValidationFailed(f"request validation failed: {summary}", items)


def engine_error(exc: ce_engine.EngineError) -> ValidationFailed:
    """Engine errors → service errors (one place)."""
    if isinstance(exc, BackendUnavailableError):
        return PreconditionFailed(
            str(exc), [{"loc": ["backend"], "msg": str(exc), "type": "backend_unavailable"}]
        )
    assert isinstance(exc, InputValidationError)
    kind = NonFiniteResult if isinstance(exc, NonFiniteResultError) else ValidationFailed
    return kind(exc.detail, [e.to_dict() for e in exc.errors])


def parse_evaluate_request(payload: Any, settings: Settings) -> EvaluateRequest:
    if not isinstance(payload, dict):
        raise MalformedBody("the request body must be a JSON object")
    try:
        return EvaluateRequest.model_validate(payload)
    except pydantic.ValidationError as exc:
        raise validation_error_from_pydantic(exc, settings.echo_max_chars) from None


class DataPlane:
    """Stateless evaluation (runs come with the store)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        set_echo_max_chars(settings.echo_max_chars)
        self.admission = Admission(settings.max_inflight)
        self.buffers = BufferBudget(settings.max_buffered_bytes)
        self.compute_limiter = anyio.CapacityLimiter(settings.compute_threads)
        self.key_share = settings.max_inflight_per_key or max(1, settings.compute_threads - 1)
        self._key_limiters: dict[str, anyio.CapacityLimiter] = {}
        workers = settings.shared_memory_workers
        if workers is None:
            workers = settings.compute_threads
        self.mapped = (
            MappedEvaluator(workers, settings.cpu_threads, settings.echo_max_chars, count_in_place)
            if settings.shared_memory and workers
            else None
        )
        self.shared_memory = SharedMemoryRegistry(
            settings.shared_memory,
            settings.shared_memory_max_regions,
            settings.shared_memory_max_bytes,
            maps_logits=self.mapped is not None,
        )
        if self.mapped is not None:
            self.shared_memory.on_drop = self.mapped.forget

    async def in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a compute thread. With auth on, one key holds at most ``key_share``
        of the ``compute_threads`` at once (its further work waits behind its own), so another
        key's request always finds a thread within one evaluation's time."""
        principal = current_principal.get()
        if principal is None:
            return await anyio.to_thread.run_sync(fn, *args, limiter=self.compute_limiter)
        share = self._key_limiters.get(principal)
        if share is None:
            share = self._key_limiters[principal] = anyio.CapacityLimiter(self.key_share)
        async with share:
            return await anyio.to_thread.run_sync(fn, *args, limiter=self.compute_limiter)

    async def run_admitted(self, fn: Callable[..., T], *args: Any) -> T:
        """Run engine work in a worker thread, within the admission bound (else 503)."""
        with self.admission.admit():
            return await self.in_thread(fn, *args)

    def check_work(
        self,
        logits: Any,
        linear: Mapping[str, Any],
        outputs: Sequence[str] = ("loss",),
        *,
        repeat: int = 1,
        extra: float = 0.0,
    ) -> None:
        """413 before any work when the estimated multiply-adds (``estimated_work``, times
        ``repeat`` for work done that many times over the same rows, plus ``extra``) exceed
        ``max_work``."""
        work = extra + repeat * estimated_work(
            logits, linear.get("features"), linear.get("weight"), list(outputs)
        )
        if work > self.settings.max_work:
            raise PayloadTooLarge(
                f"the request needs about {work:.3g} multiply-adds, over the per-request "
                f"compute limit of {self.settings.max_work:.3g}",
                [
                    {
                        "loc": ["outputs" if "hessian" in outputs else "logits"],
                        "msg": "compute limit exceeded",
                        "type": "too_much_work",
                    }
                ],
            )

    def check_response_size(self, sizes: Mapping[str, int], what: str = "the answer") -> None:
        """413 before any work when ``sizes`` (bytes per output or metric, estimated from the
        request) add up to more than ``max_response_bytes``, naming the largest."""
        total = sum(sizes.values())
        if total <= self.settings.max_response_bytes:
            return
        name = max(sizes, key=sizes.__getitem__)
        hint = _RESPONSE_HINTS.get(
            name, "send fewer rows, or a binary encoding (base64, protobuf, OIP binary)"
        )
        msg = (
            f"{what} would hold about {total / 2**20:.1f} MiB ({name!r}: "
            f"{sizes[name] / 2**20:.1f} MiB), over the limit of "
            f"{self.settings.max_response_bytes / 2**20:.1f} MiB; {hint}"
        )
        section = "metrics" if name in _METRIC_CELL_BYTES else "outputs"
        raise PayloadTooLarge(
            msg, [{"loc": [section, name], "msg": msg, "type": "response_too_large"}]
        )

    def decode(self, value: Any, loc: str) -> np.ndarray | None:
        if value is None:
            return None
        return decode_tensor(value, (loc,), self.settings.max_elements)

    def close(self) -> None:
        """Shutdown: unregister every shared-memory region, stop the mapping workers."""
        self.shared_memory.close()
        if self.mapped is not None:
            self.mapped.close()

    def evaluate(self, request: EvaluateRequest, encoding: str | None = None) -> dict[str, Any]:
        """Run one evaluation; ``encoding`` overrides ``request.tensor_encoding`` (e.g. ``raw``)."""
        started = time.perf_counter()
        mapped = request.logits if isinstance(request.logits, MappedTensor) else None
        logits: np.ndarray | MappedTensor | None = mapped or self.decode(request.logits, "logits")
        targets = self.decode(request.targets, "targets")
        linear: dict[str, np.ndarray] = {}
        total = (0 if logits is None else logits.size) + (0 if targets is None else targets.size)
        for name in ("features", "weight", "bias"):  # a loop, not generators: runs every call
            if (value := getattr(request, name)) is not None:
                linear[name] = array = decode_tensor(value, (name,), self.settings.max_elements)
                total += array.size
        if total > self.settings.max_elements:
            raise decode_limit_error(total, self.settings.max_elements)
        self.check_work(logits, linear, request.outputs)
        enc = encoding or request.tensor_encoding
        sizes = estimated_response_bytes(logits, linear, request.outputs, enc)
        sizes.update(
            estimated_metric_bytes(
                request.loss, request.options, request.metrics, num_classes(logits)
            )
        )
        self.check_response_size(sizes)
        if mapped is not None and sum(sizes.values()) > MAPPED_MAX_ANSWER_BYTES:
            logits, mapped = mapped.copy(), None  # cheaper than the answer's way back
        arguments: dict[str, Any] = dict(
            targets=targets,
            options=request.options,
            outputs=request.outputs,
            metrics=request.metrics,
            sample_weight=self.decode(request.sample_weight, "sample_weight"),
            vector=self.decode(request.vector, "vector"),
            backend=request.backend or self.settings.backend,
            **linear,
        )
        if mapped is not None:
            assert self.mapped is not None  # the registry maps logits only with workers
            result = self.mapped.evaluate(mapped, request.loss, arguments)
        else:
            try:
                result = ce_engine.evaluate(request.loss, logits, **arguments)
            except ce_engine.EngineError as exc:
                raise engine_error(exc) from None
        observe_evaluate(result.loss, result.backend, time.perf_counter() - started)
        answer: dict[str, Any] = {
            "loss": result.loss,
            "value": result.value,
            "sum": result.sum,
            "denominator": result.denominator,
            "count": result.count,
            "ignored": result.ignored,
            "reduction": result.reduction,
            "normalization": result.normalization,
            "unit": result.unit,
            "outputs": {k: encode_tensor(to_numpy(v), enc) for k, v in result.outputs.items()},
            "metrics": result.metrics,
            "extras": result.extras,
            "backend": result.backend,
            "compute_dtype": result.compute_dtype,
            "elapsed_ms": (time.perf_counter() - started) * 1000.0,
        }
        if result.non_finite:  # nan_policy propagate / omit: which positions were not finite
            answer["non_finite"] = result.non_finite
        return answer

    async def parse_off_loop(self, body_bytes: int, parse: Callable[[], T]) -> T:
        """``parse()`` (JSON / protobuf decoding and validation of a request) on the loop for
        bodies of at most ``INLINE_BODY_BYTES``, else in a compute thread: its cost grows with
        the body, whatever the logits' size."""
        if body_bytes <= INLINE_BODY_BYTES:
            return parse()
        return await self.in_thread(parse)

    async def evaluate_async(
        self, request: EvaluateRequest, encoding: str | None = None, body_bytes: int = 0
    ) -> dict[str, Any]:
        """:meth:`evaluate` from an event loop, for every adapter, within the admission bound.

        Requests of at most ``INLINE_ELEMENTS`` logits from a body of at most
        ``INLINE_BODY_BYTES`` run on the loop itself: their compute (~0.1 ms) is cheaper than a
        worker-thread hop and the GIL hand-offs it causes under concurrency. Every other one
        (large logits, or tiny logits beside large weights, lists or options) runs in a worker
        thread, at most ``compute_threads`` at once.
        """
        with self.admission.admit():
            if (
                body_bytes <= INLINE_BODY_BYTES
                and declared_elements(request.logits) <= INLINE_ELEMENTS
            ):
                return self.evaluate(request, encoding)
            return await self.in_thread(self.evaluate, request, encoding)

    async def parse_and_evaluate(
        self,
        parse: Callable[[], EvaluateRequest],
        body_bytes: int,
        encoding: str | None = None,
    ) -> dict[str, Any]:
        """``parse()`` then :meth:`evaluate`, from an event loop, within the admission bound: a
        body of at most ``INLINE_BODY_BYTES`` is parsed on the loop (then evaluated as
        :meth:`evaluate_async` decides); a larger one is parsed and evaluated in one
        compute-thread hop, not one each."""
        if body_bytes <= INLINE_BODY_BYTES:
            return await self.evaluate_async(parse(), encoding, body_bytes)
        with self.admission.admit():
            return await self.in_thread(lambda: self.evaluate(parse(), encoding))

    @staticmethod
    def catalog() -> LossCatalog:
        return LossCatalog(
            losses=[
                LossInfo(
                    name=spec.name,
                    summary=spec.summary,
                    formula=spec.formula,
                    options_schema=spec.options_schema(),
                    defaults=spec.defaults(),
                    outputs=sorted(spec.outputs),
                    metrics=list(supported_metrics(spec.name)),
                    metrics_by_variant=metrics_by_variant(spec.name),
                )
                for spec in ce_engine.all_losses().values()
            ]
        )


#: Largest logits (elements) evaluated on the event loop instead of a worker thread.
INLINE_ELEMENTS = 16_384
#: Bodies up to this size are parsed and (with few logits) evaluated on the event loop.
INLINE_BODY_BYTES = 8 * 1024


def declared_elements(value: Any) -> int:
    """Element count a request tensor declares, without decoding it (unknown → a huge number)."""
    if isinstance(value, np.ndarray):
        return int(value.size)
    shape: Any = None
    if isinstance(value, dict):
        shape = value.get("shape")
    elif hasattr(value, "shape") and isinstance(value.shape, list):
        shape = value.shape
    elif isinstance(value, list):
        shape = []
        probe: Any = value
        while isinstance(probe, list):
            shape.append(len(probe))
            probe = probe[0] if probe else None
    if isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape):
        count = 1
        for dim in shape:
            count *= dim
        return count
    return 2**62


#: Bytes one output element takes in an answer, by tensor encoding (JSON lists: the longest
#: float repr plus a comma; base64: 4/3 of the item; raw: the item).
def _bytes_per_element(encoding: str, itemsize: int) -> float:
    if encoding == "list":
        return 25.0 if itemsize > 4 else 16.0
    return itemsize * 4 / 3 if encoding == "base64" else float(itemsize)


_RESPONSE_HINTS = {
    "hessian": "ask for 'hvp' (with a vector) or 'hessian_diag' instead, or send fewer rows",
    "confusion_matrix": "ask for it over fewer classes, or raise CE_EVAL_MAX_RESPONSE_BYTES",
}
#: JSON bytes per cell of the metrics that grow with C²: a float64 repr and a comma.
_METRIC_CELL_BYTES = {"confusion_matrix": 25}


def num_classes(logits: np.ndarray | MappedTensor | None) -> int:
    """C of (N, C, d…) logits; 1 for 1-D ones."""
    return int(logits.shape[1]) if logits is not None and logits.ndim >= 2 else 1


def estimated_metric_bytes(
    loss: str, options: Mapping[str, Any], metrics: Sequence[str], classes: int
) -> dict[str, int]:
    """JSON bytes of the requested metrics that grow with C²: a softmax loss's
    ``confusion_matrix`` has C·C cells (binary / multi-label: L·2·2)."""
    variant = SimpleNamespace(variant=options.get("variant", "sigmoid"))
    cells = 4 * classes if metric_family(loss, variant) == "binary" else classes * classes
    return {
        name: cells * per_cell for name, per_cell in _METRIC_CELL_BYTES.items() if name in metrics
    }


def estimated_response_bytes(
    logits: np.ndarray | MappedTensor | None,
    linear: Mapping[str, np.ndarray],
    outputs: Sequence[str],
    encoding: str,
) -> dict[str, int]:
    """Bytes of each requested output tensor in the answer, from the request alone:
    ``hessian`` N·C·C, ``per_sample`` N, ``grad_features`` / ``grad_weight`` / ``grad_bias``
    their parameter's size, every other output the logits' size N·C (linear: N·C too)."""
    if logits is not None and logits.ndim >= 1:
        size, itemsize = int(logits.size), max(4, logits.dtype.itemsize)
        classes = num_classes(logits)
    elif "features" in linear and "weight" in linear and linear["weight"].ndim == 2:
        classes = int(linear["weight"].shape[0])
        size = int(linear["features"].size // max(1, linear["features"].shape[-1])) * classes
        itemsize = max(4, linear["features"].dtype.itemsize)
    else:
        return {}
    per = _bytes_per_element(encoding, itemsize)
    sizes: dict[str, int] = {}
    for name in outputs:
        if name == "loss":
            continue
        if name == "hessian":
            elements = size * classes
        elif name == "per_sample":
            elements = size // max(1, classes)
        elif name in PARAMETER_GRADS:
            parameter = linear.get(name.removeprefix("grad_"))
            elements = 0 if parameter is None else int(parameter.size)
        else:
            elements = size
        sizes[name] = int(elements * per)
    return sizes


def estimated_work(
    logits: np.ndarray | None,
    features: np.ndarray | None,
    weight: np.ndarray | None,
    outputs: list[str],
) -> int:
    """Multiply-adds a request costs, roughly: N·C·D (linear), N·C² (hessian), else N·C."""
    if features is not None and weight is not None and features.ndim == 2 and weight.ndim == 2:
        return int(features.shape[0]) * int(weight.shape[0]) * int(weight.shape[1])
    if logits is None or logits.ndim == 0:
        return 0
    size = int(logits.size)
    if "hessian" in outputs:
        return size * int(max(logits.shape))
    return size


def decode_limit_error(total: int, limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"the request holds {total} tensor elements, over the limit of {limit}",
        [{"loc": ["logits"], "msg": "too many elements", "type": "too_many_elements"}],
    )
