"""The ``ce-eval`` command line as a user meets it, in real subprocesses.

- every failure is one line on stderr naming the file, key or URL, with a hint; exit status 2
  for usage errors, 1 for the server's errors and an unreachable server;
- an unreachable server gets a few stated retries, each reported;
- ``… | head`` never prints a BrokenPipeError traceback;
- ``run push`` reads every accepted file format, sends batches concurrently with a progress bar
  and refuses arrays it does not know;
- ``run show`` prints scalars, and one statistic with ``--metric``;
- run ids stay one path segment (``run push "../../v1/evaluate?x="`` does not post elsewhere).

Expected aggregates come from ``tests.reference`` (float64) over all rows concatenated.

Tests marked ``CONTRACT_DOUBLE`` talk to :class:`ContractDouble`, a stand-in HTTP server that
answers ``GET /v1/runs/{id}/metrics/{name}`` as the runs contract describes, because this build
of the server does not serve that endpoint yet; ``test_show_detail_against_the_server`` runs the
same commands against a real server and is skipped (saying so) until it does.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import numpy as np
import pytest

from ce_eval_client.sdk import Client
from tests.reference import softmax_ce
from tests.servers import REPO, ServerProcess, free_port, start_serve
from tests.test_client_runs import detail_endpoint_served

#: Marks the tests that need the double because the server lacks the detail endpoint.
CONTRACT_DOUBLE = pytest.mark.contract_double


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> Any:
    return subprocess.run(
        [sys.executable, "-m", "ce_eval_client.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def one_line(stderr: str) -> str:
    """The single non-empty stderr line (no traceback)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    process = start_serve()
    yield process
    process.stop()


