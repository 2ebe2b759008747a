"""Poisson bootstrap paired by example: example-id hashes, set fingerprints, replicate weights
and the replicate state of a run (DESIGN §8).

Example identity
    An example id is an int64 or a string of at most :data:`MAX_ID_CHARS` characters. It is
    hashed to two 64-bit words (h1, h2) that are the same in every process and on every
    platform (no Python ``hash``): an int x (as its 64-bit two's complement) gives
    h1 = splitmix64(x ⊕ τ1), h2 = splitmix64(x ⊕ τ2) — a bijection, so distinct ints never
    share h1; a string s gives the two little-endian halves of
    ``blake2b(b"s:" + utf8(s), digest_size=16)``, so 1 and "1" differ. Without ids, an
    example is (batch id, position): :func:`default_example_hashes`.

Fingerprint
    :class:`Fingerprint` of a set (multiset) of ids: (count, Σ h1 mod 2⁶⁴, Σ h2 mod 2⁶⁴). It is
    order-independent and merges by addition, so two runs can tell whether they saw the same
    examples without storing ids.

Weights
    Example i weighs w_ib ~ Poisson(1) in replicate b (Hanley & MacGibbon 2006; the Poisson
    bootstrap of TensorFlow Model Analysis), from a counter-based generator:
    u_ib = splitmix64(h1_i ⊕ splitmix64(seed · :data:`MAX_REPLICATES` + b)), and
    w_ib = the Poisson(1) inverse CDF of the top 53 bits of u_ib (:func:`poisson_weights`).
    So an example has the same weights in every run with that seed, whatever the batch
    order, split or replica, and replicate b of two runs over the same examples is paired.

Replicate state
    :class:`ReplicateState` keeps, per replicate b, the weighted sums of the run's scalar
    statistics (loss sum and denominator, and for the softmax family those of
    :data:`~ce_engine.metrics.catalog.CI_METRICS`): S_b = Σ_i w_ib x_i, with x_i an example's
    sums over its positions, so merging is addition and :meth:`ReplicateState.compute` gives
    the B replicate values of each metric. Intervals and the gate:
    :mod:`ce_engine.metrics.intervals`.

Metrics with no interval: ``reliability`` (bins), ``confusion_matrix``, the per-class arrays
and their averages (``precision``, ``recall``, ``f1``, ``support``, ``macro_f1``,
``micro_f1``, ``weighted_f1``), the ranking metrics (``auroc``, ``average_precision``,
curves: binned histograms of C × T per replicate would be too large), and every metric of the
binary family (``binary_cross_entropy``, sigmoid ``focal``) and of ``linear_cross_entropy``
(their loss has an interval). The loss interval leaves out a parameter ``penalty``.
"""

from __future__ import annotations

import decimal
import functools
import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt
from threadpoolctl import ThreadpoolController

from ce_engine.backend import to_numpy
from ce_engine.errors import InputValidationError, quoted
from ce_engine.layout import Array, Layout
from ce_engine.losses._common import resolve_target_format
from ce_engine.metrics.catalog import CI_METRICS, metric_family
from ce_engine.metrics.check import check_request
from ce_engine.metrics.softmax import (
    PositionStats,
    batch_positions,
    calibration_bin,
    softmax_position_stats,
    top_k_hit,
)
from ce_engine.metrics.state import LN2, _pack, _unpack, stat_shapes
from ce_engine.options import CommonOptions

U64 = npt.NDArray[np.uint64]

#: Most replicates a run may keep; also the stride of the (seed, replicate) counter.
MAX_REPLICATES = 1000
#: Longest string example id, in characters.
MAX_ID_CHARS = 128

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_INT_TAG1 = np.uint64(0x6A09E667F3BCC908)  # type tags: fractional bits of √2, √3
_INT_TAG2 = np.uint64(0xBB67AE8584CAA73B)
_POSITION_TAG = np.uint64(0x3C6EF372FE94F82B)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
_TWO64 = 1 << 64


def splitmix64(x: Any) -> U64:
    """The splitmix64 output of state ``x`` (uint64, element-wise; a bijection of 2⁶⁴):
    z = x + γ; z = (z ⊕ z≫30)·0xbf58476d1ce4e5b9; z = (z ⊕ z≫27)·0x94d049bb133111eb;
    z ⊕ z≫31, all mod 2⁶⁴ (Steele, Lea & Flood 2014). A new array; in place, one scratch."""
    z = np.array(x, dtype=np.uint64, copy=True, ndmin=1)
    return _mix_in_place(z).reshape(np.shape(x))


