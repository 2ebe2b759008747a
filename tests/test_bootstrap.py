"""Poisson bootstrap by example: hashes, fingerprints, weights, replicate states, intervals and
the gate, against plain references written here (Python ints, float64 NumPy loops)."""

from __future__ import annotations

import hashlib
import json
import math
import re
import subprocess
import sys
from fractions import Fraction
from functools import reduce
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ce_engine
from ce_engine.errors import InputValidationError
from ce_engine.layout import Layout
from ce_engine.metrics.bootstrap import (
    MAX_REPLICATES,
    Fingerprint,
    ReplicateState,
    default_example_hashes,
    example_id_hashes,
    example_statistics,
    poisson_thresholds,
    poisson_weights,
    splitmix64,
)
from ce_engine.metrics.catalog import CI_METRICS
from ce_engine.metrics.intervals import (
    bound_verdict,
    delta_ci,
    gate_verdict,
    percentile_ci,
    replicate_intervals,
)
from ce_engine.registry import get_loss

MASK = (1 << 64) - 1
CI_NAMES = ["accuracy", "top_k_accuracy", "nll", "perplexity", "entropy", "brier", "ece", "mce"]


# ---------------------------------------------------------------- plain references


def ref_splitmix64(x: int) -> int:
    """splitmix64 of state x in Python ints (Steele, Lea & Flood 2014)."""
    z = (x + 0x9E3779B97F4A7C15) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def ref_poisson(u53: int) -> int:
    """Poisson(1) inverse CDF at u = u53 / 2⁵³ with a float64 CDF."""
    k, p = 0, math.exp(-1.0)
    cdf = p
    while u53 / 2.0**53 >= cdf:
        k += 1
        p /= k
        cdf += p
    return k


def ref_weight(h1: int, b: int, seed: int) -> int:
    key = ref_splitmix64((seed * 1000 + b) & MASK)
    return ref_poisson(ref_splitmix64(h1 ^ key) >> 11)


def ref_rows(z: np.ndarray, y: np.ndarray, n_bins: int = 15) -> dict[str, np.ndarray]:
    """Per-example float64 quantities of the softmax metrics (no ties in z)."""
    z = np.asarray(z, np.float64)
    log_p = z - z.max(axis=1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    p = np.exp(log_p)
    ar = np.arange(len(y))
    onehot = np.eye(z.shape[1])[y]
    confidence = p.max(axis=1)
    rank = (z > z[ar, y][:, None]).sum(axis=1)
    return {
        "correct": (z.argmax(axis=1) == y).astype(float),
        "nll": -log_p[ar, y],
        "entropy": -(p * log_p).sum(axis=1),
        "brier": ((p - onehot) ** 2).sum(axis=1),
        "top1": (rank < 1).astype(float),
        "top5": (rank < 5).astype(float),
        "confidence": confidence,
        "bin": np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1),
    }


def ref_replicates(rows: dict[str, np.ndarray], w: np.ndarray, n_bins: int = 15) -> dict[str, Any]:
    """The plain Poisson bootstrap: each metric recomputed per replicate b with weights w[:, b]."""
    out: dict[str, list[float]] = {k: [] for k in ("accuracy", "nll", "brier", "ece", "top5")}
    for b in range(w.shape[1]):
        wb = w[:, b].astype(float)
        total = wb.sum()
        out["accuracy"].append(float((wb * rows["correct"]).sum() / total))
        out["nll"].append(float((wb * rows["nll"]).sum() / total))
        out["brier"].append(float((wb * rows["brier"]).sum() / total))
        out["top5"].append(float((wb * rows["top5"]).sum() / total))
        ece = 0.0
        for j in range(n_bins):
            inside = rows["bin"] == j
            ece += abs(
                (wb * rows["correct"])[inside].sum() - (wb * rows["confidence"])[inside].sum()
            )
        out["ece"].append(ece / total)
    return {k: np.asarray(v) for k, v in out.items()}


