"""System shared memory (Triton's extension): register / status / unregister, tensors named by
region in OIP infer, per-key ownership and caps, bad input, and a truncated object (4xx, the
server alive)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from multiprocessing import shared_memory
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
from fastapi.testclient import TestClient

from service import shared_memory as shm_module
from service.config import Settings
from service.http.app import create_app
from service.shared_memory import SharedMemoryRegistry, TensorRef
from tests.servers import ServerProcess, start_serve

KEY_A, KEY_B = "key-a-0123456789", "key-b-0123456789"
A, B = {"X-API-Key": KEY_A}, {"X-API-Key": KEY_B}
RNG = np.random.default_rng(19)


def reference_ce(logits: np.ndarray, targets: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean softmax cross-entropy and its gradient in float64, written out."""
    z = logits.astype(np.float64)
    shifted = z - z.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    n = z.shape[0]
    value = -log_p[np.arange(n), targets].mean()
    grad = np.exp(log_p)
    grad[np.arange(n), targets] -= 1.0
    return float(value), grad / n


@pytest.fixture
def segment() -> Iterator[shared_memory.SharedMemory]:
    """A 4 KiB POSIX shared-memory object, unlinked at the end."""
    shm = shared_memory.SharedMemory(create=True, size=4096)
    try:
        yield shm
    finally:
        shm.close()
        shm.unlink()


def _settings(tmp_path: Path, **extra: object) -> Settings:
    values: dict[str, object] = {
        "database_url": f"sqlite:///{tmp_path / 'ce-eval.db'}",
        "log_level": "warning",
        "backend": "numpy",
        "shared_memory": True,
        "api_keys": f"{KEY_A},{KEY_B}",
    }
    values.update(extra)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(_settings(tmp_path)), raise_server_exceptions=False) as c:
        yield c


def _register(
    client: TestClient | httpx.Client,
    name: str,
    key: str,
    byte_size: int,
    offset: int = 0,
    headers: dict[str, str] = A,
) -> httpx.Response:
    body = {"key": key, "offset": offset, "byte_size": byte_size}
    return client.post(f"/v2/systemsharedmemory/region/{name}/register", json=body, headers=headers)


def _shm_input(name: str, array: np.ndarray, region: str, offset: int = 0) -> dict[str, object]:
    datatype = {"float32": "FP32", "int64": "INT64"}[array.dtype.name]
    parameters: dict[str, object] = {
        "shared_memory_region": region,
        "shared_memory_byte_size": array.nbytes,
    }
    if offset:
        parameters["shared_memory_offset"] = offset
    return {
        "name": name,
        "shape": list(array.shape),
        "datatype": datatype,
        "parameters": parameters,
    }


def _buf(shm: shared_memory.SharedMemory) -> memoryview:
    assert shm.buf is not None
    return shm.buf


def _write(shm: shared_memory.SharedMemory, array: np.ndarray, offset: int) -> None:
    _buf(shm)[offset : offset + array.nbytes] = array.tobytes()


# --- register / status / unregister ---------------------------------------------------------


def test_register_status_unregister_in_triton_shapes(
    client: TestClient, segment: shared_memory.SharedMemory
) -> None:
    r = _register(client, "inputs", "/" + segment.name, 1024, offset=512)
    assert r.status_code == 200 and r.content == b""
    expected = {"name": "inputs", "key": "/" + segment.name, "offset": 512, "byte_size": 1024}
    assert client.get("/v2/systemsharedmemory/status", headers=A).json() == [expected]
    one = client.get("/v2/systemsharedmemory/region/inputs/status", headers=A)
    assert one.status_code == 200 and one.json() == [expected]
    assert "system_shared_memory" in client.get("/v2", headers=A).json()["extensions"]
    again = _register(client, "inputs", "/" + segment.name, 1024)
    assert again.status_code == 409 and "already registered" in again.json()["error"]
    r = client.post("/v2/systemsharedmemory/region/inputs/unregister", headers=A)
    assert r.status_code == 200
    assert client.get("/v2/systemsharedmemory/status", headers=A).json() == []
    missing = client.get("/v2/systemsharedmemory/region/inputs/status", headers=A)
    assert missing.status_code == 404 and "inputs" in missing.json()["error"]
    # An unknown name unregisters as nothing (Triton); so does "all" with none left.
    assert (
        client.post("/v2/systemsharedmemory/region/nope/unregister", headers=A).status_code == 200
    )
    assert client.post("/v2/systemsharedmemory/unregister", headers=A).status_code == 200


