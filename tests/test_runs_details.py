"""Runs at scale: summaries stay small whatever C, the detail endpoint answers one statistic,
and the confusion matrix lives in sparse cells (one row per non-zero cell).

Expected values come from float64 references written here (np.add.at over the concatenated
batches), never from the run store.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from sqlalchemy import text

from service.config import Settings
from service.dataplane.run_details import DetailQuery
from service.dataplane.runs import RunsDataPlane
from service.errors import Conflict
from service.http.app import create_app
from service.store import Store
from tests.servers import PostgresCluster


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'runs.db'}"
    cluster: PostgresCluster = request.getfixturevalue("postgres_cluster")
    return cluster.create_database()


@pytest.fixture
async def api(database_url: str) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(
        database_url=database_url,
        max_body_bytes=64 * 1024 * 1024,
        log_level="warning",
        backend="numpy",
    )
    app = create_app(settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c,
    ):
        yield c


def b64(array: np.ndarray) -> dict[str, Any]:
    return {
        "dtype": str(array.dtype),
        "shape": list(array.shape),
        "data": base64.b64encode(np.ascontiguousarray(array).tobytes()).decode(),
    }


def batches(seed: int, c: int, count: int, rows: int = 256) -> list[dict[str, np.ndarray]]:
    """Logits whose argmax is often the target, sometimes one of a few 'confusable' classes."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        y = rng.integers(0, c, size=rows)
        z = rng.standard_normal((rows, c)).astype(np.float32)
        z[np.arange(rows), y] += 3.0
        confused = rng.random(rows) < 0.3
        z[np.arange(rows)[confused], (y[confused] * 7 + 1) % c] += 6.0
        w = rng.uniform(0.5, 2.0, size=rows)
        out.append({"logits": z, "targets": y, "sample_weight": w})
    return out


def reference_confusion(parts: list[dict[str, np.ndarray]], c: int) -> np.ndarray:
    cells = np.zeros((c, c))
    for part in parts:
        pred = part["logits"].astype(np.float64).argmax(axis=1)
        np.add.at(cells, (part["targets"], pred), part["sample_weight"].astype(np.float32))
    return cells


async def make_run(
    api: httpx.AsyncClient,
    c: int,
    parts: list[dict[str, np.ndarray]],
    metrics: list[str],
    **extra: Any,
) -> tuple[str, list[dict[str, Any]]]:
    created = await api.post(
        "/v1/runs",
        json={
            "name": f"c{c}",
            "loss": "cross_entropy",
            "options": {"max_confusion_classes": c},
            "metrics": metrics,
            **extra,
        },
    )
    assert created.status_code == 201, created.text
    run_id = created.json()["id"]
    answers = []
    for i, part in enumerate(parts):
        body = {"batch_id": f"b{i}", **{k: b64(v) for k, v in part.items()}}
        r = await api.post(f"/v1/runs/{run_id}/batches", json=body)
        assert r.status_code == 200, r.text
        answers.append(r.json())
    return run_id, answers


def top_reference(cells: np.ndarray, k: int) -> list[tuple[int, int, float]]:
    c = cells.shape[0]
    off = [(-cells[t, p], t, p) for t in range(c) for p in range(c) if t != p and cells[t, p] > 0]
    return [(t, p, -v) for v, t, p in sorted(off)[:k]]