def _mix_in_place(z: U64) -> U64:
    scratch = np.empty_like(z)
    z += _GAMMA
    for shift, factor in ((_S30, _MIX1), (_S27, _MIX2)):
        np.right_shift(z, shift, out=scratch)
        z ^= scratch
        z *= factor
    np.right_shift(z, _S31, out=scratch)
    z ^= scratch
    return z


def _bad_ids(msg: str, index: int | None = None, kind: str = "value_error") -> None:
    loc: tuple[str | int, ...] = ("example_ids",) if index is None else ("example_ids", index)
    raise InputValidationError.single(loc, msg, kind)


def _int_hashes(ids: npt.NDArray[np.int64]) -> tuple[U64, U64]:
    x = ids.astype(np.int64, copy=False).view(np.uint64)
    return splitmix64(x ^ _INT_TAG1), splitmix64(x ^ _INT_TAG2)


def _check_strings(ids: list[Any]) -> None:
    for i, text in enumerate(ids):
        if not isinstance(text, str):
            _bad_ids(f"example ids must all be strings or all int64, got {type(text).__name__}", i)
        if len(text) > MAX_ID_CHARS:
            _bad_ids(
                f"example id {quoted(text)} is longer than {MAX_ID_CHARS} characters",
                i,
                "string_too_long",
            )
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            _bad_ids("example id is not valid Unicode (a lone surrogate)", i)


def _string_hashes(ids: list[Any]) -> tuple[U64, U64]:
    try:  # the common case in one pass; any problem is found and named by _check_strings
        strings = all(isinstance(text, str) for text in ids)
        if not strings or max(map(len, ids), default=0) > MAX_ID_CHARS:
            raise ValueError
        digests = b"".join(
            hashlib.blake2b(b"s:" + text.encode("utf-8"), digest_size=16).digest() for text in ids
        )
    except (ValueError, UnicodeEncodeError):
        _check_strings(ids)  # raises, naming the first bad id
        raise
    words = np.frombuffer(digests, dtype="<u8").astype(np.uint64).reshape(-1, 2)
    return words[:, 0].copy(), words[:, 1].copy()


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


def example_id_hashes(ids: Any) -> tuple[U64, U64]:
    """(h1, h2), two (N,) uint64 hashes of the example ids ``ids``: a 1-D array or sequence of
    ints in int64 range or of strings of at most :data:`MAX_ID_CHARS` characters (module
    docstring). :class:`InputValidationError` naming ``example_ids`` otherwise (mixed kinds,
    bools, floats, bytes, another shape, a too-long or non-Unicode string)."""
    if isinstance(ids, np.ndarray):
        arr = ids
    else:
        try:
            arr = np.asarray(list(ids), dtype=object)
        except TypeError:
            _bad_ids("example_ids must be a list of ints or strings", kind="type_error")
    if arr.ndim != 1:
        _bad_ids(f"example_ids must be 1-D, got shape {list(arr.shape)}", kind="shape_mismatch")
    if arr.dtype.kind in "iu":
        if arr.dtype.kind == "u" and arr.size and int(arr.max()) > np.iinfo(np.int64).max:
            _bad_ids("integer example ids must fit in int64")
        return _int_hashes(arr.astype(np.int64))
    if arr.dtype.kind == "U":
        return _string_hashes(arr.tolist())
    if arr.dtype.kind != "O":
        _bad_ids(f"example ids must be int64 or strings, got dtype {arr.dtype}", kind="dtype")
    values = arr.tolist()
    if values and all(_is_int(v) for v in values):
        ints = [int(v) for v in values]
        if not all(-(1 << 63) <= v < (1 << 63) for v in ints):
            _bad_ids("integer example ids must fit in int64")
        return _int_hashes(np.asarray(ints, dtype=np.int64))
    if values and _is_int(values[0]):
        bad = next(i for i, v in enumerate(values) if not _is_int(v))
        _bad_ids(
            f"example ids must all be strings or all int64, got {type(values[bad]).__name__}",
            bad,
        )
    return _string_hashes(values)