def data(n: int, c: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    z = rng.normal(size=(n, c))
    z[np.arange(n), y] += 1.0  # a model better than chance
    return z, y


def replicates_of(
    z: np.ndarray, y: np.ndarray, ids: Any, b: int = 200, seed: int = 0, **kw: Any
) -> ReplicateState:
    h1, _ = example_id_hashes(ids)
    result = ce_engine.evaluate(
        "cross_entropy",
        z,
        y,
        metrics=kw.pop("metrics", CI_NAMES),
        replicate_weights=poisson_weights(h1, b, seed),
        **kw,
    )
    assert result.replicate_state is not None
    return result.replicate_state


# ---------------------------------------------------------------- hashes and fingerprints


def test_splitmix64_matches_the_reference_and_the_published_first_output() -> None:
    assert int(splitmix64(0)) == 0xE220A8397B1DCDAF  # splitmix64 seeded 0, first output
    xs = np.random.default_rng(1).integers(0, 2**63, 500, dtype=np.int64).astype(np.uint64)
    xs[:3] = [0, MASK, 1 << 63]
    assert splitmix64(xs).tolist() == [ref_splitmix64(int(x)) for x in xs]


def test_int_and_string_hashes_match_plain_references() -> None:
    ints = [0, 1, -1, 2**63 - 1, -(2**63), 12345]
    h1, h2 = example_id_hashes(np.asarray(ints, np.int64))
    for x, a, b in zip(ints, h1.tolist(), h2.tolist(), strict=True):
        assert a == ref_splitmix64((x & MASK) ^ 0x6A09E667F3BCC908)
        assert b == ref_splitmix64((x & MASK) ^ 0xBB67AE8584CAA73B)
    assert example_id_hashes(ints)[0].tolist() == h1.tolist()  # a list of ints is the same
    as_objects = np.asarray([np.int64(x) for x in ints], dtype=object)
    assert example_id_hashes(as_objects)[0].tolist() == h1.tolist()
    assert example_id_hashes(np.asarray([0, 1, 12345], np.uint32))[0].tolist() == [
        h1[0],
        h1[1],
        h1[5],
    ]
    strings = ["", "a", "ß-東京", "x" * 128]
    s1, s2 = example_id_hashes(strings)
    for text, a, b in zip(strings, s1.tolist(), s2.tolist(), strict=True):
        digest = hashlib.blake2b(b"s:" + text.encode(), digest_size=16).digest()
        assert (a, b) == (
            int.from_bytes(digest[:8], "little"),
            int.from_bytes(digest[8:], "little"),
        )
    assert example_id_hashes(np.asarray(strings))[0].tolist() == s1.tolist()


def test_int_and_string_ids_differ() -> None:
    assert example_id_hashes([1])[0][0] != example_id_hashes(["1"])[0][0]
    assert example_id_hashes([1])[1][0] != example_id_hashes(["1"])[1][0]


def test_hashes_are_the_same_in_another_process() -> None:
    code = (
        "from ce_engine.metrics.bootstrap import example_id_hashes as f;"
        "print(f(['a','b']+[str(i) for i in range(3)])[0].tolist(), f([7,-7])[1].tolist())"
    )
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={"PYTHONHASHSEED": seed, "PATH": ""},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("1", "2")
    }
    h1 = example_id_hashes(["a", "b", "0", "1", "2"])[0].tolist()
    assert outs == {f"{h1} {example_id_hashes([7, -7])[1].tolist()}\n"}


@pytest.mark.parametrize(
    ("ids", "loc", "kind"),
    [
        (["ok", "x" * 129], ("example_ids", 1), "string_too_long"),
        (["a", 1], ("example_ids", 1), "value_error"),
        ([1, "a"], ("example_ids", 1), "value_error"),
        ([True, False], ("example_ids", 0), "value_error"),
        ([1.0, 2.0], ("example_ids", 0), "value_error"),
        ([2**63], ("example_ids",), "value_error"),
        (np.asarray([2**63], np.uint64), ("example_ids",), "value_error"),
        (np.zeros((2, 2), np.int64), ("example_ids",), "shape_mismatch"),
        (np.asarray([1.5]), ("example_ids",), "dtype"),
        (np.asarray([b"a"]), ("example_ids",), "dtype"),
        (["\ud800"], ("example_ids", 0), "value_error"),
        ([None], ("example_ids", 0), "value_error"),
        (5, ("example_ids",), "type_error"),
    ],
)
def test_bad_example_ids_name_the_field(ids: Any, loc: tuple[Any, ...], kind: str) -> None:
    with pytest.raises(InputValidationError) as exc:
        example_id_hashes(ids)
    assert exc.value.errors[0].loc == loc
    assert exc.value.errors[0].type == kind


def test_empty_ids_hash_to_empty_arrays() -> None:
    h1, h2 = example_id_hashes([])
    assert h1.shape == h2.shape == (0,)
    assert Fingerprint.of(h1, h2) == Fingerprint()


