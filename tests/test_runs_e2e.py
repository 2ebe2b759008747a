"""End to end: `ce-eval serve` subprocesses, the `ce-eval run` CLI, crashes and replicas.

Expected aggregates come from one stateless ``ce_engine.evaluate`` over all rows concatenated.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

import ce_engine
from tests.servers import REPO, PostgresCluster, ServerProcess
from tests.test_runs import as_base64, assert_close

METRICS = ["accuracy", "nll", "ece", "reliability", "confusion_matrix", "macro_f1"]


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ce_eval_client.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def expected_run(
    logits: np.ndarray, targets: np.ndarray, weights: np.ndarray | None = None
) -> ce_engine.EvaluationResult:
    return ce_engine.evaluate(
        "cross_entropy", logits, targets, metrics=METRICS, sample_weight=weights, backend="numpy"
    )


def assert_run_equals(run: dict[str, Any], expected: ce_engine.EvaluationResult) -> None:
    assert run["count"] == expected.count
    assert_close(run["sum"], expected.sum, "sum")
    assert_close(run["denominator"], expected.denominator, "denominator")
    assert_close(run["value"], expected.value, "value")
    assert_close(run["metrics"], json.loads(json.dumps(expected.metrics)), "metrics")


def write_dataset(root: Path, seed: int, files: int, rows: int, classes: int) -> tuple[Any, ...]:
    """``files`` .npz files plus one directory of .npy files; returns the concatenated arrays
    in push order (the .npy directory first, then the .npz files sorted by name)."""
    rng = np.random.default_rng(seed)
    parts = []
    npy = root / "shard-npy"
    npy.mkdir(parents=True)
    for i in range(files + 1):
        logits = (rng.standard_normal((rows, classes)) * 2).astype(np.float32)
        targets = rng.integers(0, classes, size=rows)
        weights = rng.uniform(0.5, 2.0, size=rows)
        parts.append((logits, targets, weights))
        if i == 0:
            np.save(npy / "logits.npy", logits)
            np.save(npy / "targets.npy", targets)
            np.save(npy / "sample_weight.npy", weights)
        else:
            np.savez(
                root / f"part-{i:02d}.npz", logits=logits, targets=targets, sample_weight=weights
            )
    return tuple(np.concatenate([p[k] for p in parts]) for k in range(3))


def test_cli_create_push_show_list_close(tmp_path, serve):
    server: ServerProcess = serve(f"sqlite:///{tmp_path / 'db' / 'runs.db'}").start()
    logits, targets, weights = write_dataset(tmp_path / "data", 1, files=2, rows=70, classes=4)
    created = cli("run", "create", "--url", server.url, "--name", "cli-run", "--tag", "team=a",
                  *[a for m in METRICS for a in ("--metric", m)], "--id-only")  # fmt: skip
    assert created.returncode == 0, created.stderr
    run_id = created.stdout.strip()
    paths = [
        str(tmp_path / "data" / "shard-npy"),
        *sorted(map(str, (tmp_path / "data").glob("*.npz"))),
    ]
    pushed = cli("run", "push", "--url", server.url, run_id, *paths, "--batch-size", "32")
    assert pushed.returncode == 0, pushed.stderr
    summary = json.loads(pushed.stdout)
    batches_per_file = -(-70 // 32)
    assert summary["accepted"] == 3 * batches_per_file and summary["duplicates"] == 0
    assert "rows/s" in pushed.stderr and "ETA" in pushed.stderr  # the progress bar
    assert_run_equals(summary["run"], expected_run(logits, targets, weights))

    again = cli(
        "run", "push", "--url", server.url, run_id, str(tmp_path / "data"), "--batch-size", "32"
    )
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["accepted"] == 0
    assert json.loads(again.stdout)["duplicates"] == 3 * batches_per_file

    shown = json.loads(cli("run", "show", "--url", server.url, run_id, "--json").stdout)
    assert shown["batches"] == 3 * batches_per_file and shown["tags"] == {"team": "a"}
    listed = cli("run", "list", "--url", server.url, "--tag", "team:a")
    assert listed.returncode == 0 and run_id in listed.stdout and "cli-run" in listed.stdout
    listed_json = json.loads(
        cli("run", "list", "--url", server.url, "--json", "--status", "closed").stdout
    )
    assert listed_json["runs"] == []
    closed = cli("run", "close", "--url", server.url, run_id)
    assert closed.returncode == 0 and json.loads(closed.stdout)["status"] == "closed"
    other = write_dataset(tmp_path / "more", 2, files=1, rows=10, classes=4)
    assert other
    late = cli("run", "push", "--url", server.url, run_id, str(tmp_path / "more"), "--retries", "0")
    assert late.returncode == 1 and "409" in late.stderr


def test_cli_reports_bad_input_without_a_traceback(tmp_path, serve):
    server = serve(f"sqlite:///{tmp_path / 'runs.db'}").start()
    bad_loss = cli("run", "create", "--url", server.url, "--name", "x", "--loss", "nope")
    assert bad_loss.returncode == 1
    assert "422 loss: unknown loss 'nope'" in bad_loss.stderr
    assert "Traceback" not in bad_loss.stderr
    missing = cli("run", "push", "--url", server.url, "run_x", str(tmp_path / "nothing.npz"))
    assert missing.returncode == 2 and "nothing.npz: no such file" in missing.stderr
    np.savez(tmp_path / "bad.npz", logits=np.zeros((3, 2)))
    no_targets = cli("run", "push", "--url", server.url, "run_x", str(tmp_path / "bad.npz"))
    assert no_targets.returncode == 2 and "no array named 'targets'" in no_targets.stderr
    unknown = cli("run", "show", "--url", server.url, "run_nope")
    assert unknown.returncode == 1 and "404" in unknown.stderr
    down = cli("run", "show", "--url", "http://127.0.0.1:9", "run_x", "--retries", "1")
    assert down.returncode == 1 and "cannot reach http://127.0.0.1:9" in down.stderr


def test_db_upgrade_command_creates_the_schema(tmp_path):
    url = f"sqlite:///{tmp_path / 'new' / 'ce.db'}"
    assert cli("db", "current", "--database-url", url).stdout.strip() == "(empty)"
    upgraded = cli("db", "upgrade", "--database-url", url)
    assert upgraded.returncode == 0, upgraded.stderr
    assert upgraded.stdout.strip() == "0005"


def test_kill_server_mid_push_then_push_again_counts_every_batch_once(tmp_path, serve):
    database = f"sqlite:///{tmp_path / 'runs.db'}"
    logits, targets, weights = write_dataset(tmp_path / "data", 3, files=3, rows=1000, classes=6)
    batch_size = 5
    total = len(targets) // batch_size
    server = serve(database).start()
    metric_args = [a for m in METRICS for a in ("--metric", m)]
    run_id = cli(
        "run", "create", "--url", server.url, "--name", "crash", *metric_args, "--id-only"
    ).stdout.strip()  # fmt: skip
    # One batch in flight, 800 of them: the kill lands after batch 20 with hundreds to go, even
    # when this process is scheduled late on a busy machine (with 4 in flight, 400 batches could
    # all land between two polls).
    push = subprocess.Popen(
        [sys.executable, "-m", "ce_eval_client.cli", "run", "push", "--url", server.url, run_id,
         str(tmp_path / "data"), "--batch-size", str(batch_size), "--retries", "2", "--quiet",
         "--concurrency", "1"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while httpx.get(f"{server.url}/v1/runs/{run_id}").json()["batches"] < 20:
        assert time.monotonic() < deadline and push.poll() is None
        time.sleep(0.01)
    server.kill()
    _, err = push.communicate(timeout=60)
    assert push.returncode == 1, err

    restarted = serve(database).start()
    before = httpx.get(f"{restarted.url}/v1/runs/{run_id}").json()["batches"]
    assert 20 <= before < total
    again = cli("run", "push", "--url", restarted.url, run_id, str(tmp_path / "data"),
                "--batch-size", str(batch_size), "--quiet")  # fmt: skip
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout)
    assert summary["duplicates"] == before and summary["accepted"] == total - before
    run = httpx.get(f"{restarted.url}/v1/runs/{run_id}").json()
    assert run["batches"] == total
    assert_run_equals(run, expected_run(logits, targets, weights))


@pytest.mark.postgres
@pytest.mark.parametrize("writer", ["true", "false"], ids=["push-writer", "threads"])
def test_two_replicas_on_one_postgres_count_each_batch_exactly_once(
    tmp_path, serve, postgres_cluster: PostgresCluster, writer: str
):
    database = postgres_cluster.create_database()
    env = {"CE_EVAL_PUSH_WRITER": writer}
    replicas = [serve(database, **env), serve(database, **env)]
    with ThreadPoolExecutor(2) as pool:  # both start (and migrate) at once
        list(pool.map(lambda s: s.start(), replicas))
    run = httpx.post(
        f"{replicas[0].url}/v1/runs",
        json={"name": "replicas", "loss": "cross_entropy", "metrics": METRICS},
    ).json()
    rng = np.random.default_rng(5)
    batches = {}
    for i in range(40):
        n = int(rng.integers(5, 40))
        batches[f"b{i:02d}"] = (
            rng.standard_normal((n, 7)),
            rng.integers(0, 7, size=n),
            rng.uniform(0.5, 2.0, size=n),
        )
    # Every batch is sent 1-3 times (retries, overlapping), in random order, to either replica.
    sends = [b for b in batches for _ in range(int(rng.integers(1, 4)))]
    random.Random(7).shuffle(sends)

    def send(batch_id: str) -> tuple[str, int, dict[str, Any]]:
        logits, targets, weights = batches[batch_id]
        body = {"batch_id": batch_id, "logits": as_base64(logits), "targets": as_base64(targets),
                "sample_weight": as_base64(weights)}  # fmt: skip
        url = random.choice(replicas).url
        response = httpx.post(f"{url}/v1/runs/{run['id']}/batches", json=body, timeout=60)
        return batch_id, response.status_code, response.json()

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(send, sends))
    by_id: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for batch_id, status, body in answers:
        assert status == 200, body
        by_id[batch_id].append(body)
    for batch_id, bodies in by_id.items():
        assert sum(not b["duplicate"] for b in bodies) == 1, batch_id
        assert all(b["batch"] == bodies[0]["batch"] for b in bodies), batch_id
    final = httpx.get(f"{replicas[1].url}/v1/runs/{run['id']}").json()
    assert final["batches"] == len(batches)
    series = httpx.get(f"{replicas[0].url}/v1/runs/{run['id']}/batches").json()["batches"]
    assert sorted(b["seq"] for b in series) == list(range(1, len(batches) + 1))
    assert sorted(b["batch_id"] for b in series) == sorted(batches)
    ordered = list(batches.values())
    expected = expected_run(*(np.concatenate([b[k] for b in ordered]) for k in range(3)))
    assert_run_equals(final, expected)
    other = {"batch_id": "b00", "logits": [[0.0] * 7], "targets": [1]}
    conflict = httpx.post(f"{replicas[1].url}/v1/runs/{run['id']}/batches", json=other)
    assert conflict.status_code == 409