def default_example_hashes(batch_id: str, count: int) -> tuple[U64, U64]:
    """(h1, h2) of the default ids (``batch_id``, position 0 … count − 1): with (a1, a2) the
    halves of ``blake2b(b"b:" + utf8(batch_id), digest_size=16)``, h1 = splitmix64(a1 ⊕
    splitmix64(p)) and h2 = splitmix64(a2 ⊕ splitmix64(p ⊕ τ)), distinct within a batch."""
    digest = hashlib.blake2b(b"b:" + batch_id.encode("utf-8"), digest_size=16).digest()
    a1, a2 = (np.uint64(int.from_bytes(digest[i : i + 8], "little")) for i in (0, 8))
    position = np.arange(count, dtype=np.uint64)
    h1 = splitmix64(a1 ^ splitmix64(position))
    return h1, splitmix64(a2 ^ splitmix64(position ^ _POSITION_TAG))


@dataclass(frozen=True)
class Fingerprint:
    """Order-independent fingerprint of a multiset of example ids: ``count`` and the sums mod
    2⁶⁴ of their hashes h1 and h2 (:func:`example_id_hashes`); merge = addition. Equal sets
    give equal fingerprints; different sets differ except with probability ~2⁻¹²⁸."""

    count: int = 0
    sum1: int = 0
    sum2: int = 0

    @classmethod
    def of(cls, h1: Any, h2: Any) -> Fingerprint:
        """The fingerprint of the ids hashed to ``h1``, ``h2`` (uint64 arrays of one length)."""
        a, b = np.asarray(h1, np.uint64), np.asarray(h2, np.uint64)
        if a.shape != b.shape or a.ndim != 1:
            raise ValueError(f"hashes of shapes {a.shape} and {b.shape}, want one (N,)")
        # uint64 sums wrap: exactly the sum mod 2⁶⁴
        return cls(int(a.size), int(a.sum(dtype=np.uint64)), int(b.sum(dtype=np.uint64)))

    def merge(self, other: Fingerprint) -> Fingerprint:
        """The fingerprint of the union (multiset sum) of both id sets."""
        return Fingerprint(
            self.count + other.count,
            (self.sum1 + other.sum1) % _TWO64,
            (self.sum2 + other.sum2) % _TWO64,
        )

    __add__ = merge

    def to_dict(self) -> dict[str, Any]:
        """``{"count": int, "sum1": "decimal", "sum2": "decimal"}`` (JSON-safe: the sums as
        decimal strings, beyond a JSON double's exact range)."""
        return {"count": self.count, "sum1": str(self.sum1), "sum2": str(self.sum2)}

    @classmethod
    def from_dict(cls, data: Any) -> Fingerprint:
        """Inverse of :meth:`to_dict`; ValueError unless a count ≥ 0 and sums in [0, 2⁶⁴)."""
        try:
            count = data["count"]
            sums = [int(str(data[k]), 10) for k in ("sum1", "sum2")]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not an id fingerprint: {exc!r}") from None
        if type(count) is not int or count < 0 or not all(0 <= s < _TWO64 for s in sums):
            raise ValueError("not an id fingerprint: count or sums out of range")
        return cls(count, sums[0], sums[1])


@functools.cache
def poisson_thresholds() -> U64:
    """T_k = ⌈F(k) · 2⁵³⌉ for the Poisson(1) CDF F(k) = e⁻¹ Σ_{j ≤ k} 1/j!, k = 0 … K with
    1 − F(K) < 10⁻¹⁷, computed in 60-digit decimal arithmetic (the same table everywhere).
    With u the top 53 bits of a uniform word, the weight #{k : T_k ≤ u} is Poisson(1) up to the
    2⁻⁵³ resolution of u."""
    ctx = decimal.Context(prec=60)
    term = ctx.exp(decimal.Decimal(-1))
    cdf, scale = decimal.Decimal(0), decimal.Decimal(1 << 53)
    thresholds: list[int] = []
    k = 0
    while True:
        cdf = ctx.add(cdf, term)
        thresholds.append(int(ctx.multiply(cdf, scale).to_integral_value(decimal.ROUND_CEILING)))
        if ctx.subtract(1, cdf) < decimal.Decimal("1e-17"):
            return np.asarray(thresholds, dtype=np.uint64)
        k += 1
        term = ctx.divide(term, k)