def test_default_ids_are_distinct_per_batch_and_position() -> None:
    a1, a2 = default_example_hashes("batch-a", 1000)
    b1, _ = default_example_hashes("batch-b", 1000)
    assert len(set(a1.tolist())) == len(set(a2.tolist())) == 1000
    assert not set(a1.tolist()) & set(b1.tolist())
    assert default_example_hashes("batch-a", 10)[0].tolist() == a1[:10].tolist()


def test_fingerprint_ignores_order_and_split_and_tells_sets_apart() -> None:
    rng = np.random.default_rng(3)
    ids = [f"ex-{i}" for i in range(500)]
    whole = Fingerprint.of(*example_id_hashes(ids))
    perm = rng.permutation(500)
    cuts = np.sort(rng.choice(np.arange(1, 500), 6, replace=False))
    parts = [
        Fingerprint.of(*example_id_hashes([ids[i] for i in chunk]))
        for chunk in np.split(perm, cuts)
    ]
    assert reduce(Fingerprint.merge, parts[::-1]) == whole == sum(parts, Fingerprint())
    assert whole.count == 500
    h1, h2 = example_id_hashes(ids)
    assert whole.sum1 == sum(h1.tolist()) % 2**64 and whole.sum2 == sum(h2.tolist()) % 2**64
    for other in (ids[:-1], [*ids[:-1], "ex-500"], [*ids, "ex-0"]):
        assert Fingerprint.of(*example_id_hashes(other)) != whole


def test_fingerprint_round_trips_through_json() -> None:
    fp = Fingerprint.of(*example_id_hashes(list(range(1000))))
    text = json.dumps(fp.to_dict())
    assert Fingerprint.from_dict(json.loads(text)) == fp
    assert all(isinstance(v, str) for k, v in fp.to_dict().items() if k != "count")
    bad: Any
    for bad in (
        {"count": -1, "sum1": "0", "sum2": "0"},
        {"count": 1, "sum1": str(2**64), "sum2": "0"},
        {"count": 1, "sum1": "-1", "sum2": "0"},
        {"count": 1.5, "sum1": "0", "sum2": "0"},
        {"count": 1, "sum1": "0x10", "sum2": "0"},
        {"count": 1, "sum1": "0"},
        [],
    ):
        with pytest.raises(ValueError):
            Fingerprint.from_dict(bad)


# ---------------------------------------------------------------- weights


def test_poisson_table_is_the_poisson_cdf() -> None:
    table = poisson_thresholds()
    pmf = [math.exp(-1.0) / math.factorial(k) for k in range(len(table) + 30)]
    cdf = np.cumsum(pmf[: len(table)])
    np.testing.assert_allclose(table.astype(float) / 2.0**53, cdf, rtol=1e-15)
    # exact: e⁻¹ as a rational Taylor sum (error < 1/41! ≈ 3e-50), T_k = ⌈F(k) · 2⁵³⌉
    e_inv = sum(Fraction((-1) ** k, math.factorial(k)) for k in range(41))
    partial = [e_inv * Fraction(1, math.factorial(j)) for j in range(len(table))]
    exact = [math.ceil(sum(partial[: k + 1]) * 2**53) for k in range(len(table))]
    assert table.tolist() == exact
    last = len(table) - 1  # the table stops at the first k whose tail is below 1e-17
    assert sum(pmf[last + 1 :]) < 1e-17 <= sum(pmf[last:])


def test_weights_match_the_plain_counter_based_reference() -> None:
    h1, _ = example_id_hashes([f"id-{i}" for i in range(40)])
    for seed in (0, 7, 2**40):
        w = poisson_weights(h1, 50, seed)
        assert w.shape == (40, 50) and w.dtype == np.uint8
        ref = [[ref_weight(int(h), b, seed) for b in range(50)] for h in h1]
        assert w.tolist() == ref


def test_weights_are_per_example_whatever_the_batch() -> None:
    h1, _ = example_id_hashes(list(range(300)))
    whole = poisson_weights(h1, 100, 5)
    perm = np.random.default_rng(0).permutation(300)
    for chunk in np.array_split(perm, 7):
        assert np.array_equal(poisson_weights(h1[chunk], 100, 5), whole[chunk])
    assert np.array_equal(poisson_weights(h1, 40, 5), whole[:, :40])  # a prefix of replicates
    assert not np.array_equal(poisson_weights(h1, 100, 6), whole)


