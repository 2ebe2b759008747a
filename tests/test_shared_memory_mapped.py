"""Logits in shared memory evaluated from a mapping by worker processes
(``service.dataplane.mapped``): the same answers as the copying path, a worker killed by a
truncation (409, the next request served by a new worker), a worker dying otherwise (503),
mappings dropped on unregister, workers stopped at shutdown."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
from fastapi.testclient import TestClient

from service import shared_memory as shm_module
from service.dataplane import mapped as mapped_module
from service.dataplane.mapped import MappedEvaluator, WorkerDied
from service.errors import Unavailable, ValidationFailed
from service.http.app import create_app
from service.shared_memory import (
    MAPPED_MIN_BYTES,
    MappedTensor,
    RegionAccess,
    RegionTruncated,
    SharedMemoryRegistry,
    TensorRef,
)
from tests.servers import ServerProcess, start_serve
from tests.test_shared_memory import A, _register, _settings, _shm_input, reference_ce

RNG = np.random.default_rng(1919)
N, C = 64, MAPPED_MIN_BYTES // 4 // 64  # float32 logits of exactly MAPPED_MIN_BYTES
LOGITS = RNG.standard_normal((N, C)).astype(np.float32)
TARGETS = RNG.integers(0, C, size=N)
GRAD_AT = LOGITS.nbytes + 4096  # the targets lie at LOGITS.nbytes, the gradient from here
SIZE = GRAD_AT + LOGITS.nbytes
#: the ``evaluator`` fixture: the evaluator, the MappedTensor of LOGITS, their registry
Evaluator = tuple[MappedEvaluator, Any, SharedMemoryRegistry]


@pytest.fixture
def segment() -> Iterator[shared_memory.SharedMemory]:
    """An object holding LOGITS then TARGETS, with room for the gradient; unlinked at the end."""
    shm = shared_memory.SharedMemory(create=True, size=SIZE)
    assert shm.buf is not None
    shm.buf[: LOGITS.nbytes] = LOGITS.tobytes()
    shm.buf[LOGITS.nbytes : LOGITS.nbytes + TARGETS.nbytes] = TARGETS.tobytes()
    try:
        yield shm
    finally:
        shm.close()
        shm.unlink()


def _body(targets: np.ndarray = TARGETS, grad: bool = True) -> dict[str, Any]:
    body: dict[str, Any] = {
        "inputs": [
            _shm_input("logits", LOGITS, "r"),
            _shm_input("targets", targets, "r", LOGITS.nbytes),
        ],
        "parameters": {"metrics": "accuracy,nll"},
    }
    if grad:
        parameters = {
            "shared_memory_region": "r",
            "shared_memory_offset": GRAD_AT,
            "shared_memory_byte_size": LOGITS.nbytes,
        }
        body["outputs"] = [{"name": "loss"}, {"name": "grad", "parameters": parameters}]
    return body


def _answer(tmp_path: Path, segment: shared_memory.SharedMemory, workers: int, body: Any) -> Any:
    """(status, answer without its timing, the gradient's bytes) from one server's infer."""
    settings = _settings(tmp_path, shared_memory_workers=workers)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        assert _register(client, "r", "/" + segment.name, SIZE).status_code == 200
        r = client.post("/v2/models/cross_entropy/infer", json=body, headers=A)
    answer = r.json()
    answer.get("parameters", {}).pop("elapsed_ms", None)
    assert segment.buf is not None
    grad = bytes(segment.buf[GRAD_AT:SIZE])
    segment.buf[GRAD_AT:SIZE] = bytes(SIZE - GRAD_AT)
    return r.status_code, answer, grad


@pytest.mark.parametrize("case", ["metrics", "grad", "engine_error"])
def test_mapped_logits_answer_as_the_copying_path(
    tmp_path: Path,
    segment: shared_memory.SharedMemory,
    monkeypatch: pytest.MonkeyPatch,
    case: str,
) -> None:
    """Same status, answer and written gradient, byte for byte, as logits copied with pread.
    The mapped path reads no logits' bytes in the server, except for a request whose answer
    holds a logits-sized output (``grad``): that one copies them and runs in the server."""
    targets = TARGETS if case != "engine_error" else TARGETS + C  # out of range: the engine's 422
    if case == "engine_error":
        assert segment.buf is not None
        segment.buf[LOGITS.nbytes : LOGITS.nbytes + targets.nbytes] = targets.tobytes()
    read: list[int] = []
    pread_into = shm_module._pread_into

    def counting(fd: int, buffer: memoryview, offset: int) -> int:
        read.append(len(buffer))
        return pread_into(fd, buffer, offset)

    monkeypatch.setattr(shm_module, "_pread_into", counting)
    body = _body(targets, grad=case == "grad")
    mapped = _answer(tmp_path / "mapped", segment, 1, body)
    assert (max(read) >= LOGITS.nbytes) == (case == "grad")
    read.clear()
    copied = _answer(tmp_path / "copied", segment, 0, body)
    assert LOGITS.nbytes in read
    assert mapped == copied
    status, answer, grad_bytes = mapped
    if case == "engine_error":
        assert status == 422 and answer["errors"][0]["loc"][0] == "targets"
        return
    assert status == 200, answer
    value, grad = reference_ce(LOGITS, TARGETS)
    assert answer["parameters"]["value"] == pytest.approx(value, rel=1e-6)
    if case == "metrics":
        accuracy = float(np.mean(LOGITS.argmax(1) == TARGETS))
        assert orjson.loads(answer["outputs"][-1]["data"][0])["accuracy"] == pytest.approx(accuracy)
    else:
        written = np.frombuffer(grad_bytes, np.float32).reshape(N, C)
        np.testing.assert_allclose(written, grad, rtol=1e-5, atol=1e-9)


# --- the evaluator itself -------------------------------------------------------------------


@pytest.fixture
def evaluator(
    segment: shared_memory.SharedMemory,
) -> Iterator[Evaluator]:
    """A one-worker evaluator, the MappedTensor of LOGITS in ``segment``'s region "r", and the
    registry that holds it."""
    registry = SharedMemoryRegistry(True, 4, 1 << 30, maps_logits=True)
    evaluator = MappedEvaluator(1)
    registry.on_drop = evaluator.forget
    registry.register(None, "r", "/" + segment.name, 0, SIZE)
    ref = TensorRef("r", 0, LOGITS.nbytes, ("inputs", 0))
    tensor = MappedTensor(RegionAccess(registry, None), ref, (N, C), np.dtype("<f4"))
    try:
        yield evaluator, tensor, registry
    finally:
        registry.close()
        evaluator.close()


ARGUMENTS = {"targets": TARGETS, "backend": "numpy"}


def _worker_pids(evaluator: MappedEvaluator) -> list[int]:
    return [worker.process.pid for worker in evaluator._running]


#: A ``sitecustomize`` the workers import (their PYTHONPATH comes first): faults injected in
#: the worker process alone, by ``CE_EVAL_TEST_FAULT``.
SITECUSTOMIZE = """\
import errno, mmap, os
fault = os.environ.get("CE_EVAL_TEST_FAULT")
if fault == "stale_fstat":  # the worker's size check sees the object as it was
    real_fstat = os.fstat
    def fstat(fd):
        values = list(real_fstat(fd)[:10])
        values[6] = max(values[6], 1 << 40)
        return os.stat_result(values)
    os.fstat = fstat
elif fault == "mmap_enomem":
    class NoMemory(mmap.mmap):
        def __new__(cls, *args, **kwargs):
            raise OSError(errno.ENOMEM, "Cannot allocate memory")
    mmap.mmap = NoMemory
"""


@pytest.fixture
def worker_fault(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """``worker_fault(name)``: workers started from now on run with that fault."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)

    def inject(name: str) -> None:
        monkeypatch.setenv("PYTHONPATH", f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
        monkeypatch.setenv("CE_EVAL_TEST_FAULT", name)

    return inject


def _truncating_calls(
    monkeypatch: pytest.MonkeyPatch, path: str, regrow: bool = False
) -> list[Any]:
    """Every worker call truncates the object at ``path`` to 4096 bytes first (after the
    server's size check); with ``regrow``, a dead worker is reaped only once the object has
    its size back. Returns the reaped workers' exit codes."""
    call, exit_code, codes = mapped_module._Worker.call, mapped_module._Worker.exit_code, []

    def truncating(self: Any, fd: int, job: Any) -> Any:
        os.truncate(path, 4096)
        return call(self, fd, job)

    def recorded(self: Any) -> int | None:
        if regrow:
            _rewrite(path, SIZE)
        codes.append(exit_code(self))
        return codes[-1]

    monkeypatch.setattr(mapped_module._Worker, "call", truncating)
    monkeypatch.setattr(mapped_module._Worker, "exit_code", recorded)
    return codes


def test_a_truncation_after_the_servers_check_is_409_from_a_warm_worker_which_lives(
    evaluator: Evaluator,
    segment: shared_memory.SharedMemory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The worker holds the region's mapping from an earlier request; the object shrinks
    after the server's size check: the worker's own check answers 409, before any touch."""
    mapped, tensor, _ = evaluator
    value, _ = reference_ce(LOGITS, TARGETS)
    assert mapped.evaluate(tensor, "cross_entropy", ARGUMENTS).value == pytest.approx(value)
    first = _worker_pids(mapped)
    path = f"/dev/shm/{segment.name}"
    segment.close()  # our own mapping goes first: touching it after truncation would fault
    codes = _truncating_calls(monkeypatch, path)
    with pytest.raises(RegionTruncated, match="now holds 4096 bytes") as info:
        mapped.evaluate(tensor, "cross_entropy", ARGUMENTS)
    assert info.value.status_code == 409 and codes == []
    monkeypatch.undo()
    _rewrite(path, SIZE)
    assert mapped.evaluate(tensor, "cross_entropy", ARGUMENTS).value == pytest.approx(value)
    assert _worker_pids(mapped) == first


@pytest.mark.parametrize("regrow", [False, True], ids=["truncated", "truncated-then-regrown"])
def test_a_worker_killed_by_a_truncation_is_409_and_the_next_request_gets_a_new_one(
    evaluator: Evaluator,
    segment: shared_memory.SharedMemory,
    monkeypatch: pytest.MonkeyPatch,
    worker_fault: Any,
    regrow: bool,
) -> None:
    """A truncation the worker's size check misses (injected: its ``fstat`` is stale) faults
    on the kept mapping: the worker dies of SIGBUS, the request is 409 (also when the object
    has grown back by then), the server lives and the next request gets a new worker."""
    worker_fault("stale_fstat")
    mapped, tensor, _ = evaluator
    value, _ = reference_ce(LOGITS, TARGETS)
    assert mapped.evaluate(tensor, "cross_entropy", ARGUMENTS).value == pytest.approx(value)
    first = _worker_pids(mapped)
    path = f"/dev/shm/{segment.name}"
    segment.close()
    codes = _truncating_calls(monkeypatch, path, regrow)
    with pytest.raises(RegionTruncated, match="truncated") as info:
        mapped.evaluate(tensor, "cross_entropy", ARGUMENTS)
    assert info.value.status_code == 409
    assert codes == [-signal.SIGBUS]
    monkeypatch.undo()
    _rewrite(path, SIZE)
    assert mapped.evaluate(tensor, "cross_entropy", ARGUMENTS).value == pytest.approx(value)
    assert _worker_pids(mapped) and _worker_pids(mapped) != first


def test_a_mapping_that_fails_otherwise_is_503_not_a_truncation(
    evaluator: Evaluator, worker_fault: Any
) -> None:
    worker_fault("mmap_enomem")
    mapped, tensor, _ = evaluator
    with pytest.raises(Unavailable, match="could not map") as info:
        mapped.evaluate(tensor, "cross_entropy", ARGUMENTS)
    assert info.value.status_code == 503 and info.value.errors[0]["type"] == "unmappable"


def test_a_worker_that_dies_otherwise_is_503(
    evaluator: Evaluator, monkeypatch: pytest.MonkeyPatch
) -> None:
    mapped, tensor, _ = evaluator
    call = mapped_module._Worker.call

    def killing(self: Any, fd: int, job: Any) -> Any:
        os.kill(self.process.pid, signal.SIGKILL)
        return call(self, fd, job)

    monkeypatch.setattr(mapped_module._Worker, "call", killing)
    with pytest.raises(WorkerDied, match="signal 9") as info:
        mapped.evaluate(tensor, "cross_entropy", ARGUMENTS)
    assert info.value.status_code == 503
    monkeypatch.setattr(mapped_module._Worker, "call", call)
    assert mapped.evaluate(tensor, "cross_entropy", ARGUMENTS).count == N


def test_a_request_waiting_for_the_only_worker_gets_a_new_one_when_it_dies(
    evaluator: Evaluator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One worker, two requests: the first one's worker dies while the second waits for it;
    the second is served by a new worker instead of waiting for ever."""
    mapped, tensor, _ = evaluator
    call, calls = mapped_module._Worker.call, []

    def first_dies(self: Any, fd: int, job: Any) -> Any:
        calls.append(self.process.pid)
        if len(calls) == 1:
            time.sleep(0.5)  # the second request is waiting for a worker by now
            os.kill(self.process.pid, signal.SIGKILL)
        return call(self, fd, job)

    monkeypatch.setattr(mapped_module._Worker, "call", first_dies)
    answers: dict[str, Any] = {}

    def run(name: str) -> None:
        try:
            answers[name] = mapped.evaluate(tensor, "cross_entropy", ARGUMENTS)
        except Exception as exc:
            answers[name] = exc

    threads = [threading.Thread(target=run, args=(name,), daemon=True) for name in "ab"]
    threads[0].start()
    time.sleep(0.1)
    threads[1].start()
    for thread in threads:  # daemon threads: a regression fails here instead of hanging
        thread.join(30)
    assert isinstance(answers["a"], WorkerDied)
    assert answers["b"].count == N
    assert len(calls) == 2 and calls[0] != calls[1]


def test_engine_errors_come_back_as_the_services(
    evaluator: Evaluator,
) -> None:
    mapped, tensor, _ = evaluator
    with pytest.raises(ValidationFailed) as info:
        mapped.evaluate(tensor, "cross_entropy", {"targets": TARGETS[:3], "backend": "numpy"})
    assert info.value.status_code == 422 and info.value.errors


def _rewrite(path: str, size: int, at: int = 0) -> None:
    """Resize the object at ``path`` to ``size`` bytes and write LOGITS at ``at``."""
    os.truncate(path, size)
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, LOGITS.tobytes(), at)
    finally:
        os.close(fd)


def test_a_truncation_before_the_workers_first_mapping_is_409_and_the_worker_lives(
    evaluator: Evaluator,
    segment: shared_memory.SharedMemory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The object shrinks after the server's size check and before the worker maps it (no
    earlier request): the worker finds it too short, the request is 409 and the same worker
    serves the next one."""
    mapped, tensor, _ = evaluator
    path = f"/dev/shm/{segment.name}"
    call = mapped_module._Worker.call

    def truncating(self: Any, fd: int, job: Any) -> Any:
        os.truncate(path, 4096)
        return call(self, fd, job)

    monkeypatch.setattr(mapped_module._Worker, "call", truncating)
    segment.close()
    with pytest.raises(RegionTruncated, match="now holds 4096 bytes") as info:
        mapped.evaluate(tensor, "cross_entropy", ARGUMENTS)
    assert info.value.status_code == 409
    (pid,) = _worker_pids(mapped)
    monkeypatch.setattr(mapped_module._Worker, "call", call)
    _rewrite(path, SIZE)
    value, _ = reference_ce(LOGITS, TARGETS)
    assert mapped.evaluate(tensor, "cross_entropy", ARGUMENTS).value == pytest.approx(value)
    assert _worker_pids(mapped) == [pid]


def test_an_object_shrunk_below_its_regions_end_still_serves_the_tensors_it_holds(
    evaluator: Evaluator, segment: shared_memory.SharedMemory
) -> None:
    """The region spans SIZE bytes, the object only the logits (as a read allows); once the
    object grows again, logits further in the same region are mapped anew."""
    mapped, tensor, _ = evaluator
    path = f"/dev/shm/{segment.name}"
    segment.close()
    os.truncate(path, LOGITS.nbytes)
    value, _ = reference_ce(LOGITS, TARGETS)
    assert mapped.evaluate(tensor, "cross_entropy", ARGUMENTS).value == pytest.approx(value)
    at = SIZE - LOGITS.nbytes  # GRAD_AT: page-aligned, past the first mapping's end
    _rewrite(path, SIZE, at)
    further = MappedTensor(
        tensor.access, TensorRef("r", at, LOGITS.nbytes, ("inputs", 0)), (N, C), tensor.dtype
    )
    assert mapped.evaluate(further, "cross_entropy", ARGUMENTS).value == pytest.approx(value)


def test_a_region_unregistered_while_its_request_waits_is_not_kept_mapped(
    evaluator: Evaluator,
    segment: shared_memory.SharedMemory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The request located its region, then the region is unregistered before a worker takes
    the job (which still maps it, through the request's own descriptor): the worker unmaps it
    once the request is answered."""
    mapped, tensor, registry = evaluator
    take = MappedEvaluator._take

    def unregistering(self: MappedEvaluator) -> Any:
        registry.unregister(None, "r")
        return take(self)

    monkeypatch.setattr(MappedEvaluator, "_take", unregistering)
    assert mapped.evaluate(tensor, "cross_entropy", ARGUMENTS).count == N
    (pid,) = _worker_pids(mapped)
    deadline = time.monotonic() + 10
    while _maps(pid, segment.name) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not _maps(pid, segment.name)


def test_worker_errors_echo_as_configured_and_count_every_error(
    segment: shared_memory.SharedMemory,
) -> None:
    """``CE_EVAL_ECHO_MAX_CHARS`` holds in the worker too, and ``errors_total`` counts all 30
    errors, not the 20 kept."""
    registry = SharedMemoryRegistry(True, 4, 1 << 30, maps_logits=True)
    mapped = MappedEvaluator(1, echo_max_chars=8)
    try:
        registry.register(None, "r", "/" + segment.name, 0, SIZE)
        ref = TensorRef("r", 0, LOGITS.nbytes, ("inputs", 0))
        tensor = MappedTensor(RegionAccess(registry, None), ref, (N, C), np.dtype("<f4"))
        options = {"k" * 100 + str(i): 1 for i in range(30)}
        with pytest.raises(ValidationFailed) as info:
            mapped.evaluate(tensor, "cross_entropy", {**ARGUMENTS, "options": options})
    finally:
        registry.close()
        mapped.close()
    assert info.value.errors_total == 30 and len(info.value.errors) == 20
    assert info.value.errors[0]["loc"] == ["options", "k" * 8 + "…"]


def test_workers_ignore_sigterm_write_no_core_and_skip_the_working_directory(
    evaluator: Evaluator,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker started from a directory holding a ``numpy.py`` imports the real NumPy (also
    with an empty entry in PYTHONPATH); a SIGTERM (systemd stopping the unit) leaves it to
    the server; it has no core dumps."""
    (tmp_path / "numpy.py").write_text("raise SystemExit(3)\n")
    monkeypatch.chdir(tmp_path)
    # an empty entry (the working directory), as `export PYTHONPATH=$PYTHONPATH:/x` leaves
    monkeypatch.setenv("PYTHONPATH", os.pathsep + os.environ.get("PYTHONPATH", ""))
    mapped, tensor, _ = evaluator
    assert mapped.evaluate(tensor, "cross_entropy", ARGUMENTS).count == N
    (pid,) = _worker_pids(mapped)
    limits = Path(f"/proc/{pid}/limits").read_text().splitlines()
    assert [line.split()[4:6] for line in limits if line.startswith("Max core file size")] == [
        ["0", "0"]
    ]
    os.kill(pid, signal.SIGTERM)
    time.sleep(0.3)
    assert mapped.evaluate(tensor, "cross_entropy", ARGUMENTS).count == N
    assert _worker_pids(mapped) == [pid]


def test_dead_idle_workers_are_reaped_and_the_last_released_is_taken_first() -> None:
    """Any idle worker that died is reaped at the next take, also one below a live one."""
    mapped = MappedEvaluator(2)
    try:
        (first, _), (second, _) = mapped._take(), mapped._take()
        mapped._release(first)
        mapped._release(second)
        assert mapped._take()[0] is second
        mapped._release(second)
        os.kill(first.process.pid, signal.SIGKILL)  # below `second` in the idle stack
        first.process.wait(10)
        assert mapped._take()[0] is second
        assert first.conn.closed and mapped._running == [second]
        mapped._release(second)
    finally:
        mapped.close()


def test_workers_share_the_kernel_threads_out(
    segment: shared_memory.SharedMemory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``cpu_threads`` 4 over 2 workers: a lone job gets 4 kernel threads, one starting while
    another runs 2 (not 2 × 4 threads on 4 cores), a lone one afterwards 4 again."""
    registry = SharedMemoryRegistry(True, 4, 1 << 30, maps_logits=True)
    registry.register(None, "r", "/" + segment.name, 0, SIZE)
    ref = TensorRef("r", 0, LOGITS.nbytes, ("inputs", 0))
    tensor = MappedTensor(RegionAccess(registry, None), ref, (N, C), np.dtype("<f4"))
    mapped = MappedEvaluator(2, cpu_threads=4)
    call, threads, started = mapped_module._Worker.call, [], threading.Event()

    def recording(self: Any, fd: int, job: Any) -> Any:
        threads.append(job.threads)
        if len(threads) == 1:
            started.set()
            time.sleep(1.0)  # the second job starts meanwhile
        return call(self, fd, job)

    monkeypatch.setattr(mapped_module._Worker, "call", recording)
    try:
        first = threading.Thread(
            target=mapped.evaluate, args=(tensor, "cross_entropy", ARGUMENTS), daemon=True
        )
        first.start()
        assert started.wait(30)
        assert mapped.evaluate(tensor, "cross_entropy", ARGUMENTS).count == N
        first.join(30)
        assert mapped.evaluate(tensor, "cross_entropy", ARGUMENTS).count == N
    finally:
        registry.close()
        mapped.close()
    assert threads == [4, 2, 4]


def test_close_waits_once_for_all_busy_workers_then_kills_them(
    segment: shared_memory.SharedMemory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two workers busy past ``wait``: close returns after about ``wait`` in all (not one
    ``wait`` per worker) and both evaluations answer 503."""
    registry = SharedMemoryRegistry(True, 4, 1 << 30, maps_logits=True)
    registry.register(None, "r", "/" + segment.name, 0, SIZE)
    ref = TensorRef("r", 0, LOGITS.nbytes, ("inputs", 0))
    tensor = MappedTensor(RegionAccess(registry, None), ref, (N, C), np.dtype("<f4"))
    mapped = MappedEvaluator(2)
    call, started = mapped_module._Worker.call, threading.Semaphore(0)

    def slow(self: Any, fd: int, job: Any) -> Any:
        started.release()
        time.sleep(4.0)
        return call(self, fd, job)

    monkeypatch.setattr(mapped_module._Worker, "call", slow)
    answers: list[Any] = []

    def run() -> None:
        try:
            answers.append(mapped.evaluate(tensor, "cross_entropy", ARGUMENTS))
        except Exception as exc:
            answers.append(exc)

    threads = [threading.Thread(target=run, daemon=True) for _ in range(2)]
    for thread in threads:
        thread.start()
    assert started.acquire(timeout=30) and started.acquire(timeout=30)
    began = time.monotonic()
    mapped.close(wait=1.0)
    assert time.monotonic() - began < 1.6  # one wait, not one a worker
    for thread in threads:
        thread.join(30)
    registry.close()
    assert len(answers) == 2 and all(isinstance(a, WorkerDied) for a in answers)


def _maps(pid: int, name: str) -> bool:
    with open(f"/proc/{pid}/maps") as maps:
        return any(name in line for line in maps)


def test_unregister_unmaps_the_region_in_every_worker_and_close_stops_them(
    evaluator: Evaluator,
    segment: shared_memory.SharedMemory,
) -> None:
    mapped, tensor, registry = evaluator
    mapped.evaluate(tensor, "cross_entropy", ARGUMENTS)
    (pid,) = _worker_pids(mapped)
    assert _maps(pid, segment.name)  # kept for the region's next request
    registry.unregister(None, "r")
    deadline = time.monotonic() + 10
    while _maps(pid, segment.name) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not _maps(pid, segment.name)
    process = mapped._running[0].process
    mapped.close()
    assert process.poll() == 0
    registry.register(None, "r", "/" + segment.name, 0, SIZE)
    with pytest.raises(Unavailable, match="shutting down"):
        mapped.evaluate(tensor, "cross_entropy", ARGUMENTS)


# --- through ce-eval serve ------------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    process = start_serve({"CE_EVAL_SHARED_MEMORY": "true", "CE_EVAL_SHARED_MEMORY_WORKERS": "1"})
    yield process
    process.stop()


def _in_place(http: httpx.Client, outcome: str = "ok") -> float:
    """The server's ``ce_eval_shared_memory_in_place_total`` for ``outcome``."""
    series = f'ce_eval_shared_memory_in_place_total{{outcome="{outcome}"}} '
    lines = http.get("/metrics").text.splitlines()
    return sum(float(line[len(series) :]) for line in lines if line.startswith(series))


def test_served_mapped_evaluation_and_a_truncated_object(
    server: ServerProcess, segment: shared_memory.SharedMemory
) -> None:
    """Served in place by a worker; an object truncated before the request is 409 from the
    server's own size check (the worker-side truncations are tested above)."""
    with httpx.Client(base_url=server.url, timeout=60) as http:
        assert _register(http, "r", "/" + segment.name, SIZE).status_code == 200
        before = _in_place(http)
        r = http.post("/v2/models/cross_entropy/infer", json=_body(grad=False))
        assert r.status_code == 200, r.text
        assert _in_place(http) == before + 1
        value, _ = reference_ce(LOGITS, TARGETS)
        assert r.json()["parameters"]["value"] == pytest.approx(value, rel=1e-6)
        segment.close()
        os.truncate(f"/dev/shm/{segment.name}", 4096)
        r = http.post("/v2/models/cross_entropy/infer", json=_body(grad=False))
        assert r.status_code == 409, r.text
        assert server.process is not None and server.process.poll() is None
        assert http.post("/v2/systemsharedmemory/unregister").status_code == 200


def test_sdk_shared_array_is_evaluated_in_place(server: ServerProcess) -> None:
    """Logits written into ``Client.shared_array`` go by region, not copied: the request names
    the array's own region, a change made in place shows in the next answer, and ``close``
    unregisters and unlinks the region even while the array is still referenced."""
    from ce_eval_client.sdk import Client

    with httpx.Client(base_url=server.url, timeout=60) as http:
        before = _in_place(http)
        with Client(server.url, shared_memory=True) as client:
            logits = client.shared_array((N, C))
            assert logits.dtype == np.float32 and not logits.any()
            logits[:] = LOGITS
            sent: list[bytes] = []
            client._http.event_hooks["request"] = [lambda request: sent.append(request.read())]
            answer = client.evaluate("cross_entropy", logits, TARGETS, outputs=["loss", "grad"])
            value, grad = reference_ce(LOGITS, TARGETS)
            assert answer.value == pytest.approx(value, rel=1e-6)
            np.testing.assert_allclose(answer.outputs["grad"], grad, rtol=1e-5, atol=1e-9)
            (inputs,) = [orjson.loads(body)["inputs"] for body in sent if b"inputs" in body]
            named = {item["name"]: item["parameters"] for item in inputs}
            regions = http.get("/v2/systemsharedmemory/status").json()
            staged = [r["name"] for r in regions if r["byte_size"] == LOGITS.nbytes]
            assert named["logits"]["shared_memory_region"] == staged[0]
            assert named["logits"]["shared_memory_offset"] == 0
            assert named["targets"]["shared_memory_region"] != staged[0]
            logits[:, 0] += 100.0  # every row's class 0 now wins by far
            shifted = client.evaluate("cross_entropy", logits, TARGETS, metrics=["accuracy"])
            assert shifted.metrics["accuracy"] == pytest.approx(float(np.mean(TARGETS == 0)))
            part = client.evaluate("cross_entropy", logits[8:16], TARGETS[8:16])
            expected, _ = reference_ce(np.asarray(logits[8:16]), TARGETS[8:16])
            assert part.value == pytest.approx(expected, rel=1e-6)
        # in place: the metrics call only (the gradient is logits-sized, the part < 8 MiB)
        assert _in_place(http) == before + 1
        assert http.get("/v2/systemsharedmemory/status").json() == []
        assert not os.path.exists(f"/dev/shm/{staged[0]}")
        del logits


def test_sdk_shared_array_needs_shared_memory() -> None:
    from ce_eval_client.sdk import Client

    with Client("http://127.0.0.1:9") as client, pytest.raises(ValueError, match="shared_memory"):
        client.shared_array((2, 3))


def test_readme_shared_array_example_runs(server: ServerProcess) -> None:
    from tests.test_serve_readme import readme_block

    code = readme_block("readme-example:shared-array").replace("http://127.0.0.1:8000", server.url)
    logits = RNG.standard_normal((512, 32000)).astype(np.float32)
    targets = RNG.integers(0, 32000, size=512)
    scope: dict[str, Any] = {"logits": logits, "targets": targets}
    with httpx.Client(base_url=server.url, timeout=60) as http:
        before = _in_place(http)
        exec(code, scope)
        assert _in_place(http) == before + 1
    assert scope["value"] == pytest.approx(reference_ce(logits, targets)[0], rel=1e-6)


def test_grpc_evaluate_maps_shared_logits(
    server: ServerProcess, segment: shared_memory.SharedMemory
) -> None:
    """gRPC ``Evaluate`` with ``SharedTensor`` logits of MAPPED_MIN_BYTES: the answer of the
    same logits sent inline, evaluated in place; an object truncated before the request is
    FAILED_PRECONDITION."""
    import grpc

    from ce_eval_client.gen.ce_eval.v1 import ce_eval_pb2 as pb
    from ce_eval_client.gen.ce_eval.v1 import ce_eval_pb2_grpc as pb_grpc

    def request(logits: pb.Tensor) -> pb.EvaluateRequest:
        targets = pb.Tensor(dtype="int64", shape=[N], data=TARGETS.tobytes())
        return pb.EvaluateRequest(
            loss="cross_entropy", logits=logits, targets=targets, metrics=["accuracy"]
        )

    shape = list(LOGITS.shape)
    shared = pb.SharedTensor(region="r", byte_size=LOGITS.nbytes)
    options = [("grpc.max_send_message_length", 64 << 20)]
    with (
        httpx.Client(base_url=server.url, timeout=60) as http,
        grpc.insecure_channel(server.grpc_target, options=options) as channel,
    ):
        assert _register(http, "r", "/" + segment.name, SIZE).status_code == 200
        stub = pb_grpc.LossEvaluationStub(channel)
        before = _in_place(http)
        answer = stub.Evaluate(
            request(pb.Tensor(dtype="float32", shape=shape, shared_memory=shared)), timeout=60
        )
        assert _in_place(http) == before + 1
        inline = stub.Evaluate(
            request(pb.Tensor(dtype="float32", shape=shape, data=LOGITS.tobytes())), timeout=60
        )
        assert answer.value == inline.value == pytest.approx(reference_ce(LOGITS, TARGETS)[0])
        assert answer.metrics == inline.metrics
        segment.close()
        os.truncate(f"/dev/shm/{segment.name}", 4096)
        with pytest.raises(grpc.RpcError) as info:
            stub.Evaluate(
                request(pb.Tensor(dtype="float32", shape=shape, shared_memory=shared)), timeout=60
            )
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert http.post("/v2/systemsharedmemory/unregister").status_code == 200