def check_replicates(replicates: int, seed: int) -> None:
    """:class:`InputValidationError` naming ``confidence.replicates`` / ``confidence.seed``
    unless 1 ≤ replicates ≤ :data:`MAX_REPLICATES` and 0 ≤ seed < 2⁶³."""
    if type(replicates) is not int or not 1 <= replicates <= MAX_REPLICATES:
        raise InputValidationError.single(
            ("confidence", "replicates"),
            f"replicates must be an integer in [1, {MAX_REPLICATES}], got {quoted(replicates)}",
        )
    if type(seed) is not int or not 0 <= seed < (1 << 63):
        raise InputValidationError.single(
            ("confidence", "seed"), f"seed must be an integer in [0, 2^63), got {quoted(seed)}"
        )


@functools.lru_cache(maxsize=64)
def _replicate_keys(replicates: int, seed: int) -> U64:
    counters = [(seed * MAX_REPLICATES + b) % _TWO64 for b in range(replicates)]
    keys = splitmix64(np.asarray(counters, dtype=np.uint64))
    keys.setflags(write=False)
    return keys


def poisson_weights(h1: Any, replicates: int, seed: int) -> npt.NDArray[np.uint8]:
    """(N, B) uint8 bootstrap weights w_ib ~ Poisson(1) (below 19, the table's size) of the
    examples hashed to ``h1`` (N,): u_ib = splitmix64(h1_i ⊕ splitmix64(seed · MAX_REPLICATES
    + b)) mod 2⁶⁴, w_ib the inverse CDF (:func:`poisson_thresholds`) at the top 53 bits of
    u_ib. Deterministic per (example, replicate, seed); validation as
    :func:`check_replicates`."""
    check_replicates(replicates, seed)
    h = np.asarray(h1, dtype=np.uint64).reshape(-1)
    u = _mix_in_place(h[:, None] ^ _replicate_keys(replicates, seed)[None, :])
    u >>= np.uint64(11)
    return _poisson_inverse_cdf(u)


#: Weights below this are found by comparisons (P(w ≥ 4) ≈ 1.9%), the rest by a search.
_DIRECT = 4


def _poisson_inverse_cdf(u: U64) -> npt.NDArray[np.uint8]:
    """#{k : T_k ≤ u} element-wise: ``searchsorted(T, u, "right")``, ~5× faster as a few
    comparisons for the common small weights and a search for the rare larger ones."""
    thresholds = poisson_thresholds()
    weight = (u >= thresholds[0]).view(np.uint8).copy()
    for k in range(1, _DIRECT):
        weight += (u >= thresholds[k]).view(np.uint8)
    flat = weight.reshape(-1)
    tail = np.flatnonzero(flat == _DIRECT)
    flat[tail] = np.searchsorted(thresholds, u.reshape(-1)[tail], side="right")
    return weight


# ---------------------------------------------------------------- replicate state


def _replicate_shapes(
    names: tuple[str, ...], top_k: tuple[int, ...], n_bins: int
) -> dict[str, tuple[int, ...]]:
    """Per-replicate statistic shapes: the loss's, then those of the CI metrics ``names``
    (the scalar and bin statistics of :func:`~ce_engine.metrics.state.stat_shapes`)."""
    shapes: dict[str, tuple[int, ...]] = {"loss_sum": (), "loss_denominator": ()}
    if names:
        shapes.update(stat_shapes("softmax", names, 0, top_k, n_bins, 2))
        shapes.pop("count")
    return shapes