async def test_a_1000_class_run_answers_small_summaries_and_exact_details(
    api: httpx.AsyncClient,
) -> None:
    c = 1000
    parts = batches(1, c, 3)
    metrics = ["accuracy", "nll", "ece", "confusion_matrix", "precision", "recall", "f1"]
    run_id, answers = await make_run(api, c, parts, metrics)
    for answer in answers:  # goal: a push answer ≤ 10 KB whatever C
        assert len(json.dumps(answer)) <= 10 * 1024
        assert set(answer["run"]["metrics"]) == {"accuracy", "nll", "ece"}
    summary = answers[-1]["run"]
    assert summary["num_classes"] == c
    assert summary["details"] == ["confusion_matrix", "per_class", "reliability"]
    listed = await api.get("/v1/runs")
    assert len(listed.content) <= 100 * 1024 // 50  # one run's share of the 100 KB goal
    got = (await api.get(f"/v1/runs/{run_id}")).json()  # C > 64: no per-class arrays
    assert "confusion_matrix" not in got["metrics"] and "precision" not in got["metrics"]
    assert set(got["metrics"]) == {"accuracy", "nll", "ece"}
    bins = (await api.get(f"/v1/runs/{run_id}/metrics/reliability")).json()["value"]
    assert set(bins) == {"bin_edges", "confidence", "accuracy", "count"}
    assert sum(bins["count"]) == pytest.approx(sum(p["sample_weight"].astype(np.float32).sum()
                                                   for p in parts), rel=1e-9)  # fmt: skip

    cells = reference_confusion(parts, c)
    url = f"/v1/runs/{run_id}/metrics/confusion_matrix"
    top = (await api.get(url, params={"top": 20})).json()
    assert top["num_classes"] == c
    want = top_reference(cells, 20)
    assert [(t["true"], t["pred"]) for t in top["top"]] == [(t, p) for t, p, _ in want]
    np.testing.assert_allclose([t["count"] for t in top["top"]], [v for _, _, v in want], 1e-12)

    ids = [0, 1, 8, 57, 999]
    block = await api.get(url, params={"classes": ",".join(map(str, ids)), "normalize": "true"})
    body = block.json()
    rows = cells.sum(axis=1)
    want_block = cells[np.ix_(ids, ids)] / np.where(rows[ids] > 0, rows[ids], 1.0)[:, None]
    assert body["classes"] == ids
    np.testing.assert_allclose(np.asarray(body["matrix"]), want_block, rtol=1e-12)

    table = (await api.get(f"/v1/runs/{run_id}/metrics/per_class",
                           params={"sort": "f1", "order": "asc", "limit": 5})).json()  # fmt: skip
    tp = np.diag(cells)
    predicted, support = cells.sum(axis=0), cells.sum(axis=1)
    f1 = np.where(predicted + support > 0, 2 * tp / np.where(predicted + support > 0,
                  predicted + support, 1.0), 0.0)  # fmt: skip
    order = sorted(range(c), key=lambda i: (f1[i], i))[:5]
    assert table["total"] == c and [r["class"] for r in table["rows"]] == order
    np.testing.assert_allclose([r["f1"] for r in table["rows"]], f1[order], rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose([r["support"] for r in table["rows"]], support[order], rtol=1e-9)


async def test_a_small_run_shows_everything_on_get_and_in_the_detail_endpoint(
    api: httpx.AsyncClient,
) -> None:
    c = 6
    parts = batches(2, c, 2, rows=40)
    names = ["a", "b", "c", "d", "e", "f"]
    run_id, _ = await make_run(api, c, parts, ["confusion_matrix"], class_names=names)
    cells = reference_confusion(parts, c)
    got = (await api.get(f"/v1/runs/{run_id}")).json()
    np.testing.assert_allclose(np.asarray(got["metrics"]["confusion_matrix"]), cells, rtol=1e-12)
    assert got["class_names"] == names
    full = (await api.get(f"/v1/runs/{run_id}/metrics/confusion_matrix")).json()
    np.testing.assert_allclose(np.asarray(full["matrix"]), cells, rtol=1e-12)
    assert full["class_names"] == names
    top = (await api.get(f"/v1/runs/{run_id}/metrics/confusion_matrix", params={"top": 2})).json()
    want = top_reference(cells, 2)
    assert [(t["true"], t["pred"]) for t in top["top"]] == [(t, p) for t, p, _ in want]
    ids = sorted({i for t, p, _ in want for i in (t, p)})
    assert top["class_names"] == {str(i): names[i] for i in ids}


@pytest.mark.parametrize(
    ("path", "params", "status", "loc"),
    [
        ("confusion_matrix", {"top": 0}, 422, ["query", "top"]),
        ("confusion_matrix", {"top": 1001}, 422, ["query", "top"]),
        ("confusion_matrix", {"top": 3, "classes": "1,2"}, 422, ["query", "top"]),
        ("confusion_matrix", {"classes": "1,1"}, 422, ["query", "classes"]),
        ("confusion_matrix", {"classes": "7"}, 422, ["query", "classes"]),
        ("confusion_matrix", {"classes": "x"}, 422, ["query", "classes"]),
        ("confusion_matrix", {"sort": "f1"}, 422, ["query", "sort"]),
        ("per_class", {"sort": "bogus"}, 422, ["query", "sort"]),
        ("per_class", {"order": "up"}, 422, ["query", "order"]),
        ("per_class", {"limit": 0}, 422, ["query", "limit"]),
        ("per_class", {"offset": -1}, 422, ["query", "offset"]),
        ("per_class", {"offset": 10**20}, 422, ["query", "offset"]),
        ("per_class", {"top": 3}, 422, ["query", "top"]),
        ("roc_curve", {}, 404, ["path", "name"]),
        ("nonsense", {}, 404, ["path", "name"]),
    ],
)
async def test_detail_endpoint_rejects_bad_queries(
    api: httpx.AsyncClient, path: str, params: dict[str, Any], status: int, loc: list[str]
) -> None:
    run_id, _ = await make_run(api, 6, batches(3, 6, 1, rows=20), ["confusion_matrix", "f1"])
    r = await api.get(f"/v1/runs/{run_id}/metrics/{path}", params=params)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["errors"][0]["loc"] == loc


async def test_detail_of_a_missing_run_or_an_empty_one_is_404(api: httpx.AsyncClient) -> None:
    r = await api.get("/v1/runs/run_nope/metrics/confusion_matrix")
    assert r.status_code == 404 and r.json()["errors"][0]["type"] == "not_found"
    run_id, _ = await make_run(api, 6, [], ["confusion_matrix"])
    r = await api.get(f"/v1/runs/{run_id}/metrics/confusion_matrix")
    assert r.status_code == 404 and r.json()["errors"][0]["type"] == "no_batches"


def runs_plane(database_url: str) -> tuple[Store, RunsDataPlane]:
    """A migrated store and a runs data plane on it (NumPy backend)."""
    settings = Settings(database_url=database_url, backend="numpy", log_level="warning")
    store = Store(database_url)
    store.upgrade()
    return store, RunsDataPlane(settings, store)


def confusion_run(runs: RunsDataPlane, c: int) -> str:
    run = runs.create_run(
        {
            "name": "wide",
            "loss": "cross_entropy",
            "options": {"max_confusion_classes": c},
            "metrics": ["confusion_matrix"],
        }
    )
    return str(run["id"])


def batch_by_batch_confusion(parts: list[dict[str, np.ndarray]], c: int) -> np.ndarray:
    """Σ over batches, in order, of each batch's own cell sums (how a run adds them)."""
    total = np.zeros((c, c))
    for part in parts:
        own = np.zeros((c, c))
        pred = part["logits"].astype(np.float64).argmax(axis=1)
        np.add.at(own, (part["targets"], pred), part["sample_weight"].astype(np.float32))
        total = total + own
    return total


def block_rows(store: Store) -> list[tuple[int, int, int]]:
    with store.engine.connect() as connection:
        rows = connection.execute(
            text("SELECT seq, batches, cells FROM confusion_blocks ORDER BY seq")
        ).all()
    return [(int(s), int(b), int(n)) for s, b, n in rows]


def test_a_push_appends_one_block_of_the_cells_it_touches(database_url: str) -> None:
    """4096 classes, two 256-row batches: one confusion row per batch holding at most its
    256 cells, and the JSON state holds no C² numbers."""
    c = 4096
    store, runs = runs_plane(database_url)
    run_id = confusion_run(runs, c)
    parts = batches(4, c, 2)
    for i, part in enumerate(parts):
        runs.add_batch(run_id, {"batch_id": f"b{i}", **part})
    runs.add_batch(run_id, {"batch_id": "b1", **parts[1]})  # a retry adds no block
    cells = reference_confusion(parts, c)
    per_batch = [np.count_nonzero(reference_confusion([part], c)) for part in parts]
    assert block_rows(store) == [(1, 1, per_batch[0]), (2, 1, per_batch[1])]
    with store.engine.connect() as connection:
        state = connection.execute(text("SELECT metric_state FROM runs")).scalar_one()
    assert len(state if isinstance(state, str) else json.dumps(state)) < 4096
    top = runs.run_metric(run_id, "confusion_matrix", DetailQuery(top=5))
    want = top_reference(cells, 5)
    assert [(t["true"], t["pred"]) for t in top["top"]] == [(t, p) for t, p, _ in want]
    store.dispose()


def test_blocks_are_merged_when_due_and_every_read_is_the_exact_sum(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With merges due every ≥ 300 cells, two replicas push 12 batches alternately and read
    between pushes: each answer is the batch-by-batch float64 sum of the batches so far (the
    same bits), whatever was merged, and a replica's cached table never hides a push made
    through the other."""
    from service.store import pushes

    monkeypatch.setattr(pushes, "COMPACT_MIN_CELLS", 300)
    c = 40
    store, first = runs_plane(database_url)
    replicas = [first, RunsDataPlane(first.settings, store)]
    run_id = confusion_run(replicas[0], c)
    parts = batches(9, c, 12, rows=200)
    merged_once = False
    for i, part in enumerate(parts):
        replicas[i % 2].add_batch(run_id, {"batch_id": f"b{i}", **part})
        want = batch_by_batch_confusion(parts[: i + 1], c)
        for replica in replicas:
            got = replica.run_metric(run_id, "confusion_matrix")
            np.testing.assert_array_equal(np.asarray(got["matrix"]), want)
        rows = block_rows(store)
        assert sum(b for _, b, _ in rows) == i + 1 and rows[-1][0] == i + 1
        merged_once = merged_once or rows[0][1] > 1
    assert merged_once and len(block_rows(store)) < len(parts)
    block = replicas[1].run_metric(run_id, "confusion_matrix", DetailQuery(classes=(3, 0)))
    np.testing.assert_array_equal(np.asarray(block["matrix"]), want[np.ix_([3, 0], [3, 0])])
    rates = replicas[0].run_metric(run_id, "confusion_matrix", DetailQuery(normalize=True))
    np.testing.assert_allclose(
        np.asarray(rates["matrix"]), want / want.sum(axis=1, keepdims=True), rtol=1e-12
    )
    store.dispose()


def test_many_small_batches_are_merged_by_block_count(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batches of 1 row never reach the cell threshold: past max(``COMPACT_MAX_BLOCKS``, the
    first block's cells / ``COMPACT_MAX_BLOCKS``) blocks they are merged all the same (a large
    first block waits for proportionally more), and the matrix stays the batch-by-batch sum."""
    from service.store import pushes

    monkeypatch.setattr(pushes, "COMPACT_MAX_BLOCKS", 3)
    c = 40
    store, runs = runs_plane(database_url)
    run_id = confusion_run(runs, c)
    parts = batches(5, c, 12, rows=1)
    parts[0] = batches(6, c, 1, rows=2000)[0]  # a first block of ~1000 cells or more
    most = 0
    for i, part in enumerate(parts):
        runs.add_batch(run_id, {"batch_id": f"b{i}", **part})
        rows = block_rows(store)
        assert len(rows) <= max(3, rows[0][2] // 3) + 1
        most = max(most, len(rows))
    assert most == len(parts)  # the large first block: 12 blocks are not yet "many"
    small = batches(7, c, 10, rows=1)
    store2 = Store(database_url)
    run2 = confusion_run(runs, c)
    for i, part in enumerate(small):
        runs.add_batch(run2, {"batch_id": f"s{i}", **part})
    with store2.engine.connect() as connection:
        count = connection.execute(
            text(
                "SELECT count(*) FROM confusion_blocks JOIN runs ON runs.pk = run_pk "
                "WHERE runs.id = :id"
            ),
            {"id": run2},
        ).scalar_one()
    assert count <= 4  # small blocks only: merged past 3
    for run, sent in ((run_id, parts), (run2, small)):
        got = runs.run_metric(run, "confusion_matrix")
        np.testing.assert_array_equal(np.asarray(got["matrix"]), batch_by_batch_confusion(sent, c))
    store2.dispose()
    store.dispose()


def test_the_cells_cache_keeps_at_most_its_weight_in_cells() -> None:
    from service.dataplane.runs import LruCache

    cache: LruCache[str, list[int]] = LruCache(8, 10, len)
    cache.put("a", [0] * 4)
    cache.put("b", [0] * 4)
    assert cache.get("a") is not None  # "b" is now the least recently used
    cache.put("c", [0] * 4)  # 12 > 10: "b" goes
    assert (cache.get("b"), cache.weight) == (None, 8)
    cache.put("huge", [0] * 11)  # heavier than the whole cache: not kept
    assert (cache.get("huge"), cache.weight) == (None, 8)
    cache.put("a", [0] * 1)  # replaced: its old weight goes
    cache.discard("c")
    assert cache.weight == 1


def test_concurrent_reads_of_a_run_merge_its_blocks_once(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from service.store import pushes

    c = 30
    store, runs = runs_plane(database_url)
    run_id = confusion_run(runs, c)
    parts = batches(6, c, 3, rows=50)
    for i, part in enumerate(parts):
        runs.add_batch(run_id, {"batch_id": f"b{i}", **part})
    loads = []
    load_cells = pushes.load_cells

    def counted(*args: object) -> object:
        loads.append(args)
        threading.Event().wait(0.1)  # the other readers arrive meanwhile
        return load_cells(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(pushes, "load_cells", counted)
    answers: list[dict[str, object]] = []
    readers = [
        threading.Thread(target=lambda: answers.append(runs.run_metric(run_id, "confusion_matrix")))
        for _ in range(4)
    ]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join(30)
    assert len(answers) == 4 and len(loads) == 1
    want = batch_by_batch_confusion(parts, c)
    for answer in answers:
        np.testing.assert_array_equal(np.asarray(answer["matrix"]), want)
    store.dispose()


def test_migration_0005_moves_cells_into_one_block_and_back(database_url: str) -> None:
    from alembic import command

    from ce_engine.metrics.cells import Cells
    from ce_engine.metrics.state import _pack
    from service.store import alembic_config

    store = Store(database_url)
    store.upgrade("0004")
    empty = _pack(Cells(3, np.zeros(0, np.int64), np.zeros(0)))
    state = {
        "family": "softmax", "names": ["confusion_matrix"], "num_classes": 3, "top_k": [],
        "n_bins": 15, "n_thresholds": 1000, "threshold": [], "log_base": "e",
        "stats": {"weight": 12.75, "count": 9, "confusion": empty},
    }  # fmt: skip
    cells = {(0, 0): 3.0, (0, 1): 1.5, (1, 1): 2.0, (1, 2): 0.25, (2, 0): 4.0, (2, 2): 1.0}
    with store.engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO runs (id, name, status, loss, options, metrics_requested, created_at,"
                " updated_at, batches, count, ignored, sum, denominator, metric_state) VALUES"
                " ('run_old', 'old', 'open', 'cross_entropy', '{}', '[\"confusion_matrix\"]',"
                " '2026-01-01T00:00:00Z', '2026-01-01T00:00:00Z', 4, 9, 0, 1.0, 9.0, :state)"
            ),
            {"state": json.dumps(state)},
        )
        pk = connection.execute(text("SELECT pk FROM runs")).scalar_one()
        for (t, p), w in cells.items():
            connection.execute(
                text("INSERT INTO confusion_cells VALUES (:pk, :t, :p, :w)"),
                {"pk": pk, "t": t, "p": p, "w": w},
            )
    store.upgrade()
    assert block_rows(store) == [(4, 4, 6)]
    dense = np.zeros((3, 3))
    for (t, p), w in cells.items():
        dense[t, p] = w
    runs = RunsDataPlane(Settings(database_url=database_url, log_level="warning"), store)
    full = runs.run_metric("run_old", "confusion_matrix")
    np.testing.assert_array_equal(np.asarray(full["matrix"]), dense)
    runs.add_batch("run_old", {"batch_id": "new", "logits": np.eye(3)[[2]], "targets": [0]})
    assert [s for s, _, _ in block_rows(store)] == [4, 5]
    dense[0, 2] += 1.0
    with store.engine.begin() as connection:
        command.downgrade(alembic_config(connection), "0004")
    with store.engine.connect() as connection:
        rows = connection.execute(
            text("SELECT true_class, pred_class, weight FROM confusion_cells")
        ).all()
    assert {(t, p): w for t, p, w in rows} == {
        (t, p): float(dense[t, p]) for t, p in zip(*dense.nonzero(), strict=True)
    }
    store.dispose()


def test_migration_0003_moves_a_stored_dense_matrix_into_cells(database_url: str) -> None:
    from alembic import command

    from ce_engine.metrics.state import _pack
    from service.store import alembic_config

    store = Store(database_url)
    store.upgrade("0002")
    dense = np.array([[3.0, 1.5, 0.0], [0.0, 2.0, 0.25], [4.0, 0.0, 1.0]])
    state = {
        "family": "softmax", "names": ["confusion_matrix"], "num_classes": 3, "top_k": [1, 5],
        "n_bins": 15, "n_thresholds": 1000, "threshold": [], "log_base": "e",
        "stats": {"weight": 12.75, "count": 9, "confusion": _pack(dense)},
    }  # fmt: skip
    with store.engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO runs (id, name, status, loss, options, metrics_requested, created_at,"
                " updated_at, batches, count, ignored, sum, denominator, metric_state) VALUES"
                " ('run_old', 'old', 'open', 'cross_entropy', '{}', '[\"confusion_matrix\"]',"
                " '2026-01-01T00:00:00Z', '2026-01-01T00:00:00Z', 1, 9, 0, 1.0, 9.0, :state)"
            ),
            {"state": json.dumps(state)},
        )
    store.upgrade()
    runs = RunsDataPlane(Settings(database_url=database_url, log_level="warning"), store)
    full = runs.run_metric("run_old", "confusion_matrix")
    np.testing.assert_array_equal(np.asarray(full["matrix"]), dense)
    top = runs.run_metric("run_old", "confusion_matrix", DetailQuery(top=2))
    assert [(t["true"], t["pred"], t["count"]) for t in top["top"]] == [(2, 0, 4.0), (0, 1, 1.5)]
    with store.engine.begin() as connection:
        command.downgrade(alembic_config(connection), "0002")
    with store.engine.connect() as connection:  # revision 0002's dense statistic again
        raw = connection.execute(text("SELECT metric_state FROM runs")).scalar_one()
    restored = json.loads(raw) if isinstance(raw, str) else raw
    np.testing.assert_array_equal(np.asarray(restored["stats"]["confusion"]), dense)
    store.dispose()


async def test_curves_over_the_response_limit_are_413(tmp_path: Path) -> None:
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'r.db'}", max_response_bytes=1 << 20,
        log_level="warning", backend="numpy",
    )  # fmt: skip
    app = create_app(settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as api,
    ):
        run_id, _ = await make_run(api, 10, batches(6, 10, 1, rows=400), ["pr_curve"], tags={})
        r = await api.get(f"/v1/runs/{run_id}/metrics/pr_curve")
        assert r.status_code == 200  # 10 classes × 1001 points × 3 ≈ 0.7 MB estimated
        created = await api.post("/v1/runs", json={
            "name": "fine", "loss": "cross_entropy", "metrics": ["pr_curve"],
            "options": {"n_thresholds": 100_000},
        })  # fmt: skip
        fine = created.json()["id"]
        part = batches(6, 10, 1, rows=400)[0]
        body = {"batch_id": "b0", **{k: b64(v) for k, v in part.items()}}
        assert (await api.post(f"/v1/runs/{fine}/batches", json=body)).status_code == 200
        big = await api.get(f"/v1/runs/{fine}/metrics/pr_curve")
        assert big.status_code == 413 and "fewer classes" in big.json()["detail"]
        one = await api.get(f"/v1/runs/{fine}/metrics/pr_curve", params={"classes": "0"})
        assert one.status_code == 413  # 100,001 points × 3 ≈ 7 MB, still over 1 MiB


def _plain_digest(algorithm: Any, parts: dict[str, np.ndarray | None]) -> str:
    digest = algorithm()
    for name in sorted(parts):
        array = parts[name]
        if array is None:
            digest.update(f"{name}:none;".encode())
            continue
        wire = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"))
        digest.update(f"{name}:{wire.dtype.name}:{list(wire.shape)};".encode())
        digest.update(wire.tobytes())
    return str(digest.hexdigest())


def test_batch_digests_are_blake3_and_sha256_digests_of_older_batches_still_match(
    tmp_path: Path,
) -> None:
    import hashlib

    import blake3

    url = f"sqlite:///{tmp_path / 'r.db'}"
    store = Store(url)
    store.upgrade()
    runs = RunsDataPlane(Settings(database_url=url, backend="numpy", log_level="warning"), store)
    run_id = runs.create_run({"name": "d", "loss": "cross_entropy"})["id"]
    (part, other) = batches(3, 5, 2, rows=8)
    runs.add_batch(run_id, {"batch_id": "b0", **part})
    parts = {"logits": part["logits"], "targets": part["targets"],
             "sample_weight": part["sample_weight"]}  # fmt: skip
    with store.engine.begin() as connection:
        stored = connection.execute(text("SELECT content_hash FROM batches")).scalar_one()
        assert stored == _plain_digest(blake3.blake3, parts)
        legacy = _plain_digest(hashlib.sha256, parts)  # as stored by earlier releases
        connection.execute(text("UPDATE batches SET content_hash = :h"), {"h": legacy})
    again = runs.add_batch(run_id, {"batch_id": "b0", **part})
    assert again["duplicate"] and again["run"]["batches"] == 1
    with pytest.raises(Conflict, match="different content"):
        runs.add_batch(run_id, {"batch_id": "b0", **other})
    store.dispose()