def test_unregister_all_closes_every_descriptor(
    client: TestClient, segment: shared_memory.SharedMemory
) -> None:
    registry: SharedMemoryRegistry = client.app.state.dataplane.shared_memory  # type: ignore[attr-defined]
    before = len(os.listdir("/proc/self/fd"))
    for name in ("r1", "r2", "r3"):
        assert _register(client, name, segment.name, 100).status_code == 200
    assert registry.count() == 3
    assert len(os.listdir("/proc/self/fd")) == before + 3
    assert client.post("/v2/systemsharedmemory/unregister", headers=A).status_code == 200
    assert registry.count() == 0
    assert len(os.listdir("/proc/self/fd")) == before


def test_shutdown_closes_regions(tmp_path: Path, segment: shared_memory.SharedMemory) -> None:
    app = create_app(_settings(tmp_path))
    before = len(os.listdir("/proc/self/fd"))
    with TestClient(app) as c:
        assert _register(c, "r", segment.name, 100).status_code == 200
        assert app.state.dataplane.shared_memory.count() == 1
    assert app.state.dataplane.shared_memory.count() == 0
    assert len(os.listdir("/proc/self/fd")) <= before


# --- inputs and outputs in shared memory ----------------------------------------------------


def _inputs_in_and_outputs_out(
    client: TestClient, segment: shared_memory.SharedMemory
) -> tuple[np.ndarray, np.ndarray]:
    """4 x 7 logits at offset 0 and targets at 256 of region "in" (bytes 0-1023), region "out"
    on bytes 1024-3071 of the same object."""
    logits = RNG.standard_normal((4, 7)).astype(np.float32)
    targets = RNG.integers(0, 7, size=4)
    _write(segment, logits, 0)
    _write(segment, targets, 256)
    assert _register(client, "in", "/" + segment.name, 1024).status_code == 200
    assert _register(client, "out", "/" + segment.name, 2048, offset=1024).status_code == 200
    return logits, targets


def test_infer_reads_inputs_and_writes_outputs_in_regions(
    client: TestClient, segment: shared_memory.SharedMemory
) -> None:
    logits, targets = _inputs_in_and_outputs_out(client, segment)
    grad_bytes = logits.nbytes
    body = {
        "inputs": [
            _shm_input("logits", logits, "in"),
            _shm_input("targets", targets, "in", offset=256),
        ],
        "outputs": [
            {
                "name": "grad",
                "parameters": {
                    "shared_memory_region": "out",
                    "shared_memory_byte_size": grad_bytes + 100,
                    "shared_memory_offset": 8,
                },
            },
            {
                "name": "loss",
                "parameters": {"shared_memory_region": "out", "shared_memory_byte_size": 8},
            },
        ],
    }
    r = client.post("/v2/models/cross_entropy/infer", json=body, headers=A)
    assert r.status_code == 200, r.text
    outputs = {o["name"]: o for o in r.json()["outputs"]}
    assert outputs["grad"] == {"name": "grad", "datatype": "FP32", "shape": [4, 7]}
    assert outputs["loss"] == {"name": "loss", "datatype": "FP64", "shape": [1]}
    value, grad = reference_ce(logits, targets)
    loss = np.frombuffer(_buf(segment)[1024:1032], np.float64)[0]
    assert loss == pytest.approx(value, rel=1e-6)
    written = np.frombuffer(_buf(segment)[1032 : 1032 + grad_bytes], np.float32).reshape(4, 7)
    np.testing.assert_allclose(written, grad, rtol=1e-5, atol=1e-7)
    # Outputs stay inside their bounds: the bytes after the gradient are untouched.
    assert bytes(_buf(segment)[1032 + grad_bytes : 3072]) == bytes(3072 - 1032 - grad_bytes)


def test_shared_infer_parses_evaluates_and_encodes_in_one_thread_hop(
    client: TestClient, segment: shared_memory.SharedMemory
) -> None:
    """Each compute-thread hop costs two thread wake-ups: a request naming regions (parsing
    and encoding cost their tensors' bytes) takes one for all its work, not one per step."""
    logits, targets = _inputs_in_and_outputs_out(client, segment)
    dataplane = client.app.state.dataplane  # type: ignore[attr-defined]
    hops: list[str] = []
    in_thread = dataplane.in_thread

    async def counted(fn: object, *args: object) -> object:
        hops.append(getattr(fn, "__name__", repr(fn)))
        return await in_thread(fn, *args)

    dataplane.in_thread = counted
    body = {
        "inputs": [
            _shm_input("logits", logits, "in"),
            _shm_input("targets", targets, "in", offset=256),
        ],
        "outputs": [
            {"name": "grad", "parameters": {"shared_memory_region": "out",
                                             "shared_memory_byte_size": logits.nbytes}},
        ],
    }  # fmt: skip
    r = client.post("/v2/models/cross_entropy/infer", json=body, headers=A)
    assert r.status_code == 200, r.text
    assert len(hops) == 1, hops
    _, grad = reference_ce(logits, targets)
    written = np.frombuffer(_buf(segment)[1024 : 1024 + logits.nbytes], np.float32)
    np.testing.assert_allclose(written.reshape(4, 7), grad, rtol=1e-5, atol=1e-7)
    # A bad region is still the parse's 4xx, naming the input.
    body["inputs"][0]["parameters"]["shared_memory_region"] = "nope"  # type: ignore[index]
    r = client.post("/v2/models/cross_entropy/infer", json=body, headers=A)
    assert r.status_code == 404, r.text
    assert "nope" in r.text