@dataclass
class ReplicateState:
    """B bootstrap replicates of a run's scalar statistics; merge = addition.

    ``stats[key]`` is a float64 array (B, *shape): for replicate b, Σ_i w_ib x_i over the
    examples i, x_i the example's sum over its counted positions of ``loss_sum`` (s·ℓ, nats),
    ``loss_denominator`` (its share of the run's denominator: Σ valid weight for
    ``normalization: valid``, 1 for ``batch_size``/``batchmean``, its positions for ``all``),
    and for the metrics ``names`` (softmax, in :data:`~ce_engine.metrics.catalog.CI_METRICS`)
    ``weight`` (s), ``correct``, ``top_k_hits`` (B, K), ``nll``, ``entropy``, ``brier`` and the
    calibration bins ``bin_count``, ``bin_confidence``, ``bin_correct`` (B, n_bins), as in
    :class:`~ce_engine.metrics.state.MetricState`. ``loss_mean``: the loss value is
    sum / denominator (else the sum, for ``reduction: sum`` or ``normalization: none``).
    """

    replicates: int
    names: tuple[str, ...]
    top_k: tuple[int, ...]
    n_bins: int
    log_base: str  # "e" | "2"
    loss_mean: bool = True
    stats: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def empty(
        cls,
        replicates: int,
        names: Iterable[str] = (),
        top_k: Iterable[int] = (1, 5),
        n_bins: int = 15,
        log_base: str = "e",
        *,
        loss_mean: bool = True,
    ) -> ReplicateState:
        """The state of no example (the identity of :meth:`merge`)."""
        names_t = tuple(n for n in names if n in CI_METRICS)
        top_k_t = tuple(top_k)
        shapes = _replicate_shapes(names_t, top_k_t, n_bins)
        stats = {key: np.zeros((replicates, *shape)) for key, shape in shapes.items()}
        return cls(replicates, names_t, top_k_t, n_bins, log_base, loss_mean, stats)

    def _config(self) -> tuple[Any, ...]:
        return (
            self.replicates,
            self.names,
            self.top_k,
            self.n_bins,
            self.log_base,
            self.loss_mean,
        )

    def merge(self, other: ReplicateState) -> ReplicateState:
        """Element-wise sum; ValueError when the states are incompatible."""
        if self._config() != other._config() or self.stats.keys() != other.stats.keys():
            raise ValueError(
                f"cannot merge incompatible replicate states ({self._config()} != "
                f"{other._config()})"
            )
        return replace(self, stats={k: self.stats[k] + other.stats[k] for k in self.stats})

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form; statistics as in ``MetricState.to_dict`` (lists, or zlib base64
        float64 bytes from ``PACKED_STAT_SIZE`` elements)."""
        return {
            "replicates": self.replicates,
            "names": list(self.names),
            "top_k": list(self.top_k),
            "n_bins": self.n_bins,
            "log_base": self.log_base,
            "loss_mean": self.loss_mean,
            "stats": {key: _pack(value) for key, value in self.stats.items()},
        }

    @classmethod
    def from_dict(cls, data: Any) -> ReplicateState:
        """Inverse of :meth:`to_dict`; ValueError when it does not describe a state."""
        try:
            replicates = int(data["replicates"])
            names = tuple(str(n) for n in data["names"])
            top_k = tuple(int(k) for k in data["top_k"])
            n_bins = int(data["n_bins"])
            log_base = str(data["log_base"])
            loss_mean = data["loss_mean"]
            raw = dict(data["stats"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a replicate state: {exc!r}") from None
        if not 1 <= replicates <= MAX_REPLICATES or not 1 <= n_bins <= 10_000:
            raise ValueError("not a replicate state: replicates or n_bins out of range")
        if not isinstance(loss_mean, bool):
            raise ValueError(f"not a replicate state: loss_mean {loss_mean!r}")
        if any(n not in CI_METRICS for n in names) or log_base not in ("e", "2"):
            raise ValueError(f"not a replicate state: names {list(names)} / {log_base!r}")
        if len(top_k) > 64 or any(k < 1 for k in top_k):
            raise ValueError(f"not a replicate state: top_k {list(top_k)}")
        shapes = _replicate_shapes(names, top_k, n_bins)
        if raw.keys() != shapes.keys():
            raise ValueError(f"replicate statistics {sorted(raw)} do not match {sorted(shapes)}")
        stats: dict[str, np.ndarray] = {}
        for key, shape in shapes.items():
            try:
                value = _unpack(raw[key])
            except (TypeError, ValueError, KeyError, OverflowError) as exc:
                raise ValueError(f"replicate statistic {key!r} is not numeric: {exc}") from None
            if not isinstance(value, np.ndarray) or value.shape != (replicates, *shape):
                raise ValueError(f"replicate statistic {key!r} does not have shape {shape}")
            if not np.isfinite(value).all():
                raise ValueError(f"replicate statistic {key!r} is not finite")
            stats[key] = value
        return cls(replicates, names, top_k, n_bins, log_base, loss_mean, stats)

    def compute(self) -> dict[str, Any]:
        """Per replicate, each value as an (B,) float64 array (NaN where a replicate has no
        weight): ``loss``, and of ``names``: ``accuracy``, ``top_k_accuracy`` ({str(k): (B,)}),
        ``nll``, ``perplexity``, ``entropy`` (log_base units), ``brier``, ``ece``, ``mce`` —
        the formulas of :mod:`ce_engine.metrics.softmax` on each replicate's sums."""
        st = self.stats
        scale = 1.0 / LN2 if self.log_base == "2" else 1.0
        loss = _ratio(st["loss_sum"], st["loss_denominator"]) if self.loss_mean else st["loss_sum"]
        out: dict[str, Any] = {"loss": loss * scale}
        if not self.names:
            return out
        weight = st["weight"]
        for name in self.names:
            if name == "accuracy":
                out[name] = _ratio(st["correct"], weight)
            elif name == "top_k_accuracy":
                hits = _ratio(st["top_k_hits"], weight[:, None])
                out[name] = {str(k): hits[:, j] for j, k in enumerate(self.top_k)}
            elif name in ("nll", "entropy"):
                out[name] = _ratio(st[name], weight) * scale
            elif name == "perplexity":
                with np.errstate(over="ignore"):
                    out[name] = np.exp(_ratio(st["nll"], weight))
            elif name == "brier":
                out[name] = _ratio(st["brier"], weight)
            elif name == "ece":
                gap = np.abs(st["bin_correct"] - st["bin_confidence"]).sum(axis=1)
                out[name] = _ratio(gap, weight)
            else:
                assert name == "mce"
                count = st["bin_count"]
                filled = count > 0
                safe = np.where(filled, count, 1.0)
                gaps = np.abs(st["bin_correct"] - st["bin_confidence"]) / safe
                worst = np.where(filled, gaps, -np.inf).max(axis=1)
                out[name] = np.where(filled.any(axis=1), worst, np.nan)
        return out


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, NaN where den is 0 (a replicate that drew no weight)."""
    safe = np.where(den != 0, den, 1.0)
    return np.where(den != 0, num / safe, np.nan)


def _loss_denominators(options: CommonOptions, valid_weight: np.ndarray) -> np.ndarray:
    """(N,) each example's share of the run's loss denominator (see ReplicateState) from the
    (N, T) valid weights of its positions."""
    n, t = valid_weight.shape
    if options.reduction == "batchmean" or options.normalization == "batch_size":
        return np.ones(n)
    if options.normalization == "valid":
        return valid_weight.sum(axis=1)
    return np.full(n, float(t))


def _per_example(values: np.ndarray, example: np.ndarray | None, examples: int) -> np.ndarray:
    """(N, S) sums of the rows of ``values`` (M', S) per example; ``example`` (M',) the
    ascending example of each row (None: the rows are the N examples)."""
    if example is None:
        return values
    out = np.zeros((examples, values.shape[1]))
    if example.size:
        starts = np.flatnonzero(np.r_[True, example[1:] != example[:-1]])
        out[example[starts]] = np.add.reduceat(values, starts, axis=0)
    return out


def _metric_columns(
    xp: ModuleType,
    shapes: dict[str, tuple[int, ...]],
    rows: Array,
    targets: Array,
    layout: Layout,
    options: CommonOptions,
    sample_weight: Array | None,
    exclude: Array | None,
    fmt: str,
    top_k: tuple[int, ...],
    positions: PositionStats | None,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Per counted position: (the columns of the metric statistics in ``shapes`` order but
    the calibration bins; the bins as (bin index, s, s·κ, s·[ŷ = y]) columns, or None; the row
    index of each counted position, or None when all count)."""
    counted = positions or softmax_position_stats(
        shapes, xp, rows, targets, layout, options, sample_weight, exclude, fmt
    )
    w, per_row = counted.weight, counted.per_row
    correct: Array = counted.correct  # set: every CI metric but the label-free ones needs it
    columns: list[Array] = []
    for key in shapes:
        if key in ("loss_sum", "loss_denominator"):
            continue
        if key == "weight":
            columns.append(w[:, None])
        elif key == "correct":
            columns.append((w * correct)[:, None])
        elif key == "top_k_hits":
            columns.append(top_k_hit(xp, per_row["rank"], top_k) * w[:, None])
        elif key in ("nll", "entropy", "brier"):
            columns.append((w * per_row[key].astype(xp.float64))[:, None])
        elif key not in _BIN_KEYS:
            raise AssertionError(f"no replicate column for {key}")
    bins = None
    if "bin_count" in shapes:
        confidence = per_row["confidence"].astype(xp.float64)
        index = calibration_bin(xp, confidence, options.n_bins).astype(xp.float64)
        bins = xp.stack([index, w, w * confidence, w * correct], axis=1)
        bins = to_numpy(bins).astype(np.float64, copy=False)
    values = to_numpy(xp.concatenate(columns, axis=1)).astype(np.float64, copy=False)
    kept = None if counted.kept is None else to_numpy(counted.kept).astype(np.int64)
    return values, bins, kept