@pytest.fixture
def arrays(tmp_path: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    z = rng.standard_normal((6, 3)).astype(np.float32)
    y = rng.integers(0, 3, size=6)
    np.save(tmp_path / "z.npy", z)
    np.save(tmp_path / "y.npy", y)
    np.savez(tmp_path / "y.npz", labels=y)
    return {"z": tmp_path / "z.npy", "y": tmp_path / "y.npy", "ynpz": tmp_path / "y.npz"}


# ------------------------------------------------------------------------------ failures


def test_missing_logits_file_is_one_usage_line(arrays: dict[str, Path]) -> None:
    done = cli("evaluate", "--logits", "nope.npy", "--targets", str(arrays["y"]))
    assert done.returncode == 2
    line = one_line(done.stderr)
    assert line.startswith("ce-eval: --logits nope.npy: no such file (hint: ")


def test_unknown_npz_key_names_the_keys_it_holds(arrays: dict[str, Path]) -> None:
    spec = f"{arrays['ynpz']}:label"
    done = cli("evaluate", "--logits", str(arrays["z"]), "--targets", spec)
    assert done.returncode == 2
    line = one_line(done.stderr)
    assert f"--targets {spec}: unknown array 'label'; did you mean 'labels'?" in line
    assert f"(hint: --targets {arrays['ynpz']}:labels)" in line


def test_bad_url_is_a_usage_error(arrays: dict[str, Path]) -> None:
    done = cli(
        "evaluate", "--url", "localhost:8000", "--logits", str(arrays["z"]),
        "--targets", str(arrays["y"]),
    )  # fmt: skip
    assert done.returncode == 2
    assert "--url 'localhost:8000' is not an http(s) URL" in one_line(done.stderr)


def _retry_waits(stderr: str) -> list[float]:
    return [float(w) for w in re.findall(r"; retry \d+/\d+ in ([0-9.]+) s", stderr)]


def test_unreachable_server_gives_up_after_three_reported_retries(
    arrays: dict[str, Path],
) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    done = cli(
        "evaluate", "--url", url, "--logits", str(arrays["z"]), "--targets", str(arrays["y"])
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert [re.search(r"retry (\d+/\d+)", line)[1] for line in lines[:-1]] == ["1/3", "2/3", "3/3"]  # type: ignore[index]
    assert sum(_retry_waits(done.stderr)) <= 0.5 * 1.25 + 1.0 * 1.25 + 2.0 * 1.25
    assert lines[-1].startswith(f"ce-eval: cannot reach {url} (ConnectError")
    assert lines[-1].endswith(
        "after 3 retries (hint: is the server running? `ce-eval serve` starts one; "
        "--url or CE_EVAL_URL point elsewhere)"
    )


def test_unreachable_grpc_target_is_one_line_too(arrays: dict[str, Path]) -> None:
    target = f"127.0.0.1:{free_port()}"
    done = cli(
        "evaluate", "--transport", "grpc", "--grpc-target", target, "--retries", "0",
        "--logits", str(arrays["z"]), "--targets", str(arrays["y"]), "--timeout", "5",
    )  # fmt: skip
    assert done.returncode == 1
    assert one_line(done.stderr).startswith(f"ce-eval: cannot reach {target} (UNAVAILABLE")


def test_server_error_is_one_line_naming_the_url(
    server: ServerProcess, arrays: dict[str, Path]
) -> None:
    done = cli(
        "evaluate", "--url", server.url, "--logits", str(arrays["z"]),
        "--targets", str(arrays["y"]), "--option", "label_smothing=0.1",
    )  # fmt: skip
    assert done.returncode == 1
    assert one_line(done.stderr).startswith(
        f"ce-eval: POST {server.url}/v1/evaluate: 422 options.label_smothing: unknown option "
        "'label_smothing' for cross_entropy; did you mean 'label_smoothing'?"
    )


def test_unwritable_output_is_a_usage_error(
    server: ServerProcess, arrays: dict[str, Path], tmp_path: Path
) -> None:
    target = tmp_path / "missing-dir" / "g.npy"
    done = cli(
        "evaluate", "--url", server.url, "--logits", str(arrays["z"]),
        "--targets", str(arrays["y"]), "--output", f"grad={target}",
    )  # fmt: skip
    assert done.returncode == 2
    assert one_line(done.stderr).startswith(f"ce-eval: --output grad={target}: cannot write")


def _piped_into_true(*args: str, tmp_path: Path) -> tuple[int, str]:
    """``ce-eval ARGS | true`` in bash: (the CLI's exit status, its stderr). ``true`` exits
    without reading, so the CLI's first write meets a closed pipe."""
    err = tmp_path / "stderr.txt"
    command = " ".join(
        [sys.executable, "-m", "ce_eval_client.cli", *(f"'{a}'" for a in args), f"2>'{err}'"]
    )
    done = subprocess.run(
        ["bash", "-c", f"{command} | true; exit ${{PIPESTATUS[0]}}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done.returncode, err.read_text()


def test_a_closed_pipe_is_quiet(server: ServerProcess, tmp_path: Path) -> None:
    with Client(server.url) as client:
        run = client.create_run("piped", "cross_entropy", metrics=["accuracy"])
    for args in (
        ("run", "close", "--url", server.url, run["id"]),
        ("run", "show", "--url", server.url, run["id"], "--json"),
        ("run", "list", "--url", server.url),
    ):
        status, stderr = _piped_into_true(*args, tmp_path=tmp_path)
        assert stderr == "", (args, stderr)
        assert status == 141, args
    status, stderr = _piped_into_true("--help", tmp_path=tmp_path)  # argparse swallows EPIPE
    assert stderr == "" and status in (0, 141)


# ---------------------------------------------------------------------------------- push


def _dataset(seed: int, parts: int, rows: int, classes: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {
            "logits": (rng.standard_normal((rows, classes)) * 2).astype(np.float32),
            "targets": rng.integers(0, classes, size=rows),
            "sample_weight": rng.uniform(0.5, 2.0, size=rows).astype(np.float32),
        }
        for _ in range(parts)
    ]


def _write_every_format(root: Path, parts: list[dict[str, np.ndarray]]) -> None:
    """One part per format, named so that the push order is the list order."""
    import pyarrow as pa
    import pyarrow.feather
    import pyarrow.ipc
    import pyarrow.parquet
    import safetensors.numpy

    npy = root / "a-npy"
    npy.mkdir(parents=True)
    for key, array in parts[0].items():
        np.save(npy / f"{key}.npy", array)
    np.savez(root / "b.npz", **parts[1])
    safetensors.numpy.save_file(parts[2], str(root / "c.safetensors"))

    def table(part: dict[str, np.ndarray]) -> Any:
        classes = part["logits"].shape[1]
        logits = pa.FixedSizeListArray.from_arrays(pa.array(part["logits"].ravel()), classes)
        return pa.table(
            {"logits": logits, "targets": part["targets"], "sample_weight": part["sample_weight"]}
        )

    pa.parquet.write_table(table(parts[3]), root / "d.parquet", row_group_size=7)
    with pa.ipc.new_file(root / "e.arrow", table(parts[4]).schema) as writer:
        writer.write_table(table(parts[4]), max_chunksize=5)
    with pa.ipc.new_stream(root / "f.arrows", table(parts[5]).schema) as writer:
        writer.write_table(table(parts[5]))
    pa.feather.write_feather(table(parts[6]), root / "g.feather")


def _expected(parts: list[dict[str, np.ndarray]]) -> dict[str, float]:
    z = np.concatenate([p["logits"] for p in parts]).astype(np.float64)
    y = np.concatenate([p["targets"] for p in parts])
    w = np.concatenate([p["sample_weight"] for p in parts]).astype(np.float64)
    per, den, _ = softmax_ce(z, y, fmt="index", sample_weight=w)
    hits = (z.argmax(axis=1) == y) * w
    return {
        "count": len(y),
        "sum": float(per.sum()),
        "denominator": float(den.sum()),
        "accuracy": float(hits.sum() / w.sum()),
    }


def test_push_reads_every_format_concurrently_and_counts_each_row_once(
    server: ServerProcess, tmp_path: Path
) -> None:
    parts = _dataset(1, parts=7, rows=23, classes=5)
    _write_every_format(tmp_path / "data", parts)
    created = cli("run", "create", "--url", server.url, "--name", "formats",
                  "--metric", "accuracy", "--id-only")  # fmt: skip
    run_id = created.stdout.strip()
    pushed = cli("run", "push", "--url", server.url, run_id, str(tmp_path / "data"),
                 "--batch-size", "10", "--concurrency", "3")  # fmt: skip
    assert pushed.returncode == 0, pushed.stderr
    summary = json.loads(pushed.stdout)
    batches = 7 * 3  # ceil(23 / 10) per part
    assert (summary["batches_sent"], summary["accepted"], summary["duplicates"]) == (
        batches,
        batches,
        0,
    )
    assert "161/161 rows" in pushed.stderr and "rows/s" in pushed.stderr
    assert "ETA" in pushed.stderr
    run = httpx.get(f"{server.url}/v1/runs/{run_id}", timeout=30).json()
    expected = _expected(parts)
    assert run["batches"] == batches and run["count"] == expected["count"]
    assert run["sum"] == pytest.approx(expected["sum"], rel=1e-6)
    assert run["denominator"] == pytest.approx(expected["denominator"], rel=1e-12)
    assert run["metrics"]["accuracy"] == pytest.approx(expected["accuracy"], rel=1e-12)

    again = cli("run", "push", "--url", server.url, run_id, str(tmp_path / "data"),
                "--batch-size", "10", "--concurrency", "2", "--quiet")  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["duplicates"] == batches


def test_push_over_grpc_counts_the_same(server: ServerProcess, tmp_path: Path) -> None:
    parts = _dataset(6, parts=2, rows=30, classes=4)
    for i, part in enumerate(parts):
        np.savez(tmp_path / f"p{i}.npz", **part)
    run_id = cli("run", "create", "--url", server.url, "--name", "grpc-push", "--metric",
                 "accuracy", "--id-only").stdout.strip()  # fmt: skip
    pushed = cli("run", "push", "--url", server.url, "--transport", "grpc", "--grpc-target",
                 server.grpc_target, run_id, str(tmp_path), "--batch-size", "8")  # fmt: skip
    assert pushed.returncode == 0, pushed.stderr
    assert json.loads(pushed.stdout)["accepted"] == 2 * 4
    run = httpx.get(f"{server.url}/v1/runs/{run_id}", timeout=30).json()
    expected = _expected(parts)
    assert run["count"] == expected["count"]
    assert run["sum"] == pytest.approx(expected["sum"], rel=1e-6)
    assert run["metrics"]["accuracy"] == pytest.approx(expected["accuracy"], rel=1e-12)
    closed = cli("run", "close", "--url", server.url, run_id)
    assert closed.returncode == 0
    late = cli("run", "push", "--url", server.url, "--transport", "grpc", "--grpc-target",
               server.grpc_target, run_id, str(tmp_path / "p0.npz"), "--quiet")  # fmt: skip
    assert late.returncode == 1
    assert one_line(late.stderr).startswith(f"ce-eval: grpc {server.grpc_target} AddBatch: ")


UNREACHABLE = "http://127.0.0.1:9"  # nothing listens: a request would fail with exit 1


def test_an_unknown_array_is_refused_before_sending(tmp_path: Path) -> None:
    part = _dataset(2, parts=1, rows=4, classes=3)[0]
    renamed = {
        "logits": part["logits"],
        "targets": part["targets"],
        "weights": part["sample_weight"],
    }
    np.savez(tmp_path / "w.npz", **renamed)
    done = cli("run", "push", "--url", UNREACHABLE, "run_x", str(tmp_path / "w.npz"))
    assert done.returncode == 2
    assert one_line(done.stderr).startswith(
        f"ce-eval: {tmp_path / 'w.npz'}: unknown array 'weights'; did you mean 'sample_weight'? "
        "accepted: logits, targets, sample_weight, example_ids, slice.<key> (hint: "
    )


def test_an_unknown_column_is_refused_before_sending(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet

    table = pa.table({"logits": [[0.1, 0.2]], "targets": [1], "label_name": ["cat"]})
    pa.parquet.write_table(table, tmp_path / "t.parquet")
    done = cli("run", "push", "--url", UNREACHABLE, "run_x", str(tmp_path / "t.parquet"))
    assert done.returncode == 2
    accepted = "accepted: logits, targets, sample_weight, example_ids, slice.<key>"
    assert f"unknown column 'label_name'; {accepted}" in one_line(done.stderr)


def test_ragged_list_column_says_which_lengths(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet

    table = pa.table({"logits": [[0.1, 0.2], [0.3]], "targets": [1, 0]})
    pa.parquet.write_table(table, tmp_path / "r.parquet")
    done = cli("run", "push", "--url", UNREACHABLE, "run_x", str(tmp_path / "r.parquet"))
    assert done.returncode == 2
    assert "column 'logits' holds lists of lengths [1, 2]" in one_line(done.stderr)


#: Runs the CLI with pyarrow and safetensors made unimportable (as without the files extra).
WITHOUT_FILES_EXTRA = textwrap.dedent(
    """
    import importlib.abc, sys
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("pyarrow", "safetensors"):
                raise ImportError(f"blocked: {name}")
            return None
    sys.meta_path.insert(0, Block())
    from ce_eval_client.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


@pytest.mark.parametrize(
    ("name", "module"), [("d.parquet", "pyarrow"), ("c.safetensors", "safetensors")]
)
def test_a_missing_files_extra_is_named(tmp_path: Path, name: str, module: str) -> None:
    _write_every_format(tmp_path / "data", _dataset(3, parts=7, rows=3, classes=2))
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_FILES_EXTRA, "run", "push", "--url", UNREACHABLE, "run_x",
         str(tmp_path / "data" / name)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    line = one_line(done.stderr)
    assert f"needs the {module} package" in line
    assert "pip install 'ce-eval-client[files]'" in line


def test_push_flags_are_checked(tmp_path: Path) -> None:
    np.savez(tmp_path / "a.npz", logits=np.zeros((2, 2)), targets=np.array([0, 1]))
    done = cli(
        "run", "push", "--url", UNREACHABLE, "r", str(tmp_path / "a.npz"), "--concurrency", "0"
    )
    assert done.returncode == 2
    assert "--concurrency 0 must be >= 1" in one_line(done.stderr)


# ---------------------------------------------------------------------------------- show


def test_show_prints_the_scalars_and_names_the_details(
    server: ServerProcess, tmp_path: Path
) -> None:
    part = _dataset(4, parts=1, rows=40, classes=6)[0]
    np.savez(tmp_path / "s.npz", **part)
    metrics = ["accuracy", "top_k_accuracy", "confusion_matrix", "reliability"]
    flags = [a for m in metrics for a in ("--metric", m)]
    run_id = cli("run", "create", "--url", server.url, "--name", "shown", "--tag", "team=a",
                 *flags, "--id-only").stdout.strip()  # fmt: skip
    pushed = cli("run", "push", "--url", server.url, run_id, str(tmp_path / "s.npz"), "--quiet")
    assert pushed.returncode == 0, pushed.stderr
    shown = cli("run", "show", "--url", server.url, run_id)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    expected = _expected([part])
    assert lines[0] == f"{run_id}  shown  open  cross_entropy  tags: team=a"
    table = {line.split()[0]: line.split(None, 1)[1] for line in lines[1:-1]}
    assert table["batches"] == "1"
    assert table["count"] == "40  (ignored 0)"
    assert table["accuracy"] == f"{expected['accuracy']:.6g}"
    z, y = part["logits"].astype(np.float64), part["targets"]
    w = part["sample_weight"].astype(np.float64)
    rank = (z > z[np.arange(40), y][:, None]).sum(axis=1)
    top5 = float(((rank < 5) * w).sum() / w.sum())
    assert table["top_k_accuracy"] == f"1: {expected['accuracy']:.6g}  5: {top5:.6g}"
    assert lines[-1].startswith("details: ")
    assert set(lines[-1].split("  (")[0].removeprefix("details: ").split(", ")) == {
        "confusion_matrix",
        "reliability",
    }
    assert len(lines) <= 10  # no matrix rows
    as_json = json.loads(cli("run", "show", "--url", server.url, run_id, "--json").stdout)
    assert as_json == httpx.get(f"{server.url}/v1/runs/{run_id}", timeout=30).json()


def test_detail_flags_need_a_metric() -> None:
    done = cli("run", "show", "--url", UNREACHABLE, "run_x", "--top", "3")
    assert done.returncode == 2
    assert "--top apply to one statistic (hint: add --metric NAME" in one_line(done.stderr)


class ContractDouble:
    """Stand-in for a server with ``GET /v1/runs/{id}/metrics/{name}``: answers from ``route``
    (method, path, query → (status, JSON)) and records each request's raw target."""

    def __init__(self, route: Callable[[str, str, dict[str, str]], tuple[int, Any]]) -> None:
        self.requests: list[tuple[str, str]] = []
        double = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                double.requests.append((self.command, self.path))
                length = int(self.headers.get("content-length") or 0)
                self.rfile.read(length)
                parts = urlsplit(self.path)
                query = {k: v[0] for k, v in parse_qs(parts.query).items()}
                status, body = route(self.command, parts.path, query)
                payload = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_DELETE = _answer

            def log_message(self, *args: Any) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()


#: The runs contract's answers for a 4-class run named cat/dog/fox/owl.
CONTRACT_ANSWERS: dict[tuple[str, str], Any] = {
    ("confusion_matrix", "top=3"): {
        "name": "confusion_matrix",
        "num_classes": 4,
        "top": [
            {"true": 1, "pred": 0, "count": 9},
            {"true": 3, "pred": 2, "count": 4},
            {"true": 0, "pred": 1, "count": 1},
        ],
        "class_names": ["cat", "dog", "fox", "owl"],
    },
    ("confusion_matrix", "classes=1,3&normalize=true"): {
        "name": "confusion_matrix",
        "num_classes": 4,
        "classes": [1, 3],
        "matrix": [[0.25, 0.0], [0.0, 0.5]],
        "class_names": ["dog", "owl"],
    },
    ("per_class", "sort=f1&order=asc&limit=2"): {
        "name": "per_class",
        "total": 4,
        "rows": [
            {
                "class": 2,
                "name": "fox",
                "precision": 0.5,
                "recall": 0.25,
                "f1": 1 / 3,
                "support": 8,
            },
            {"class": 0, "name": "cat", "precision": 0.9, "recall": 0.6, "f1": 0.72, "support": 10},
        ],
    },
    ("reliability", ""): {
        "name": "reliability",
        "value": {"confidence": [0.25, 0.75], "accuracy": [0.5, 0.8], "count": [4, 6]},
    },
}


def _contract_route(method: str, path: str, query: dict[str, str]) -> tuple[int, Any]:
    prefix = "/v1/runs/run_1/metrics/"
    if method != "GET" or not path.startswith(prefix):
        return 404, {"status": 404, "detail": "Not Found"}
    key = (path.removeprefix(prefix), "&".join(f"{k}={v}" for k, v in query.items()))
    if key in CONTRACT_ANSWERS:
        return 200, CONTRACT_ANSWERS[key]
    return 404, {"status": 404, "detail": f"no answer for {key}", "errors": []}


@pytest.fixture
def contract_double() -> Iterator[ContractDouble]:
    double = ContractDouble(_contract_route)
    yield double
    double.close()


@CONTRACT_DOUBLE
def test_show_metric_tables_against_the_contract(contract_double: ContractDouble) -> None:
    def show(*flags: str) -> list[str]:
        done = cli("run", "show", "--url", contract_double.url, "run_1", *flags)
        assert done.returncode == 0, done.stderr
        return done.stdout.splitlines()

    assert show("--metric", "confusion_matrix", "--top", "3") == [
        "confusion_matrix: the 3 largest off-diagonal cells of 4 classes",
        "true     pred     count",
        "1 (dog)  0 (cat)      9",
        "3 (owl)  2 (fox)      4",
        "0 (cat)  1 (dog)      1",
    ]
    assert show("--metric", "confusion_matrix", "--classes", "1,3", "--normalize") == [
        "confusion_matrix: rows true, columns predicted, 2 of 4 classes",
        "true \\ pred     1    3",
        "1 (dog)      0.25    0",
        "3 (owl)         0  0.5",
    ]
    assert show("--metric", "per_class", "--sort", "f1", "--order", "asc", "--limit", "2") == [
        "per_class: 2 of 4 classes",
        "class  name  precision  recall        f1  support",
        "    2  fox         0.5    0.25  0.333333        8",
        "    0  cat         0.9     0.6      0.72       10",
    ]
    assert show("--metric", "reliability") == [
        "reliability:",
        "confidence  accuracy  count",
        "      0.25       0.5      4",
        "      0.75       0.8      6",
    ]
    detail = json.loads("\n".join(show("--metric", "confusion_matrix", "--top", "3", "--json")))
    assert detail == CONTRACT_ANSWERS[("confusion_matrix", "top=3")]


def test_show_detail_against_the_server(server: ServerProcess, tmp_path: Path) -> None:
    """The same command against a real server: needs ``GET /v1/runs/{id}/metrics/{name}``."""
    if not detail_endpoint_served(server.url):
        pytest.skip("GET /v1/runs/{id}/metrics/{name} is not served by this build yet")
    part = _dataset(5, parts=1, rows=60, classes=4)[0]
    np.savez(tmp_path / "m.npz", **part)
    run_id = cli("run", "create", "--url", server.url, "--name", "detail", "--metric",
                 "confusion_matrix", "--id-only").stdout.strip()  # fmt: skip
    pushed = cli("run", "push", "--url", server.url, run_id, str(tmp_path / "m.npz"), "--quiet")
    assert pushed.returncode == 0, pushed.stderr
    done = cli(
        "run", "show", "--url", server.url, run_id, "--metric", "confusion_matrix", "--top", "2"
    )
    assert done.returncode == 0, done.stderr
    w = part["sample_weight"].astype(np.float64)
    cells = np.zeros((4, 4))
    np.add.at(cells, (part["targets"], part["logits"].argmax(axis=1)), w)
    off = sorted((-cells[i, j], i, j) for i in range(4) for j in range(4) if i != j)[:2]
    rows = [line.split() for line in done.stdout.splitlines()[2:]]
    assert [(int(r[0]), int(r[1])) for r in rows] == [(i, j) for _, i, j in off]
    assert [float(r[2]) for r in rows] == pytest.approx([-c for c, _, _ in off], rel=1e-6)


# ------------------------------------------------------------------------------- run ids


def test_run_ids_stay_one_path_segment(tmp_path: Path) -> None:
    np.savez(tmp_path / "a.npz", logits=np.zeros((2, 2), np.float32), targets=np.array([0, 1]))
    double = ContractDouble(lambda method, path, query: (404, {"status": 404, "detail": "no"}))
    try:
        done = cli("run", "push", "--url", double.url, "../../v1/evaluate?x=",
                   str(tmp_path / "a.npz"), "--retries", "0", "--quiet")  # fmt: skip
    finally:
        double.close()
    assert done.returncode == 1
    assert double.requests == [("POST", "/v1/runs/%2E%2E%2F%2E%2E%2Fv1%2Fevaluate%3Fx%3D/batches")]


def test_a_hostile_run_id_is_a_404_from_the_server(server: ServerProcess, tmp_path: Path) -> None:
    np.savez(tmp_path / "a.npz", logits=np.zeros((2, 2), np.float32), targets=np.array([0, 1]))
    done = cli("run", "push", "--url", server.url, "../../v1/evaluate?x=", str(tmp_path / "a.npz"),
               "--quiet")  # fmt: skip
    assert done.returncode == 1
    line = one_line(done.stderr)
    assert "/v1/runs/%2E%2E%2F%2E%2E%2Fv1%2Fevaluate%3Fx%3D/batches: 404" in line


def test_create_with_intervals_and_slices_then_gate_with_junit(
    server: ServerProcess, tmp_path: Path
) -> None:
    """`run create --replicates --slice-key`, batches with ids and slices (SDK), then `ce-eval
    gate` against the real server: exit 0 on a pass, 1 on a fail, JUnit written either way."""
    import xml.etree.ElementTree as ET

    from ce_eval_client import Client

    rng = np.random.default_rng(3)
    logits, targets = rng.standard_normal((80, 4)), rng.integers(0, 4, 80)
    ids = [f"x{i}" for i in range(80)]
    lang = [["en", "de"][i % 2] for i in range(80)]
    runs = []
    for name, noise in (("base", 0.0), ("cand", 0.3)):
        created = cli("run", "create", "--url", server.url, "--name", name, "--metric",
                      "accuracy", "--replicates", "50", "--seed", "4", "--slice-key", "lang",
                      "--id-only")  # fmt: skip
        assert created.returncode == 0, created.stderr
        run_id = created.stdout.strip()
        with Client(server.url) as client:
            z = logits + noise * rng.standard_normal(logits.shape)
            client.add_batch(run_id, "b0", z, targets, example_ids=ids, slices={"lang": lang})
            run = client.get_run(run_id)
        assert run["confidence"] == {"replicates": 50, "level": 0.95, "seed": 4}
        assert run["slice_keys"] == ["lang"] and run["paired_ids"] is True
        runs.append(run_id)
    report = tmp_path / "report.xml"
    checks = ["--check", "accuracy:-1", "--check", "value@lang=de:+10"]
    passed = cli("gate", "--url", server.url, runs[1], "--baseline", runs[0], *checks,
                 "--junit", str(report))  # fmt: skip
    assert passed.returncode == 0, passed.stdout + passed.stderr
    cases = ET.parse(report).getroot().iter("testcase")
    assert [c.find("failure") for c in cases] == [None, None]
    failed = cli("gate", "--url", server.url, runs[1], "--baseline", runs[0],
                 "--check", "accuracy:>=0.999", "--junit", str(report))  # fmt: skip
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert ET.parse(report).getroot().find(".//failure") is not None
    bad = cli("gate", "--url", server.url, runs[1], "--baseline", runs[0], "--check", "oops")
    assert bad.returncode == 2


def test_push_sends_example_ids_and_slices_from_files(
    server: ServerProcess, tmp_path: Path
) -> None:
    """`example_ids` and `slice.<key>` arrays / columns of .npz and Parquet files become the
    batches' ids and slices: a re-push counts nothing twice, and the runs of both formats have
    the same fingerprint and slices."""
    import pyarrow as pa
    import pyarrow.parquet

    from ce_eval_client import Client

    rng = np.random.default_rng(5)
    z = rng.standard_normal((30, 3)).astype(np.float32)
    y = rng.integers(0, 3, 30)
    ids = np.array([f"row{i}" for i in range(30)])
    lang = np.array([["en", "de", "fr"][i % 3] for i in range(30)])
    np.savez(tmp_path / "a.npz", logits=z, targets=y, example_ids=ids, **{"slice.lang": lang})
    table = pa.table({
        "logits": pa.array(z.tolist(), pa.list_(pa.float32(), 3)), "targets": y,
        "example_ids": ids.tolist(), "slice.lang": lang.tolist(),
    })  # fmt: skip
    pa.parquet.write_table(table, tmp_path / "a.parquet")
    runs = []
    for name in ("a.npz", "a.parquet"):
        flags = ["--replicates", "20", "--slice-key", "lang", "--id-only"]
        created = cli("run", "create", "--url", server.url, "--name", name, "--metric",
                      "accuracy", *flags)  # fmt: skip
        run_id = created.stdout.strip()
        for _ in range(2):
            pushed = cli("run", "push", "--url", server.url, run_id, str(tmp_path / name),
                         "--batch-size", "8", "--quiet")  # fmt: skip
            assert pushed.returncode == 0, pushed.stderr
        runs.append(run_id)
    with Client(server.url) as client:
        got = [client.get_run(r) for r in runs]
        pages = [client.run_slices(r, "lang", sort="slice") for r in runs]
    assert got[0]["batches"] == 4 and got[0]["count"] == 30 and got[0]["paired_ids"] is True
    assert got[0]["fingerprint"] == got[1]["fingerprint"]
    assert [(r["slice"], r["count"]) for r in pages[0]["slices"]] == [
        ("fr", 10),
        ("en", 10),
        ("de", 10),
    ]
    for mine, other in zip(pages[0]["slices"], pages[1]["slices"], strict=True):
        assert (mine["slice"], mine["count"]) == (other["slice"], other["count"])
        assert mine["value"] == pytest.approx(other["value"], rel=1e-12)
        assert mine["metrics"] == other["metrics"]