def test_metrics_output_in_a_region(
    client: TestClient, segment: shared_memory.SharedMemory
) -> None:
    logits = np.array([[3.0, 0.0], [0.0, 3.0], [3.0, 0.0]], np.float32)
    targets = np.array([0, 1, 1])
    _write(segment, logits, 0)
    _write(segment, targets, 64)
    assert _register(client, "r", segment.name, 4096).status_code == 200
    body = {
        "inputs": [_shm_input("logits", logits, "r"), _shm_input("targets", targets, "r", 64)],
        "outputs": [
            {
                "name": "metrics",
                "parameters": {
                    "shared_memory_region": "r",
                    "shared_memory_byte_size": 1000,
                    "shared_memory_offset": 2048,
                },
            }
        ],
        "parameters": {"metrics": ["accuracy"]},
    }
    r = client.post("/v2/models/cross_entropy/infer", json=body, headers=A)
    assert r.status_code == 200, r.text
    length = int.from_bytes(_buf(segment)[2048:2052], "little")
    text = bytes(_buf(segment)[2052 : 2052 + length])
    assert orjson.loads(text)["accuracy"] == pytest.approx(2 / 3)


# --- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    ["../etc/passwd", "a/b", "//x", "", ".", "..", "x" * 65, "sem.mp-1", "a b", "/dev/shm/x", 7],
)
def test_bad_keys_are_422_naming_the_key(client: TestClient, key: object) -> None:
    r = client.post(
        "/v2/systemsharedmemory/region/r/register", json={"key": key, "byte_size": 8}, headers=A
    )
    assert r.status_code == 422, r.text
    assert r.json()["errors"][0]["loc"] == ["body", "key"]
    assert "error" in r.json()


def test_missing_object_is_404(client: TestClient) -> None:
    r = _register(client, "r", "/ce-eval-no-such-object-19", 8)
    assert r.status_code == 404 and "no such object" in r.json()["error"]


def test_symlinks_and_non_regular_objects_are_refused(
    client: TestClient, segment: shared_memory.SharedMemory, tmp_path: Path
) -> None:
    """A /dev/shm entry that is a symlink (to a file elsewhere, or to a real object) is never
    followed; a FIFO or a directory is not a region."""
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"x" * 64)
    names = [f"ce_eval_link_{os.getpid()}", f"ce_eval_link2_{os.getpid()}"]
    fifo = f"ce_eval_fifo_{os.getpid()}"
    os.symlink(secret, f"/dev/shm/{names[0]}")
    os.symlink(f"/dev/shm/{segment.name}", f"/dev/shm/{names[1]}")
    os.mkfifo(f"/dev/shm/{fifo}")
    os.mkdir(f"/dev/shm/{fifo}.d")
    try:
        for name in names:
            r = _register(client, "r", name, 8)
            assert r.status_code == 404, r.text
            assert r.json()["errors"][0]["loc"] == ["body", "key"]
        for name, status in ((fifo, 422), (fifo + ".d", 404)):  # a directory does not open
            r = _register(client, "r", name, 8)
            assert r.status_code == status, r.text
            assert r.json()["errors"][0]["loc"] == ["body", "key"]
        assert client.get("/v2/systemsharedmemory/status", headers=A).json() == []
    finally:
        for name in (*names, fifo):
            os.unlink(f"/dev/shm/{name}")
        os.rmdir(f"/dev/shm/{fifo}.d")