_BIN_KEYS = ("bin_count", "bin_confidence", "bin_correct")


def _one_hot_bins(bins: np.ndarray, n_bins: int) -> np.ndarray:
    """(M', 3·n_bins) dense bin columns [count | confidence | correct] of the (M', 4) compact
    (bin index, s, s·κ, s·c) rows."""
    one_hot = bins[:, :1].astype(np.int64) == np.arange(n_bins)[None, :]
    return np.concatenate([one_hot * bins[:, k : k + 1] for k in (1, 2, 3)], axis=1)


def shared_positions(
    loss: str,
    metrics: Iterable[str],
    xp: ModuleType,
    rows: Array | None,
    targets: Array,
    layout: Layout,
    options: CommonOptions,
    sample_weight: Array | None,
    exclude: Array | None,
) -> PositionStats | None:
    """The batch's per-position quantities for both its metric state and its replicates (one
    pass over the rows, not two), or None when no metric of ``metrics`` gets replicates."""
    names = list(metrics)
    if rows is None or metric_family(loss, options) != "softmax":
        return None
    if not any(m in CI_METRICS for m in names):
        return None
    return batch_positions(names, xp, rows, targets, layout, options, sample_weight, exclude, loss)


@functools.cache
def _blas() -> ThreadpoolController:
    return ThreadpoolController()


