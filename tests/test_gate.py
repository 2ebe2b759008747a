"""The regression gate and run comparison (service.dataplane.gate) on runs built here from plain
arrays: per-example correctness and losses of two models, Poisson(1) bootstrap weights drawn
with NumPy, replicate values Σ_i w_ib x_i / Σ_i w_ib written out. Intervals are checked against
``numpy.percentile`` of replicate differences computed directly; verdicts against the rule
written plainly (pass iff lo > −m, fail iff hi < −m, …)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import orjson
import pytest

from ce_engine.metrics.bootstrap import Fingerprint
from service.dataplane.gate import (
    MAX_CHECKS,
    Check,
    RunReplicates,
    compare_deltas,
    direction,
    paired,
    parse_checks,
    parse_gate_request,
    run_gate,
)
from service.errors import ValidationFailed

N, B, LEVEL = 400, 200, 0.95
SAME_IDS = Fingerprint(N, 1, 2)


# ---------------------------------------------------------------- runs from plain arrays


def weights(seed: int, n: int = N, b: int = B) -> np.ndarray:
    """(n, b) Poisson(1) bootstrap weights."""
    return np.random.default_rng(seed).poisson(1.0, size=(n, b)).astype(np.float64)


def replicate_means(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """(b,) Σ_i w_ib x_i / Σ_i w_ib, NaN where a replicate drew no weight."""
    total = w.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (w * x[:, None]).sum(axis=0) / total, np.nan)


def make_run(
    run_id: str,
    correct: np.ndarray,
    loss: np.ndarray,
    w: np.ndarray | None,
    *,
    seed: int = 0,
    fingerprint: Fingerprint | None = SAME_IDS,
    paired_ids: bool = True,
    lang: np.ndarray | None = None,
) -> RunReplicates:
    """A run with ``value`` (mean loss), ``accuracy`` and ``entropy`` (= the loss here, a
    metric with no direction); replicates from ``w`` (None: a run without confidence); one
    slice per value of ``lang``."""
    values = {
        "value": float(loss.mean()),
        "accuracy": float(correct.mean()),
        "entropy": float(loss.mean()),
        "macro_f1": 0.5,  # a metric without an interval
    }
    reps: dict[str, np.ndarray] = {}
    if w is not None:
        reps = {
            "value": replicate_means(loss, w),
            "accuracy": replicate_means(correct, w),
            "entropy": replicate_means(loss, w),
        }
    slices: dict[tuple[str, str], RunReplicates] = {}
    if lang is not None:
        for name in np.unique(lang):
            keep = lang == name
            slices[("lang", str(name))] = make_run(
                run_id,
                correct[keep],
                loss[keep],
                None if w is None else w[keep],
                seed=seed,
                fingerprint=Fingerprint(int(keep.sum()), 7, 9),
                paired_ids=paired_ids,
            )
    return RunReplicates(
        run_id=run_id,
        values=values,
        replicates=reps,
        level=LEVEL,
        seed=seed,
        count=0 if w is None else w.shape[1],
        fingerprint=fingerprint,
        paired_ids=paired_ids,
        slices=slices,
    )


def two_models(shift: float = 0.0, seed: int = 5) -> tuple[np.ndarray, ...]:
    """Correlated per-example results of a baseline and a candidate: the candidate is right
    where the baseline is, except on a few examples (``shift`` > 0: better)."""
    rng = np.random.default_rng(seed)
    base_correct = (rng.random(N) < 0.8).astype(np.float64)
    flip = rng.random(N) < 0.05
    cand_correct = np.where(flip, 1.0 - base_correct, base_correct)
    gain = rng.random(N) < abs(shift)
    cand_correct = np.where(gain, 1.0 if shift > 0 else 0.0, cand_correct)
    base_loss = rng.gamma(2.0, 0.3, N)
    cand_loss = base_loss + rng.normal(0.0, 0.05, N) - shift * 0.5
    lang = np.where(rng.random(N) < 0.3, "de", "en")
    return base_correct, cand_correct, base_loss, cand_loss, lang


def percentile(x: np.ndarray) -> list[float]:
    x = x[~np.isnan(x)]
    lo, hi = np.percentile(x, [2.5, 97.5])
    return [float(lo), float(hi)]


def plain_verdict(ci: list[float], margin: float, higher: bool) -> str:
    lo, hi = ci
    if higher:
        return "pass" if lo > -margin else "fail" if hi < -margin else "inconclusive"
    return "pass" if hi < margin else "fail" if lo > margin else "inconclusive"


@pytest.fixture
def pair() -> tuple[RunReplicates, RunReplicates, dict[str, np.ndarray]]:
    bc, cc, bl, cl, lang = two_models()
    w = weights(11)
    base = make_run("run_base", bc, bl, w, lang=lang)
    cand = make_run("run_cand", cc, cl, w, lang=lang)
    return cand, base, {"bc": bc, "cc": cc, "bl": bl, "cl": cl, "lang": lang, "w": w}


def checks(*raw: dict[str, Any]) -> list[Check]:
    return parse_checks(list(raw))


# ---------------------------------------------------------------- paired()


def test_paired_needs_ids_seed_count_and_fingerprint_alike() -> None:
    x = np.zeros(N)
    w = weights(1, b=10)
    a = make_run("a", x, x, w)
    assert paired(a, make_run("b", x, x, w))
    assert not paired(a, make_run("b", x, x, w, paired_ids=False))
    assert not paired(make_run("a", x, x, w, paired_ids=False), make_run("b", x, x, w))
    assert not paired(a, make_run("b", x, x, w, seed=1))
    assert not paired(a, make_run("b", x, x, weights(1, b=11)))
    assert not paired(a, make_run("b", x, x, w, fingerprint=Fingerprint(N, 1, 3)))
    assert not paired(a, make_run("b", x, x, w, fingerprint=None))
    assert not paired(make_run("a", x, x, None), make_run("b", x, x, None))


def test_direction_of_the_loss_top_k_and_entropy() -> None:
    assert direction("value") is False and direction("ece") is False
    assert direction("accuracy") is True and direction("top_k_accuracy.5") is True
    assert direction("entropy") is None and direction("macro_f1") is None


# ---------------------------------------------------------------- intervals and verdicts


def test_paired_delta_interval_is_the_bootstrap_of_per_example_differences(pair: Any) -> None:
    cand, base, a = pair
    answer = run_gate(cand, base, checks({"metric": "accuracy", "max_decrease": 0.02}))
    assert answer["paired"] is True and answer["replicates"] == B and answer["level"] == LEVEL
    (check,) = answer["checks"]
    # δ_b = Σ w_ib (c_B,i − c_A,i) / Σ w_ib: the bootstrap of per-example differences
    direct = percentile(replicate_means(a["cc"] - a["bc"], a["w"]))
    assert check["ci"] == pytest.approx(direct, abs=1e-12)
    assert check["paired"] is True
    assert check["value"] == pytest.approx(a["cc"].mean())
    assert check["baseline"] == pytest.approx(a["bc"].mean())
    assert check["delta"] == pytest.approx(a["cc"].mean() - a["bc"].mean())
    assert check["verdict"] == plain_verdict(direct, 0.02, True)
    assert check["kind"] == "max_decrease" and check["margin"] == 0.02 and check["bound"] is None


def test_unpaired_delta_interval_is_that_of_every_difference() -> None:
    bc, cc, bl, cl, _ = two_models()
    wa, wb = weights(1), weights(2)
    base = make_run("run_base", bc, bl, wa, seed=0)
    cand = make_run("run_cand", cc, cl, wb, seed=1)
    answer = run_gate(cand, base, checks({"metric": "value", "max_increase": 0.05}))
    assert answer["paired"] is False
    (check,) = answer["checks"]
    ra, rb = replicate_means(bl, wa), replicate_means(cl, wb)
    every = np.array([y - x for x in ra for y in rb])
    assert check["ci"] == pytest.approx(percentile(every), abs=1e-12)
    assert check["paired"] is False
    assert check["verdict"] == plain_verdict(percentile(every), 0.05, False)


def test_paired_interval_is_narrower_than_unpaired_on_correlated_models() -> None:
    bc, cc, bl, cl, _ = two_models()
    w = weights(3)
    base = make_run("a", bc, bl, w)
    gate = checks({"metric": "accuracy", "max_decrease": 0.01})
    paired_ci = run_gate(make_run("b", cc, cl, w), base, gate)["checks"][0]["ci"]
    unpaired_ci = run_gate(make_run("b", cc, cl, w, seed=9), base, gate)["checks"][0]["ci"]
    assert paired_ci[1] - paired_ci[0] < 0.5 * (unpaired_ci[1] - unpaired_ci[0])


@pytest.mark.parametrize("where", ["below", "inside", "above"])
def test_verdicts_follow_the_margin_against_the_interval(pair: Any, where: str) -> None:
    """Margins placed from the directly computed interval [lo, hi] of δ."""
    cand, base, a = pair
    lo, hi = percentile(replicate_means(a["cc"] - a["bc"], a["w"]))
    # max_decrease m: pass iff lo > −m; fail iff hi < −m
    margin = {"below": max(0.0, -lo) + 0.01, "inside": -(lo + hi) / 2, "above": -hi - 0.001}
    m = margin[where]
    if m < 0:
        pytest.skip("δ interval lies above 0: no margin ≥ 0 makes this case")
    answer = run_gate(cand, base, checks({"metric": "accuracy", "max_decrease": m}))
    expected = plain_verdict([lo, hi], m, True)
    assert answer["checks"][0]["verdict"] == expected
    assert answer["passed"] is (expected == "pass")


def test_a_clear_regression_fails_and_a_clear_gain_passes() -> None:
    bc, _, bl, _, _ = two_models()
    w = weights(4)
    base = make_run("a", bc, bl, w)
    worse = make_run("b", bc * (np.arange(N) % 5 != 0), bl + 0.2, w)  # −20 % of hits, +0.2 loss
    gate = checks(
        {"metric": "accuracy", "max_decrease": 0.01}, {"metric": "value", "max_increase": 0.01}
    )
    answer = run_gate(worse, base, gate)
    assert [c["verdict"] for c in answer["checks"]] == ["fail", "fail"]
    assert answer["passed"] is False
    better = make_run("b", np.maximum(bc, np.arange(N) % 5 == 0), bl - 0.2, w)
    answer = run_gate(better, base, gate)
    assert [c["verdict"] for c in answer["checks"]] == ["pass", "pass"]
    assert answer["passed"] is True


def test_min_and_max_test_the_candidates_own_interval(pair: Any) -> None:
    cand, base, a = pair
    lo, hi = percentile(replicate_means(a["cc"], a["w"]))
    gate = checks(
        {"metric": "accuracy", "min": lo - 0.01},  # pass: lo > min
        {"metric": "accuracy", "min": hi + 0.01},  # fail: hi < min
        {"metric": "accuracy", "max": (lo + hi) / 2},  # inconclusive: straddles
        {"metric": "entropy", "max": 100.0},  # no direction: bounds only
    )
    answer = run_gate(cand, base, gate)
    got = answer["checks"]
    assert [c["verdict"] for c in got] == ["pass", "fail", "inconclusive", "pass"]
    assert got[0]["ci"] == pytest.approx([lo, hi], abs=1e-12)
    assert got[0]["delta"] is None and got[0]["margin"] is None
    assert got[0]["bound"] == pytest.approx(lo - 0.01) and got[0]["kind"] == "min"
    assert got[0]["baseline"] == pytest.approx(a["bc"].mean())
    assert answer["passed"] is False


def test_slice_checks_use_the_slices_replicates(pair: Any) -> None:
    cand, base, a = pair
    de = a["lang"] == "de"
    answer = run_gate(
        cand, base, checks({"metric": "value", "slice": "lang=de", "max_increase": 0.5})
    )
    (check,) = answer["checks"]
    direct = percentile(replicate_means(a["cl"][de] - a["bl"][de], a["w"][de]))
    assert check["slice"] == "lang=de" and check["paired"] is True
    assert check["ci"] == pytest.approx(direct, abs=1e-12)
    assert check["value"] == pytest.approx(a["cl"][de].mean())
    assert check["verdict"] == plain_verdict(direct, 0.5, False)


def test_inconclusive_counts_as_pass_only_when_allowed(pair: Any) -> None:
    cand, base, a = pair
    lo, hi = percentile(replicate_means(a["cc"], a["w"]))
    gate = checks({"metric": "accuracy", "min": (lo + hi) / 2})
    strict = run_gate(cand, base, gate)
    lenient = run_gate(cand, base, gate, allow_inconclusive=True)
    assert strict["checks"][0]["verdict"] == lenient["checks"][0]["verdict"] == "inconclusive"
    assert strict["passed"] is False and strict["allow_inconclusive"] is False
    assert lenient["passed"] is True and lenient["allow_inconclusive"] is True


def test_runs_without_confidence_are_inconclusive_with_a_reason() -> None:
    bc, cc, bl, cl, _ = two_models()
    base = make_run("run_base", bc, bl, None)
    cand = make_run("run_cand", cc, cl, weights(1))
    gate = checks({"metric": "accuracy", "max_decrease": 0.5}, {"metric": "accuracy", "min": 0.0})
    answer = run_gate(cand, base, gate)
    delta, bound = answer["checks"]
    assert delta["verdict"] == "inconclusive" and delta["ci"] is None
    assert "run_base" in delta["reason"] and "confidence" in delta["reason"]
    assert delta["delta"] == pytest.approx(cc.mean() - bc.mean())
    assert bound["verdict"] == "pass" and bound["reason"] is None  # the candidate has a CI
    assert answer["paired"] is False and answer["passed"] is False
    assert run_gate(cand, base, gate, allow_inconclusive=True)["passed"] is True
    none = run_gate(base, cand, checks({"metric": "accuracy", "min": 0.0}))
    assert none["replicates"] == 0 and none["checks"][0]["verdict"] == "inconclusive"


def test_metrics_without_interval_or_defined_replicates_are_inconclusive(pair: Any) -> None:
    cand, base, _ = pair
    answer = run_gate(cand, base, checks({"metric": "macro_f1", "min": 0.1}))
    assert answer["checks"][0]["verdict"] == "inconclusive"
    assert "no bootstrap interval" in answer["checks"][0]["reason"]
    empty = RunReplicates(
        "e", {"accuracy": None}, {"accuracy": np.full(B, np.nan)}, LEVEL, 0, B, None, False
    )
    answer = run_gate(empty, empty, checks({"metric": "accuracy", "max_decrease": 0.1}))
    (check,) = answer["checks"]
    assert check["verdict"] == "inconclusive" and check["ci"] is None
    assert check["value"] is None and check["delta"] is None and "undefined" in check["reason"]


def test_the_answer_is_strict_json(pair: Any) -> None:
    cand, base, _ = pair
    gate = checks(
        {"metric": "accuracy", "max_decrease": 0.005},
        {"metric": "value", "slice": "lang=de", "max_increase": 0.02},
        {"metric": "entropy", "max": 0.1},
    )
    answer = run_gate(cand, base, gate)
    text = orjson.dumps(answer)
    assert orjson.loads(text) == answer
    assert set(answer) == {
        "run_id", "baseline", "passed", "paired", "level", "replicates",
        "allow_inconclusive", "checks",
    }  # fmt: skip
    assert all(
        set(c) == {
            "metric", "slice", "kind", "margin", "bound", "value", "baseline", "delta", "ci",
            "paired", "verdict", "reason",
        }
        for c in answer["checks"]
    )  # fmt: skip


# ---------------------------------------------------------------- bad checks: 422 naming them


def _locs(exc: pytest.ExceptionInfo[ValidationFailed]) -> list[list[Any]]:
    assert exc.value.status_code == 422
    return [e["loc"] for e in exc.value.errors]


@pytest.mark.parametrize(
    ("check", "loc"),
    [
        ({"metric": "accuracy"}, ["body", "checks", 0]),
        ({"metric": "accuracy", "min": 0.1, "max": 0.9}, ["body", "checks", 0, "max"]),
        ({"metric": "accuracy", "max_decrease": -0.1}, ["body", "checks", 0, "max_decrease"]),
        ({"metric": "accuracy", "max_decrease": math.inf}, ["body", "checks", 0, "max_decrease"]),
        ({"metric": "accuracy", "min": math.nan}, ["body", "checks", 0, "min"]),
        ({"metric": "accuracy", "min": "0.7"}, ["body", "checks", 0, "min"]),
        ({"metric": "accuracy", "min": True}, ["body", "checks", 0, "min"]),
        ({"metric": "ece", "max_decrease": 0.01}, ["body", "checks", 0, "max_decrease"]),
        ({"metric": "value", "max_decrease": 0.01}, ["body", "checks", 0, "max_decrease"]),
        ({"metric": "accuracy", "max_increase": 0.01}, ["body", "checks", 0, "max_increase"]),
        ({"metric": "entropy", "max_increase": 0.01}, ["body", "checks", 0, "max_increase"]),
        ({"metric": "", "min": 0.1}, ["body", "checks", 0, "metric"]),
        ({"metric": 3, "min": 0.1}, ["body", "checks", 0, "metric"]),
        ({"min": 0.1}, ["body", "checks", 0, "metric"]),
        ({"metric": "accuracy", "slice": "lang", "min": 0.1}, ["body", "checks", 0, "slice"]),
        ({"metric": "accuracy", "slice": "=de", "min": 0.1}, ["body", "checks", 0, "slice"]),
        ({"metric": "accuracy", "slice": 3, "min": 0.1}, ["body", "checks", 0, "slice"]),
        ({"metric": "accuracy", "min": 0.1, "margin": 2}, ["body", "checks", 0, "margin"]),
        ("accuracy:-0.1", ["body", "checks", 0]),
    ],
)
def test_each_bad_check_is_a_422_naming_its_field(check: Any, loc: list[Any]) -> None:
    with pytest.raises(ValidationFailed) as caught:
        parse_checks([check])
    assert loc in _locs(caught)


def test_wrong_direction_says_which_kind_to_use() -> None:
    with pytest.raises(ValidationFailed) as caught:
        parse_checks([{"metric": "ece", "max_decrease": 0.01}])
    assert "use max_increase" in caught.value.errors[0]["msg"]
    with pytest.raises(ValidationFailed) as caught:
        parse_checks([{"metric": "entropy", "max_decrease": 0.01}])
    assert "use min or max" in caught.value.errors[0]["msg"]


def test_every_bad_check_is_named_at_once_with_its_index() -> None:
    good = {"metric": "accuracy", "max_decrease": 0.01}
    with pytest.raises(ValidationFailed) as caught:
        parse_checks([good, {"metric": "ece"}, good, {"metric": "ece", "max": "x"}])
    assert _locs(caught) == [["body", "checks", 1], ["body", "checks", 3, "max"]]


@pytest.mark.parametrize("payload", [None, [], {}, "checks", [{}] * 0])
def test_checks_must_be_a_non_empty_list(payload: Any) -> None:
    with pytest.raises(ValidationFailed) as caught:
        parse_checks(payload)
    assert _locs(caught) == [["body", "checks"]]


def test_at_most_64_checks() -> None:
    one = {"metric": "accuracy", "min": 0.5}
    assert len(parse_checks([one] * MAX_CHECKS)) == MAX_CHECKS
    with pytest.raises(ValidationFailed) as caught:
        parse_checks([one] * (MAX_CHECKS + 1))
    assert _locs(caught) == [["body", "checks"]]


def test_parse_checks_reads_each_kind_and_slice() -> None:
    got = parse_checks(
        [
            {"metric": "accuracy", "slice": None, "max_decrease": 0.005},
            {"metric": "ece", "max_increase": 0},
            {"metric": "value", "slice": "lang=de=x", "max_increase": 0.02},
            {"metric": "accuracy", "min": 0.7},
            {"metric": "top_k_accuracy.5", "max_decrease": 0.01},
            {"metric": "ece", "max": -1},
        ]
    )
    assert got == [
        Check("accuracy", None, "max_decrease", 0.005),
        Check("ece", None, "max_increase", 0.0),
        Check("value", ("lang", "de=x"), "max_increase", 0.02),
        Check("accuracy", None, "min", 0.7),
        Check("top_k_accuracy.5", None, "max_decrease", 0.01),
        Check("ece", None, "max", -1.0),
    ]
    assert got[2].slice_text == "lang=de=x"


def test_parse_gate_request() -> None:
    body = {"baseline": "run_a", "checks": [{"metric": "accuracy", "min": 0.5}]}
    request = parse_gate_request(body)
    assert request.baseline == "run_a" and request.allow_inconclusive is False
    assert parse_gate_request({**body, "allow_inconclusive": True}).allow_inconclusive is True
    for bad, loc in [
        ({**body, "baseline": None}, ["body", "baseline"]),
        ({**body, "allow_inconclusive": "yes"}, ["body", "allow_inconclusive"]),
        ({**body, "extra": 1}, ["body", "extra"]),
        ({"baseline": "run_a"}, ["body", "checks"]),
    ]:
        with pytest.raises(ValidationFailed) as caught:
            parse_gate_request(bad)
        assert _locs(caught) == [loc]
    with pytest.raises(ValidationFailed):
        parse_gate_request([body])


@pytest.mark.parametrize(
    ("check", "loc", "words"),
    [
        ({"metric": "acuracy", "min": 0.5}, "metric", "has no metric 'acuracy'"),
        ({"metric": "accuracy", "slice": "lang=fr", "min": 0.5}, "slice", "no slice 'lang=fr'"),
        ({"metric": "accuracy", "slice": "source=web", "min": 0.5}, "slice", "no slice"),
        ({"metric": "ece", "max_increase": 0.1}, "metric", "has no metric 'ece'"),
    ],
)
def test_unknown_metric_or_slice_is_a_422_naming_it(
    pair: Any, check: dict[str, Any], loc: str, words: str
) -> None:
    cand, base, _ = pair
    good = {"metric": "accuracy", "max_decrease": 0.1}
    with pytest.raises(ValidationFailed) as caught:
        run_gate(cand, base, checks(good, check))
    assert _locs(caught) == [["body", "checks", 1, loc]]
    assert words in caught.value.errors[0]["msg"]


def test_a_delta_check_needs_the_slice_in_the_baseline_too(pair: Any) -> None:
    cand, _, a = pair
    base = make_run("run_base", a["bc"], a["bl"], a["w"])  # no slices
    with pytest.raises(ValidationFailed) as caught:
        run_gate(cand, base, checks({"metric": "value", "slice": "lang=de", "max_increase": 1}))
    assert _locs(caught) == [["body", "checks", 0, "slice"]]
    assert "baseline run 'run_base'" in caught.value.errors[0]["msg"]
    # a bound check tests the candidate alone
    answer = run_gate(cand, base, checks({"metric": "value", "slice": "lang=de", "max": 10}))
    assert answer["checks"][0]["verdict"] == "pass" and answer["checks"][0]["baseline"] is None


# ---------------------------------------------------------------- compare


def test_compare_deltas_overall_and_on_common_slices() -> None:
    bc, cc, bl, cl, lang = two_models()
    w = weights(8)
    base = make_run("A", bc, bl, w, lang=lang)
    paired_run = make_run("B", cc, cl, w, lang=lang)
    other = make_run("C", cc, cl, weights(9), seed=4, lang=np.where(lang == "de", "fr", "en"))
    deltas = compare_deltas([base, paired_run, other], "A")
    assert set(deltas) == {"B", "C"}
    acc = deltas["B"]["accuracy"]
    assert set(acc) == {"value", "baseline", "delta", "ci", "paired"}
    assert acc["paired"] is True
    assert acc["ci"] == pytest.approx(percentile(replicate_means(cc - bc, w)), abs=1e-12)
    assert acc["delta"] == pytest.approx(cc.mean() - bc.mean())
    assert deltas["B"]["macro_f1"]["ci"] is None  # no interval
    assert set(deltas["B"]["slices"]) == {"lang=de", "lang=en"}
    de = lang == "de"
    got = deltas["B"]["slices"]["lang=de"]["value"]
    assert got["ci"] == pytest.approx(percentile(replicate_means(cl[de] - bl[de], w[de])))
    assert deltas["C"]["accuracy"]["paired"] is False
    assert set(deltas["C"]["slices"]) == {"lang=en"}  # "fr" is not in A, "de" not in C
    rc, ra = replicate_means(cc, weights(9)), replicate_means(bc, w)
    every = (rc[None, :] - ra[:, None]).ravel()
    assert deltas["C"]["accuracy"]["ci"] == pytest.approx(percentile(every), abs=1e-12)
    assert orjson.loads(orjson.dumps(deltas)) == deltas


def test_compare_without_confidence_gives_null_intervals() -> None:
    bc, cc, bl, cl, _ = two_models()
    deltas = compare_deltas([make_run("A", bc, bl, None), make_run("B", cc, cl, None)], "A")
    assert deltas["B"]["value"]["ci"] is None and deltas["B"]["value"]["paired"] is False
    assert deltas["B"]["value"]["delta"] == pytest.approx(cl.mean() - bl.mean())
    assert deltas["B"]["slices"] == {}


def test_compare_baseline_must_be_one_of_the_runs() -> None:
    x = np.zeros(N)
    with pytest.raises(ValidationFailed) as caught:
        compare_deltas([make_run("A", x, x, None)], "Z")
    assert _locs(caught) == [["query", "baseline"]]


def test_a_typo_with_a_delta_kind_is_an_unknown_metric_not_a_direction(pair: Any) -> None:
    cand, base, _ = pair
    gate = checks({"metric": "acuracy", "max_decrease": 0.1})  # not in the catalog: parses
    with pytest.raises(ValidationFailed) as caught:
        run_gate(cand, base, gate)
    assert _locs(caught) == [["body", "checks", 0, "metric"]]


def test_a_run_metric_outside_the_catalog_takes_bounds_only() -> None:
    odd = RunReplicates("odd", {"custom": 1.0}, {}, LEVEL, 0, 0, None, False)
    gate = checks({"metric": "custom", "max_decrease": 0.1})
    with pytest.raises(ValidationFailed) as caught:
        run_gate(odd, odd, gate)
    assert _locs(caught) == [["body", "checks", 0, "max_decrease"]]
    assert "use min or max" in caught.value.errors[0]["msg"]
    assert run_gate(odd, odd, checks({"metric": "custom", "min": 0}))["passed"] is False