def test_bad_register_bodies(client: TestClient, segment: shared_memory.SharedMemory) -> None:
    assert _register(client, "r", segment.name, 4097).status_code == 422  # past the object
    assert _register(client, "r", segment.name, 8, offset=4090).status_code == 422
    assert _register(client, "r", segment.name, 0).status_code == 422
    assert _register(client, "r", segment.name, -1).status_code == 422
    bad_name = _register(client, "a%20b", segment.name, 8)
    assert bad_name.status_code == 422
    assert bad_name.json()["errors"][0]["loc"] == ["path", "region_name"]
    r = client.post("/v2/systemsharedmemory/region/r/register", content=b"{not json", headers=A)
    assert r.status_code == 400
    r = client.post("/v2/systemsharedmemory/region/r/register", json=[1], headers=A)
    assert r.status_code == 400
    r = client.post(
        "/v2/systemsharedmemory/region/r/register", json={"key": segment.name}, headers=A
    )
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["body", "byte_size"]


def test_unknown_region_and_out_of_bounds_in_infer(
    client: TestClient, segment: shared_memory.SharedMemory
) -> None:
    logits = np.zeros((2, 4), np.float32)
    targets = np.zeros(2, np.int64)
    assert _register(client, "r", segment.name, 64).status_code == 200
    unknown = {"inputs": [_shm_input("logits", logits, "zz"), _shm_input("targets", targets, "r")]}
    r = client.post("/v2/models/cross_entropy/infer", json=unknown, headers=A)
    assert r.status_code == 404
    assert r.json()["errors"][0]["loc"] == ["inputs", 0, "parameters", "shared_memory_region"]
    past = {"inputs": [_shm_input("logits", logits, "r"), _shm_input("targets", targets, "r", 60)]}
    r = client.post("/v2/models/cross_entropy/infer", json=past, headers=A)
    assert r.status_code == 422
    assert r.json()["errors"][0]["loc"] == ["inputs", 1, "parameters", "shared_memory_byte_size"]
    wrong_size = _shm_input("logits", logits, "r")
    wrong_size["parameters"]["shared_memory_byte_size"] = 31  # type: ignore[index]
    r = client.post(
        "/v2/models/cross_entropy/infer",
        json={"inputs": [wrong_size, _shm_input("targets", targets, "r", 32)]},
        headers=A,
    )
    assert r.status_code == 422 and "holds 32" in r.json()["error"]
    both = _shm_input("logits", logits, "r")
    both["data"] = [0.0] * 8
    r = client.post(
        "/v2/models/cross_entropy/infer",
        json={"inputs": [both, _shm_input("targets", targets, "r", 32)]},
        headers=A,
    )
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["inputs", 0, "data"]
    # An output region too small for the output, or outside its region: 422, before any work.
    ok_inputs = [_shm_input("logits", logits, "r"), _shm_input("targets", targets, "r", 32)]
    for size, offset in ((16, 0), (8, 60)):
        out = {
            "name": "grad",
            "parameters": {
                "shared_memory_region": "r",
                "shared_memory_byte_size": size,
                "shared_memory_offset": offset,
            },
        }
        r = client.post(
            "/v2/models/cross_entropy/infer",
            json={"inputs": ok_inputs, "outputs": [out]},
            headers=A,
        )
        assert r.status_code == 422, r.text


def test_regions_are_invisible_to_other_keys(
    client: TestClient, segment: shared_memory.SharedMemory
) -> None:
    logits = np.zeros((2, 4), np.float32)
    targets = np.zeros(2, np.int64)
    assert _register(client, "mine", segment.name, 64).status_code == 200
    assert client.get("/v2/systemsharedmemory/status", headers=B).json() == []
    assert client.get("/v2/systemsharedmemory/region/mine/status", headers=B).status_code == 404
    body = {
        "inputs": [_shm_input("logits", logits, "mine"), _shm_input("targets", targets, "mine", 32)]
    }
    assert client.post("/v2/models/cross_entropy/infer", json=body, headers=B).status_code == 404
    assert client.post("/v2/models/cross_entropy/infer", json=body, headers=A).status_code == 200
    # B's "unregister all" leaves A's region; B cannot register the same object either.
    assert client.post("/v2/systemsharedmemory/unregister", headers=B).status_code == 200
    assert len(client.get("/v2/systemsharedmemory/status", headers=A).json()) == 1
    taken = _register(client, "theirs", segment.name, 64, headers=B)
    assert taken.status_code == 409 and "another API key" in taken.json()["error"]
    assert client.get("/v2/systemsharedmemory/status").status_code == 401