def test_weights_have_poisson_moments_on_a_million_draws() -> None:
    h1, _ = example_id_hashes(np.arange(5000, dtype=np.int64))
    w = poisson_weights(h1, 200, 0)
    assert w.size == 1_000_000
    assert abs(w.mean() - 1.0) < 0.005  # standard error 0.001
    assert abs(w.var() - 1.0) < 0.01  # standard error ≈ 0.0017
    freq = np.bincount(w.ravel(), minlength=6)[:6] / w.size
    pmf = [math.exp(-1.0) / math.factorial(k) for k in range(6)]
    np.testing.assert_allclose(freq, pmf, atol=0.003)
    corr = np.corrcoef(w[:, :20].T.astype(float))  # replicates independent of each other
    assert np.abs(corr[np.triu_indices(20, 1)]).max() < 0.06  # ≈ 4 standard errors


@pytest.mark.parametrize(
    ("replicates", "seed", "field"),
    [(0, 0, "replicates"), (MAX_REPLICATES + 1, 0, "replicates"), (True, 0, "replicates")],
)
def test_bad_replicates_name_the_field(replicates: Any, seed: Any, field: str) -> None:
    with pytest.raises(InputValidationError) as exc:
        poisson_weights(np.zeros(2, np.uint64), replicates, seed)
    assert exc.value.errors[0].loc == ("confidence", field)


@pytest.mark.parametrize("seed", [-1, 2**63, 1.0, "0"])
def test_bad_seed_names_the_field(seed: Any) -> None:
    with pytest.raises(InputValidationError) as exc:
        poisson_weights(np.zeros(2, np.uint64), 10, seed)
    assert exc.value.errors[0].loc == ("confidence", "seed")


# ---------------------------------------------------------------- replicate state


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"options": {"log_base": "2"}},
        {"options": {"n_bins": 7, "top_k": [1, 3]}},
        {"sample_weight": np.linspace(0.1, 2.0, 64)},
        {"options": {"input_kind": "probabilities"}},
        {"options": {"reduction": "sum"}},
        {"targets": "probabilities"},
        {"options": {"nan_policy": "omit"}, "nan_row": 3},
    ],
)
def test_unit_weights_give_the_point_values(kw: dict[str, Any]) -> None:
    z, y = data(64)
    if kw.get("options", {}).get("input_kind") == "probabilities":
        z = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    if "nan_row" in kw:  # a position left out by nan_policy omit
        z[kw.pop("nan_row"), 0] = np.nan
    if kw.pop("targets", None) == "probabilities":  # dense target distributions
        q = np.random.default_rng(1).random(z.shape)
        y = q / q.sum(axis=1, keepdims=True)
    result = ce_engine.evaluate(
        "cross_entropy", z, y, metrics=CI_NAMES, replicate_weights=np.ones((64, 1)), **kw
    )
    state = result.replicate_state
    assert state is not None and state.replicates == 1
    values = state.compute()
    assert values["loss"][0] == pytest.approx(result.value, rel=1e-12)
    for name in CI_NAMES:
        if name == "top_k_accuracy":
            for k, v in result.metrics[name].items():
                assert values[name][k][0] == pytest.approx(v, rel=1e-12)
        else:
            assert values[name][0] == pytest.approx(result.metrics[name], rel=1e-12), name


@pytest.mark.parametrize(
    "options",
    [
        {"ignore_index": -100},
        {"ignore_index": -100, "normalization": "batch_size"},
        {"ignore_index": -100, "normalization": "all"},
        {"ignore_index": -100, "reduction": "batchmean"},
        {"ignore_index": -100, "normalization": "none"},
        {"ignore_index": -100, "label_smoothing": 0.1, "weight": [1.0, 2.0, 0.5, 1.0, 1.0]},
    ],
)
@pytest.mark.parametrize("t", [1, 6])
def test_sequences_weigh_every_position_of_an_example_alike(
    options: dict[str, Any], t: int
) -> None:
    """(N, T, C) logits: example i's weight multiplies all T of its positions (T = 1: the
    compact calibration bins)."""
    rng = np.random.default_rng(4)
    n, c = 12, 5
    z = rng.normal(size=(n, t, c))
    y = rng.integers(0, c, (n, t))
    y[rng.random((n, t)) < 0.2] = -100
    y[3] = -100  # an example with nothing counted
    w = poisson_weights(example_id_hashes(list(range(n)))[0], 30, 1)
    state = ce_engine.evaluate(
        "cross_entropy", z, y, options=options, metrics=CI_NAMES, replicate_weights=w
    ).replicate_state
    assert state is not None
    values = state.compute()
    for b in range(30):  # reference: the batch repeated w_ib times per example
        rep = np.repeat(np.arange(n), w[:, b])
        ref = ce_engine.evaluate("cross_entropy", z[rep], y[rep], options=options, metrics=CI_NAMES)
        assert values["loss"][b] == pytest.approx(ref.value, rel=1e-10)
        for name in ("accuracy", "nll", "brier", "ece", "mce", "entropy"):
            assert values[name][b] == pytest.approx(ref.metrics[name], rel=1e-10), name