def _one_blas_thread() -> Any:
    """A context with BLAS on one thread: the (B, N) × (N, S) products are a few million
    multiply-adds, ~0.15 ms on one core, where waking BLAS threads on a busy host costs ~8 ms."""
    return _blas().limit(limits=1, user_api="blas")


@dataclass(frozen=True)
class ExampleStatistics:
    """A batch's per-example sums X (N, S) behind a :class:`ReplicateState` (the columns of
    its statistics in order: loss sum and denominator, then those of ``names``), so that the
    replicates of the whole batch and of any subset of its examples (a slice) are one product
    each, from one pass over the rows.

    With one position per example, each example lies in one calibration bin: ``bins`` (N, 4)
    holds (bin index or −1, s, s·κ, s·c) and ``values`` leaves the 3 · n_bins bin columns
    out, so the product is one small one per bin (~6× fewer multiply-adds with ECE).
    """

    values: np.ndarray
    names: tuple[str, ...]
    top_k: tuple[int, ...]
    n_bins: int
    log_base: str
    loss_mean: bool
    bins: np.ndarray | None = None

    @property
    def examples(self) -> int:
        return int(self.values.shape[0])

    def replicates(self, weights: Any, examples: Any = None) -> ReplicateState:
        """The :class:`ReplicateState` Wᵀ X of the (N, B) bootstrap ``weights``; with
        ``examples`` (indices or an (N,) boolean mask) of those examples only.
        :class:`InputValidationError` naming ``example_ids`` unless W has one row per
        example."""
        w = check_weights(weights, self.examples)
        x, bins = self.values, self.bins
        if examples is not None:
            w, x = w[examples], x[examples]
            bins = None if bins is None else bins[examples]
        if bins is not None:  # examples in bin order, for one product per bin
            order = np.argsort(bins[:, 0], kind="stable")
            w, x, bins = w[order], x[order], bins[order]
        w = w.astype(np.float64)
        # sums beyond float64 become inf, which the caller refuses (a run stores finite states)
        with _one_blas_thread(), np.errstate(over="ignore", invalid="ignore"):
            sums = w.T @ x  # (B, S)
            if bins is not None:
                sums = np.concatenate([sums, self._binned(w, bins)], axis=1)
        state = ReplicateState(
            int(w.shape[1]), self.names, self.top_k, self.n_bins, self.log_base, self.loss_mean
        )
        j = 0
        for key, shape in _replicate_shapes(self.names, self.top_k, self.n_bins).items():
            size = math.prod(shape)
            state.stats[key] = np.ascontiguousarray(sums[:, j : j + size].reshape(-1, *shape))
            j += size
        return state

    def _binned(self, w: np.ndarray, bins: np.ndarray) -> np.ndarray:
        """(B, 3 · n_bins) [count | confidence | correct] replicate sums of the compact bins
        (rows in bin order): per bin j, W_jᵀ (s, s·κ, s·c) over the examples in it."""
        out = np.zeros((w.shape[1], 3, self.n_bins))
        index = bins[:, 0].astype(np.int64)
        ws, xs = w, bins[:, 1:]
        edges = np.searchsorted(index, np.arange(self.n_bins + 1), side="left")
        for j in range(self.n_bins):
            lo, hi = edges[j], edges[j + 1]
            if hi > lo:
                out[:, :, j] = ws[lo:hi].T @ xs[lo:hi]
        return out.reshape(w.shape[1], 3 * self.n_bins)