def test_caps_on_regions_and_bytes_per_key(
    tmp_path: Path, segment: shared_memory.SharedMemory
) -> None:
    settings = _settings(tmp_path, shared_memory_max_regions=2, shared_memory_max_bytes=1000)
    with TestClient(create_app(settings)) as c:
        assert _register(c, "a", segment.name, 400).status_code == 200
        over = _register(c, "b", segment.name, 601)
        assert over.status_code == 413 and "CE_EVAL_SHARED_MEMORY_MAX_BYTES" in over.json()["error"]
        assert _register(c, "b", segment.name, 600).status_code == 200
        third = _register(c, "c", segment.name, 1)
        assert third.status_code == 413 and "MAX_REGIONS" in third.json()["error"]


def test_disabled_by_default(tmp_path: Path, segment: shared_memory.SharedMemory) -> None:
    assert Settings().shared_memory is False
    settings = _settings(tmp_path, shared_memory=False)
    with TestClient(create_app(settings)) as c:
        r = _register(c, "r", segment.name, 8)
        assert r.status_code == 403 and "CE_EVAL_SHARED_MEMORY=true" in r.json()["error"]
        assert c.post("/v2/systemsharedmemory/unregister", headers=A).status_code == 403
        assert c.get("/v2/systemsharedmemory/status", headers=A).json() == []
        assert "system_shared_memory" not in c.get("/v2", headers=A).json()["extensions"]
        logits, targets = np.zeros((2, 4), np.float32), np.zeros(2, np.int64)
        body = {"inputs": [_shm_input("logits", logits, "r"), _shm_input("targets", targets, "r")]}
        assert c.post("/v2/models/cross_entropy/infer", json=body, headers=A).status_code == 403


def test_registry_reads_and_writes_only_inside_the_region(
    segment: shared_memory.SharedMemory,
) -> None:
    registry = SharedMemoryRegistry(True, 4, 1 << 20)
    try:
        registry.register(None, "r", segment.name, 1000, 100)
        _buf(segment)[1000:1100] = bytes(range(100))
        assert bytes(registry.read(None, TensorRef("r", 10, 5, ("x",)))) == bytes(range(10, 15))
        with pytest.raises(Exception, match="exceed the 100 bytes"):
            registry.read(None, TensorRef("r", 96, 5, ("x",)))
        with pytest.raises(Exception, match="cannot hold"):
            registry.write(None, TensorRef("r", 0, 4, ("x",)), b"12345")
        registry.write(None, TensorRef("r", 98, 2, ("x",)), b"\xff\xff")
        assert bytes(_buf(segment)[1098:1101]) == b"\xff\xff\x00"
    finally:
        registry.close()