def test_percentile_intervals_equal_the_plain_bootstrap() -> None:
    z, y = data(300)
    ids = [f"img-{i}" for i in range(300)]
    w = poisson_weights(example_id_hashes(ids)[0], 200, 11)
    values = replicates_of(z, y, ids, 200, 11).compute()
    ref = ref_replicates(ref_rows(z, y), w)
    pairs = {"accuracy": values["accuracy"], "nll": values["nll"], "brier": values["brier"]}
    pairs |= {"ece": values["ece"], "top5": values["top_k_accuracy"]["5"]}
    for name, got in pairs.items():
        np.testing.assert_allclose(got, ref[name], rtol=1e-10, err_msg=name)
        lo, hi = np.percentile(ref[name], [2.5, 97.5])
        assert percentile_ci(got, 0.95) == pytest.approx((lo, hi), rel=1e-10)
        lo, hi = np.percentile(ref[name], [5.0, 95.0])
        assert percentile_ci(got, 0.9) == pytest.approx((lo, hi), rel=1e-10)


def test_order_split_and_processes_give_the_same_replicates() -> None:
    z, y = data(400, seed=5)
    ids = np.arange(10_000, 10_400, dtype=np.int64)
    whole = replicates_of(z, y, ids, 100, 3)
    rng = np.random.default_rng(6)
    perm = rng.permutation(400)
    cuts = np.sort(rng.choice(np.arange(1, 400), 9, replace=False))
    chunks = np.split(perm, cuts)
    states = [replicates_of(z[c], y[c], ids[c], 100, 3) for c in chunks]
    # half the batches in another process, its state back through JSON
    code = (
        "import json, sys, numpy as np, ce_engine;"
        "from ce_engine.metrics.bootstrap import example_id_hashes, poisson_weights;"
        "d = json.load(sys.stdin); z = np.asarray(d['z']); y = np.asarray(d['y']);"
        "ids = np.asarray(d['ids'], np.int64);"
        "w = poisson_weights(example_id_hashes(ids)[0], 100, 3);"
        f"r = ce_engine.evaluate('cross_entropy', z, y, metrics={CI_NAMES!r}, "
        "replicate_weights=w); print(json.dumps(r.replicate_state.to_dict()))"
    )
    other = np.concatenate(chunks[5:])
    payload = {"z": z[other].tolist(), "y": y[other].tolist(), "ids": ids[other].tolist()}
    out = subprocess.run(
        [sys.executable, "-c", code], input=json.dumps(payload), capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    remote = ReplicateState.from_dict(json.loads(out.stdout))
    merged = reduce(ReplicateState.merge, [*states[:5][::-1], remote])
    for a, b in ((reduce(ReplicateState.merge, states), whole), (merged, whole)):
        got, want = a.compute(), b.compute()
        np.testing.assert_array_equal(got["accuracy"], want["accuracy"])  # integer sums: exact
        for name in ("loss", "nll", "brier", "ece", "mce", "entropy", "perplexity"):
            np.testing.assert_allclose(got[name], want[name], rtol=1e-12, err_msg=name)
        for name in ("loss", "accuracy", "ece"):
            assert percentile_ci(got[name]) == pytest.approx(percentile_ci(want[name]), 1e-12)


def test_a_slice_of_the_examples_is_that_batch_alone() -> None:
    z, y = data(120, seed=12)
    ids = [f"s{i}" for i in range(120)]
    lang = np.random.default_rng(12).choice(["en", "de", "fr"], 120)
    w = poisson_weights(example_id_hashes(ids)[0], 50, 2)
    result = ce_engine.evaluate("cross_entropy", z, y, metrics=CI_NAMES, replicate_weights=w)
    stats = result.example_statistics
    assert stats is not None and stats.examples == 120
    parts = []
    for value in ("en", "de", "fr"):
        mask = lang == value
        part = stats.replicates(w, mask)
        alone = replicates_of(z[mask], y[mask], np.asarray(ids)[mask], 50, 2)
        for key, array in alone.stats.items():
            np.testing.assert_allclose(part.stats[key], array, rtol=1e-12, atol=1e-12)
        parts.append(part)
    assert result.replicate_state is not None
    for key, array in reduce(ReplicateState.merge, parts).stats.items():
        np.testing.assert_allclose(array, result.replicate_state.stats[key], rtol=1e-12)
    with pytest.raises(InputValidationError):
        stats.replicates(w[:-1])


def test_state_round_trips_through_json_and_rejects_what_is_not_one() -> None:
    z, y = data(50)
    state = replicates_of(z, y, list(range(50)), 300)
    data_ = json.loads(json.dumps(state.to_dict()))
    back = ReplicateState.from_dict(data_)
    assert back.names == tuple(CI_NAMES) and back.replicates == 300
    for key, value in state.stats.items():
        np.testing.assert_array_equal(back.stats[key], value)
    bad_shape = json.loads(json.dumps(data_))
    bad_shape["stats"]["weight"] = [1.0, 2.0]
    bad_name = {**data_, "names": ["confusion_matrix"]}
    bad_count = {**data_, "replicates": 1001}
    bad_flag = {**data_, "loss_mean": "false"}
    nan = json.loads(json.dumps(data_))
    nan["stats"]["loss_sum"][0] = float("nan")
    bad: Any
    no_stats = {**data_, "stats": {}}
    for bad in (bad_shape, bad_name, bad_count, bad_flag, nan, no_stats, {"names": []}):
        with pytest.raises(ValueError):
            ReplicateState.from_dict(bad)
    with pytest.raises(ValueError):
        state.merge(replicates_of(z, y, list(range(50)), 200))


def test_example_statistics_take_the_loss_terms_directly() -> None:
    """Per-position loss terms and the weights, no evaluate."""
    z, y = data(30)
    w = poisson_weights(example_id_hashes(list(range(30)))[0], 20, 0)
    opts = get_loss("cross_entropy").parse_options({"log_base": "2"})
    nll = ref_rows(z, y)["nll"]
    state = example_statistics(
        "cross_entropy",
        np,
        z,
        y,
        Layout.of(z.shape, -1),
        opts,
        None,
        None,
        per_sample=nll,
        valid_weight=np.ones(30),
        metrics=["accuracy", "nll", "confusion_matrix"],
    ).replicates(w)
    values = state.compute()
    wf = w.astype(float)
    np.testing.assert_allclose(values["loss"], (wf.T @ nll) / wf.sum(0) / math.log(2), rtol=1e-12)
    np.testing.assert_allclose(values["nll"], values["loss"], rtol=1e-12)
    with pytest.raises(InputValidationError):
        example_statistics(
            "cross_entropy",
            np,
            z,
            y,
            Layout.of(z.shape, -1),
            opts,
            None,
            None,
            per_sample=nll,
            valid_weight=np.ones(30),
            metrics=[],
        ).replicates(w[:10])


def test_metrics_without_intervals_are_left_out() -> None:
    z, y = data(40)
    names = ["accuracy", "confusion_matrix", "f1", "auroc", "reliability", "macro_f1"]
    state = replicates_of(z, y, list(range(40)), 10, metrics=names)
    assert state.names == ("accuracy",) and set(state.compute()) == {"loss", "accuracy"}
    assert set(CI_METRICS) == set(CI_NAMES)


def test_binary_and_linear_losses_get_a_loss_interval_only() -> None:
    rng = np.random.default_rng(8)
    w = np.ones((20, 1))
    logits, labels = rng.normal(size=(20, 3)), rng.integers(0, 2, (20, 3)).astype(float)
    bce = ce_engine.evaluate(
        "binary_cross_entropy", logits, labels, metrics=["accuracy", "nll"], replicate_weights=w
    )
    assert bce.replicate_state is not None and bce.replicate_state.names == ()
    assert bce.replicate_state.compute()["loss"][0] == pytest.approx(bce.value, rel=1e-12)
    x, weight, y = rng.normal(size=(20, 4)), rng.normal(size=(6, 4)), rng.integers(0, 6, 20)
    lin = ce_engine.evaluate(
        "linear_cross_entropy",
        None,
        y,
        features=x,
        weight=weight,
        metrics=["accuracy"],
        replicate_weights=w,
    )
    assert lin.replicate_state is not None and lin.replicate_state.names == ()
    assert lin.replicate_state.compute()["loss"][0] == pytest.approx(lin.value, rel=1e-9)


@pytest.mark.parametrize("shape", [(19, 4), (20,), (20, 0)])
def test_weights_of_the_wrong_shape_name_example_ids(shape: tuple[int, ...]) -> None:
    z, y = data(20)
    with pytest.raises(InputValidationError) as exc:
        ce_engine.evaluate("cross_entropy", z, y, replicate_weights=np.ones(shape))
    assert exc.value.errors[0].loc == ("example_ids",)


def test_a_replicate_without_weight_is_undefined_and_skipped() -> None:
    state = ReplicateState.empty(3, ["accuracy", "mce"])
    state.stats["weight"][:] = [0.0, 2.0, 4.0]
    state.stats["correct"][:] = [0.0, 1.0, 3.0]
    values = state.compute()
    assert np.isnan(values["accuracy"][0]) and np.isnan(values["mce"]).all()
    assert percentile_ci(values["accuracy"], 0.5) == pytest.approx((0.5625, 0.6875))
    assert all(math.isnan(x) for x in percentile_ci(values["mce"]))
    intervals = replicate_intervals(values, 0.5)
    assert intervals["mce"] == [None, None] and intervals["accuracy"] == [0.5625, 0.6875]


# ---------------------------------------------------------------- deltas and the gate


def test_paired_delta_is_narrower_and_is_the_bootstrap_of_differences() -> None:
    rng = np.random.default_rng(9)
    z_a, y = data(500, seed=9)
    z_b = z_a + 0.7 * rng.normal(size=z_a.shape)  # a correlated second model
    ids = [f"q{i}" for i in range(500)]
    a = replicates_of(z_a, y, ids).compute()
    b = replicates_of(z_b, y, ids).compute()
    paired = delta_ci(a["accuracy"], b["accuracy"], 0.95)
    unpaired = delta_ci(a["accuracy"], b["accuracy"], 0.95, paired=False)
    assert paired[1] - paired[0] < 0.8 * (unpaired[1] - unpaired[0])
    # the direct bootstrap of the per-example differences, with the same weights
    w = poisson_weights(example_id_hashes(ids)[0], 200, 0).astype(float)
    diff = (z_b.argmax(1) == y).astype(float) - (z_a.argmax(1) == y)
    direct = (w * diff[:, None]).sum(axis=0) / w.sum(axis=0)
    np.testing.assert_allclose(b["accuracy"] - a["accuracy"], direct, atol=1e-15)
    assert paired == pytest.approx(tuple(np.percentile(direct, [2.5, 97.5])), abs=1e-15)
    ref = np.percentile(np.subtract.outer(b["accuracy"], a["accuracy"]), [2.5, 97.5])
    assert unpaired == pytest.approx(tuple(ref), rel=1e-12)
    with pytest.raises(ValueError):
        delta_ci(a["accuracy"], b["accuracy"][:-1])


@pytest.mark.parametrize(
    ("lo", "hi", "margin", "higher", "verdict"),
    [
        (-0.004, 0.01, 0.005, True, "pass"),  # lo > −m
        (-0.005, 0.01, 0.005, True, "inconclusive"),  # lo = −m: not beyond it
        (-0.02, 0.01, 0.005, True, "inconclusive"),
        (-0.02, -0.006, 0.005, True, "fail"),  # hi < −m
        (-0.02, -0.005, 0.005, True, "inconclusive"),
        (0.001, 0.003, 0.0, True, "pass"),
        (-0.001, 0.003, 0.0, True, "inconclusive"),
        (-0.02, 0.009, 0.01, False, "pass"),  # hi < m
        (-0.02, 0.01, 0.01, False, "inconclusive"),
        (0.0, 0.03, 0.01, False, "inconclusive"),
        (0.011, 0.03, 0.01, False, "fail"),  # lo > m
        (math.nan, 0.0, 0.01, True, "inconclusive"),
    ],
)
def test_gate_verdicts(lo: float, hi: float, margin: float, higher: bool, verdict: str) -> None:
    assert gate_verdict(lo, hi, margin, higher) == verdict


def test_gate_margin_must_be_finite_and_not_negative() -> None:
    for margin in (-0.1, math.inf, math.nan):
        with pytest.raises(ValueError):
            gate_verdict(0.0, 1.0, margin, True)


@pytest.mark.parametrize(
    ("lo", "hi", "bounds", "verdict"),
    [
        (0.91, 0.95, {"minimum": 0.9}, "pass"),
        (0.89, 0.95, {"minimum": 0.9}, "inconclusive"),
        (0.80, 0.89, {"minimum": 0.9}, "fail"),
        (0.01, 0.02, {"maximum": 0.05}, "pass"),
        (0.04, 0.06, {"maximum": 0.05}, "inconclusive"),
        (0.06, 0.07, {"maximum": 0.05}, "fail"),
        (0.91, 0.95, {"minimum": 0.9, "maximum": 0.96}, "pass"),
        (0.91, 0.97, {"minimum": 0.9, "maximum": 0.96}, "inconclusive"),
        (0.97, 0.98, {"minimum": 0.9, "maximum": 0.96}, "fail"),
        (math.nan, math.nan, {"minimum": 0.9}, "inconclusive"),
    ],
)
def test_bound_verdicts(lo: float, hi: float, bounds: dict[str, float], verdict: str) -> None:
    assert bound_verdict(lo, hi, **bounds) == verdict


def test_bound_verdict_needs_a_bound_and_levels_are_checked() -> None:
    with pytest.raises(ValueError):
        bound_verdict(0.0, 1.0)
    for level in (0.0, 1.0, 1.5, True, "0.9"):
        with pytest.raises(InputValidationError) as exc:
            percentile_ci([1.0, 2.0], level)  # type: ignore[arg-type]
        assert exc.value.errors[0].loc == ("confidence", "level")


def test_readme_bootstrap_example_runs() -> None:
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    match = re.search(r"<!-- readme-example:bootstrap -->\s*```python\n(.*?)```", text, re.S)
    assert match, "README has no bootstrap example"
    scope: dict[str, Any] = {}
    exec(compile(match.group(1), "README.md", "exec"), scope)
    lo, hi = scope["ci"]
    assert 0.0 < lo < hi < 1.0
    d_lo, d_hi = scope["delta"]
    assert d_lo < d_hi and d_hi - d_lo < hi - lo  # paired: narrower than the metric's own
    assert scope["verdict"] == "fail" and d_hi < -0.01  # as the README says
    assert scope["fingerprint"].count == 2000


@pytest.mark.slow
def test_accuracy_interval_covers_the_truth_about_95_percent_of_the_time() -> None:
    """500 simulated runs of 1000 examples whose prediction is right with probability 0.7:
    the 95% percentile interval of accuracy covers 0.7 in 93–97% of them."""
    rng = np.random.default_rng(2026)
    n, truth = 1000, 0.7
    z = np.tile([2.0, 0.0, 0.0], (n, 1))  # always predicts class 0
    covered = 0
    for run in range(500):
        y = np.where(rng.random(n) < truth, 0, rng.integers(1, 3, n))
        ids = np.arange(run * n, (run + 1) * n, dtype=np.int64)
        values = replicates_of(z, y, ids, 200, 0, metrics=["accuracy"]).compute()
        lo, hi = percentile_ci(values["accuracy"], 0.95)
        covered += lo <= truth <= hi
    assert 465 <= covered <= 485, covered


@pytest.mark.parametrize("level", [0.95, 0.5, 0.9])
def test_replicate_intervals_equal_each_entry_s_own_percentile_interval(level: float) -> None:
    """Entries stacked into one percentile call give each entry's own interval bit for bit;
    entries with undefined replicates, none, or another count are taken one by one."""
    rng = np.random.default_rng(17)
    with_nan = rng.random(200)
    with_nan[[3, 50]] = np.nan
    values = {
        "loss": rng.standard_normal(200) * 3.0,
        "accuracy": rng.random(200),
        "top_k_accuracy": {"1": rng.random(200), "5": with_nan},
        "mce": np.full(200, np.nan),
        "nll": rng.random(199),
        "ece": rng.random(200),
    }
    got = replicate_intervals(values, level)

    def own(reps: np.ndarray) -> list[float | None]:
        kept = reps[~np.isnan(reps)]
        if kept.size == 0:
            return [None, None]
        alpha = 1.0 - level
        lo, hi = np.percentile(kept, [50 * alpha, 100 - 50 * alpha], method="linear")
        return [float(lo), float(hi)]

    assert list(got) == list(values)
    assert got["top_k_accuracy"] == {k: own(v) for k, v in values["top_k_accuracy"].items()}
    for name in ("loss", "accuracy", "mce", "nll", "ece"):
        assert got[name] == own(values[name]), name