def check_weights(weights: Any, examples: int) -> np.ndarray:
    """``weights`` as an (examples, B ≥ 1) array; :class:`InputValidationError` naming
    ``example_ids`` otherwise (the ids are what the weights are drawn from)."""
    w = np.asarray(weights)
    if w.ndim != 2 or w.shape[0] != examples or w.shape[1] < 1:
        raise InputValidationError.single(
            ("example_ids",),
            f"expected {examples} example ids, one per batch row; weights of shape {list(w.shape)}",
            "shape_mismatch",
        )
    return w


def example_statistics(
    loss: str,
    xp: ModuleType,
    rows: Array | None,
    targets: Array,
    layout: Layout,
    options: CommonOptions,
    sample_weight: Array | None,
    exclude: Array | None,
    *,
    per_sample: Array,
    valid_weight: Array,
    metrics: Iterable[str],
    positions: PositionStats | None = None,
) -> ExampleStatistics:
    """The batch's :class:`ExampleStatistics`: per example i of the N = ``layout.batch_size``
    (the leading axis of the positions), the sums x_i over its counted positions.

    ``per_sample`` (M,) s·ℓ per position in nats and ``valid_weight`` (M,) its share of the
    ``valid`` denominator are the loss's (``LossTerms``); ``rows`` (M, C) the loss inputs
    (None for linear layers: then no metric has an interval), ``targets``, ``sample_weight``
    and ``exclude`` as for :func:`~ce_engine.metrics.softmax.softmax_metric_state`;
    ``metrics`` the run's metrics, of which those in ``CI_METRICS`` get replicates (softmax
    family only); ``positions`` the batch's ``softmax.batch_positions`` for ``metrics`` when
    already computed (:func:`shared_positions`).
    """
    n = layout.batch_size
    t = layout.num_positions // n if n else 0
    wanted = [m for m in metrics if m in CI_METRICS]
    softmax = metric_family(loss, options) == "softmax" and rows is not None and wanted
    names: tuple[str, ...] = ()
    top_k: tuple[int, ...] = ()
    if softmax:
        target_format = getattr(options, "target_format", None) or "auto"
        fmt = resolve_target_format(target_format, targets, layout)
        request = check_request(wanted, loss, options, fmt, layout.num_classes)
        names, top_k = request.names, request.top_k
    per = to_numpy(per_sample).astype(np.float64).reshape(n, t).sum(axis=1)
    vw = to_numpy(valid_weight).astype(np.float64).reshape(n, t)
    columns = [per[:, None], _loss_denominators(options, vw)[:, None]]
    bins: np.ndarray | None = None
    if names:
        shapes = _replicate_shapes(names, top_k, options.n_bins)
        values, bins, kept = _metric_columns(
            xp,
            shapes,
            rows,
            targets,
            layout,
            options,
            sample_weight,
            exclude,
            fmt,
            top_k,
            positions,
        )
        if bins is not None and t != 1:  # an example's positions fall in several bins
            values = np.concatenate([values, _one_hot_bins(bins, options.n_bins)], axis=1)
            bins = None
        if kept is None and t == 1:
            columns.append(values)
        else:
            example = (np.arange(values.shape[0]) if kept is None else kept) // max(t, 1)
            columns.append(_per_example(values, example, n))
        if bins is not None and kept is not None:  # examples not counted: in no bin
            compact = np.zeros((n, 4))
            compact[:, 0] = -1.0
            compact[kept] = bins
            bins = compact
    loss_mean = not (options.reduction == "sum" or options.normalization == "none")
    return ExampleStatistics(
        np.concatenate(columns, axis=1),
        names,
        top_k,
        options.n_bins,
        options.log_base,
        loss_mean,
        bins,
    )