@pytest.mark.parametrize("size", [1, 4096 * 3 + 17, 100_000])
def test_large_copies_in_parallel_spans_equal_one_sequential_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    monkeypatch.setattr(shm_module, "_PARALLEL_BYTES", 1)
    monkeypatch.setattr(shm_module, "_IO_THREADS", 3)
    monkeypatch.setattr(shm_module, "_IO_PIECE", 5000)  # several syscalls per span
    content = np.random.default_rng(size).bytes(size)
    path = tmp_path / "object"
    path.write_bytes(b"\0" * 7 + content)
    fd = os.open(path, os.O_RDWR)
    try:
        out = np.empty(size, np.uint8)
        assert shm_module._pread_into(fd, out.data, 7) == size
        assert out.tobytes() == content
        shm_module._pwrite_from(fd, memoryview(content[::-1]), 7)
        assert path.read_bytes() == b"\0" * 7 + content[::-1]
        os.ftruncate(fd, 7 + size // 2)  # the object ends inside the copy: a short count
        assert shm_module._pread_into(fd, out.data, 7) == size // 2
    finally:
        os.close(fd)


# --- a client truncates its object after registering ----------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    process = start_serve({"CE_EVAL_SHARED_MEMORY": "true"})
    yield process
    process.stop()


def test_truncated_object_is_a_4xx_and_the_server_lives(server: ServerProcess) -> None:
    logits = RNG.standard_normal((8, 16)).astype(np.float32)
    targets = RNG.integers(0, 16, size=8)
    shm = shared_memory.SharedMemory(create=True, size=1 << 20)
    try:
        _write(shm, logits, 0)
        _write(shm, targets, 4096)
        body = {
            "inputs": [
                _shm_input("logits", logits, "t"),
                _shm_input("targets", targets, "t", 4096),
            ],
            "outputs": [
                {
                    "name": "grad",
                    "parameters": {
                        "shared_memory_region": "t",
                        "shared_memory_byte_size": logits.nbytes,
                        "shared_memory_offset": 8192,
                    },
                }
            ],
        }
        with httpx.Client(base_url=server.url, timeout=10) as http:
            assert _register(http, "t", "/" + shm.name, 1 << 20).status_code == 200
            assert http.post("/v2/models/cross_entropy/infer", json=body).status_code == 200
            shm.close()  # our own mapping goes first: touching it after truncation would fault
            os.truncate(f"/dev/shm/{shm.name}", 100)
            r = http.post("/v2/models/cross_entropy/infer", json=body)
            assert r.status_code == 409, r.text
            assert "truncated" in r.json()["error"]
            assert r.json()["errors"][0]["loc"][-1] == "shared_memory_region"
            # Only the output's extent gone: the inputs read, the write refused.
            os.truncate(f"/dev/shm/{shm.name}", 8192 + 10)
            r = http.post("/v2/models/cross_entropy/infer", json=body)
            assert r.status_code == 409, r.text
            assert r.json()["errors"][0]["loc"][:2] == ["outputs", 0]
            assert server.process is not None and server.process.poll() is None
            assert http.get("/healthz").status_code == 200
            assert http.post("/v2/systemsharedmemory/unregister").status_code == 200
    finally:
        shm.unlink()


# --- stock tritonclient ---------------------------------------------------------------------


def test_stock_tritonclient_evaluates_through_shared_memory(server: ServerProcess) -> None:
    """Triton's own client and shared-memory utilities, unchanged: register, infer with inputs
    and the gradient in regions, read the gradient back, status, errors, unregister."""
    http = pytest.importorskip("tritonclient.http")
    shm = pytest.importorskip("tritonclient.utils.shared_memory")
    from tritonclient.utils import InferenceServerException, triton_to_np_dtype

    logits = RNG.standard_normal((32, 10)).astype(np.float32)
    targets = RNG.integers(0, 10, size=32)
    in_size, out_size = logits.nbytes + targets.nbytes, logits.nbytes
    in_key, out_key = f"/ce_eval_test_in_{os.getpid()}", f"/ce_eval_test_out_{os.getpid()}"
    client = http.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    in_handle = shm.create_shared_memory_region("ce_in", in_key, in_size)
    out_handle = shm.create_shared_memory_region("ce_out", out_key, out_size)
    try:
        shm.set_shared_memory_region(in_handle, [logits])
        shm.set_shared_memory_region(in_handle, [targets], offset=logits.nbytes)
        client.register_system_shared_memory("ce_in", in_key, in_size)
        client.register_system_shared_memory("ce_out", out_key, out_size)
        status = {r["name"]: r for r in client.get_system_shared_memory_status()}
        assert status["ce_in"] == {
            "name": "ce_in",
            "key": in_key,
            "offset": 0,
            "byte_size": in_size,
        }
        assert client.get_system_shared_memory_status("ce_out")[0]["byte_size"] == out_size

        z = http.InferInput("logits", list(logits.shape), "FP32")
        z.set_shared_memory("ce_in", logits.nbytes)
        y = http.InferInput("targets", list(targets.shape), "INT64")
        y.set_shared_memory("ce_in", targets.nbytes, offset=logits.nbytes)
        grad_out = http.InferRequestedOutput("grad", binary_data=True)
        grad_out.set_shared_memory("ce_out", out_size)
        loss_out = http.InferRequestedOutput("loss", binary_data=False)
        result = client.infer("cross_entropy", [z, y], outputs=[grad_out, loss_out])

        value, expected_grad = reference_ce(logits, targets)
        assert result.as_numpy("loss")[0] == pytest.approx(value, rel=1e-6)
        meta = result.get_output("grad")
        grad = shm.get_contents_as_numpy(
            out_handle, triton_to_np_dtype(meta["datatype"]), meta["shape"]
        )
        np.testing.assert_allclose(grad, expected_grad, rtol=1e-5, atol=1e-7)

        with pytest.raises(
            InferenceServerException, match="unable to find system shared memory region"
        ):
            client.get_system_shared_memory_status("no_such_region")
        far = http.InferInput("logits", list(logits.shape), "FP32")
        far.set_shared_memory("ce_in", logits.nbytes, offset=targets.nbytes + 8)
        with pytest.raises(InferenceServerException, match="exceed"):
            client.infer("cross_entropy", [far, y])
        with pytest.raises(InferenceServerException, match="already registered"):
            client.register_system_shared_memory("ce_in", in_key, in_size)
        with pytest.raises(InferenceServerException, match="must name a /dev/shm object"):
            client.register_system_shared_memory("bad", "/../etc/passwd", 8)
        client.unregister_system_shared_memory("ce_out")
        assert [r["name"] for r in client.get_system_shared_memory_status()] == ["ce_in"]
        client.unregister_system_shared_memory()
        assert client.get_system_shared_memory_status() == []
    finally:
        shm.destroy_shared_memory_region(in_handle)
        shm.destroy_shared_memory_region(out_handle)
        client.close()


# --- gRPC Evaluate with SharedTensor ---------------------------------------------------------


def test_grpc_evaluate_reads_and_writes_shared_tensors(server: ServerProcess) -> None:
    import grpc

    from ce_eval_client.gen.ce_eval.v1 import ce_eval_pb2 as pb
    from ce_eval_client.gen.ce_eval.v1 import ce_eval_pb2_grpc as pb_grpc

    logits = RNG.standard_normal((16, 9)).astype(np.float32)
    targets = RNG.integers(0, 9, size=16)
    shm = shared_memory.SharedMemory(create=True, size=8192)
    try:
        _write(shm, logits, 0)
        with (
            httpx.Client(base_url=server.url, timeout=10) as http,
            grpc.insecure_channel(server.grpc_target) as channel,
        ):
            assert _register(http, "g_in", shm.name, 4096).status_code == 200
            assert _register(http, "g_out", shm.name, 4096, offset=4096).status_code == 200
            stub = pb_grpc.LossEvaluationStub(channel)

            def request(**changes: object) -> pb.EvaluateRequest:
                message = pb.EvaluateRequest(
                    loss="cross_entropy",
                    logits=pb.Tensor(
                        dtype="float32",
                        shape=list(logits.shape),
                        shared_memory=pb.SharedTensor(region="g_in", byte_size=logits.nbytes),
                    ),
                    targets=pb.Tensor(dtype="int64", shape=[16], data=targets.tobytes()),
                    outputs=["loss", "grad"],
                )
                message.output_shared_memory["grad"].CopyFrom(
                    pb.SharedTensor(region="g_out", offset=64, byte_size=2048)
                )
                for name, value in changes.items():
                    getattr(message, name).CopyFrom(value)
                return message

            answer = stub.Evaluate(request(), timeout=10)
            value, grad = reference_ce(logits, targets)
            assert answer.value == pytest.approx(value, rel=1e-6)
            tensor = answer.outputs["grad"]
            assert (
                tensor.data == b"" and list(tensor.shape) == [16, 9] and tensor.dtype == "float32"
            )
            where = tensor.shared_memory
            assert (where.region, where.offset, where.byte_size) == ("g_out", 64, logits.nbytes)
            written = np.frombuffer(
                bytes(_buf(shm)[4096 + 64 : 4096 + 64 + logits.nbytes]), np.float32
            )
            np.testing.assert_allclose(written.reshape(16, 9), grad, rtol=1e-5, atol=1e-7)

            def code_of(message: pb.EvaluateRequest) -> grpc.StatusCode:
                with pytest.raises(grpc.RpcError) as info:
                    stub.Evaluate(message, timeout=10)
                return info.value.code()

            unknown = pb.Tensor(
                dtype="float32",
                shape=list(logits.shape),
                shared_memory=pb.SharedTensor(region="nope", byte_size=logits.nbytes),
            )
            assert code_of(request(logits=unknown)) == grpc.StatusCode.NOT_FOUND
            short = pb.Tensor(
                dtype="float32",
                shape=list(logits.shape),
                shared_memory=pb.SharedTensor(region="g_in", byte_size=logits.nbytes - 4),
            )
            assert code_of(request(logits=short)) == grpc.StatusCode.INVALID_ARGUMENT
            beyond = pb.Tensor(
                dtype="float32",
                shape=list(logits.shape),
                shared_memory=pb.SharedTensor(region="g_in", offset=4000, byte_size=logits.nbytes),
            )
            assert code_of(request(logits=beyond)) == grpc.StatusCode.INVALID_ARGUMENT
            unrequested = request()
            unrequested.output_shared_memory["probabilities"].region = "g_out"
            assert code_of(unrequested) == grpc.StatusCode.INVALID_ARGUMENT
            # REST protobuf shares the message but not the regions: a 422 naming the tensor.
            r = http.post(
                "/v1/evaluate",
                content=request().SerializeToString(),
                headers={"content-type": "application/x-protobuf"},
            )
            assert r.status_code == 422
            shm.close()
            os.truncate(f"/dev/shm/{shm.name}", 16)
            assert code_of(request()) == grpc.StatusCode.FAILED_PRECONDITION
            assert server.process is not None and server.process.poll() is None
            assert http.post("/v2/systemsharedmemory/unregister").status_code == 200
    finally:
        shm.unlink()


# --- the SDK: Client(shared_memory=True) ----------------------------------------------------


def test_sdk_client_evaluates_through_its_own_region(server: ServerProcess) -> None:
    from ce_eval_client.sdk import Client

    logits = RNG.standard_normal((12, 6)).astype(np.float32)
    targets = RNG.integers(0, 6, size=12)
    with httpx.Client(base_url=server.url, timeout=10) as http:
        with Client(server.url, shared_memory=True) as client:
            result = client.evaluate(
                "cross_entropy",
                logits,
                targets,
                outputs=["loss", "grad", "per_sample"],
                metrics=["accuracy"],
            )
            value, grad = reference_ce(logits, targets)
            assert result.value == pytest.approx(value, rel=1e-6)
            np.testing.assert_allclose(result.outputs["grad"], grad, rtol=1e-5, atol=1e-7)
            z = logits.astype(np.float64)
            log_p = z - z.max(1, keepdims=True)
            log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
            expected_per_sample = -log_p[np.arange(12), targets]
            np.testing.assert_allclose(result.outputs["per_sample"], expected_per_sample, rtol=1e-5)
            assert result.metrics["accuracy"] == pytest.approx(
                float(np.mean(logits.argmax(1) == targets))
            )
            assert client.region is not None
            name, first_size = client.region.name, client.region.size
            status = http.get(f"/v2/systemsharedmemory/region/{name}/status").json()
            assert status[0]["byte_size"] == first_size
            # A call that needs more room gets a larger object under the same region name.
            big = RNG.standard_normal((2048, 40)).astype(np.float32)
            big_targets = RNG.integers(0, 40, size=2048)
            answer = client.evaluate("cross_entropy", big, big_targets, outputs=["loss", "grad"])
            big_value, big_grad = reference_ce(big, big_targets)
            assert answer.value == pytest.approx(big_value, rel=1e-6)
            np.testing.assert_allclose(answer.outputs["grad"], big_grad, rtol=1e-5, atol=1e-8)
            assert client.region.size > first_size
            status = http.get(f"/v2/systemsharedmemory/region/{name}/status").json()
            assert status[0]["byte_size"] == client.region.size
        assert http.get(f"/v2/systemsharedmemory/region/{name}/status").status_code == 404
        assert not os.path.exists(f"/dev/shm/{name}")


async def test_grpc_sees_the_regions_its_key_registered_over_http(
    tmp_path: Path, segment: shared_memory.SharedMemory
) -> None:
    """One registry for both transports, scoped by API key: key A's region serves key A's
    Evaluate; key B's call naming it is NOT_FOUND."""
    import grpc

    from ce_eval_client.gen.ce_eval.v1 import ce_eval_pb2 as pb
    from ce_eval_client.gen.ce_eval.v1 import ce_eval_pb2_grpc as pb_grpc
    from tests.servers import in_process_stack

    logits = RNG.standard_normal((3, 5)).astype(np.float32)
    targets = np.array([4, 0, 2])
    _write(segment, logits, 0)
    async with in_process_stack(_settings(tmp_path)) as (_app, rest, channel, _server):
        r = await rest.post(
            "/v2/systemsharedmemory/region/mine/register",
            json={"key": segment.name, "byte_size": 1024},
            headers=A,
        )
        assert r.status_code == 200
        stub = pb_grpc.LossEvaluationStub(channel)
        request = pb.EvaluateRequest(
            loss="cross_entropy",
            logits=pb.Tensor(
                dtype="float32",
                shape=[3, 5],
                shared_memory=pb.SharedTensor(region="mine", byte_size=logits.nbytes),
            ),
            targets=pb.Tensor(dtype="int64", shape=[3], data=targets.tobytes()),
        )
        answer = await stub.Evaluate(request, metadata=(("x-api-key", KEY_A),), timeout=10)
        assert answer.value == pytest.approx(reference_ce(logits, targets)[0], rel=1e-6)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Evaluate(request, metadata=(("x-api-key", KEY_B),), timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_failing_span_returns_only_after_every_span_has_ended(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import threading

    monkeypatch.setattr(shm_module, "_PARALLEL_BYTES", 1)
    monkeypatch.setattr(shm_module, "_IO_THREADS", 3)
    ended: list[int] = []
    slow_started = threading.Event()

    def copy(start: int, end: int) -> int:
        if start == 0:
            slow_started.wait(5)
            raise OSError(28, "No space left on device")
        slow_started.set()
        threading.Event().wait(0.2)  # still copying when the first span fails
        ended.append(start)
        return end - start

    with pytest.raises(OSError, match="No space"):
        shm_module._in_spans(copy, 3 * 4096)
    assert sorted(ended) == [4096, 8192]
