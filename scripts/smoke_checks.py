"""End-to-end checks against a running ce-eval (one server, or replicas behind nginx).

Standard library only, so it runs on any host (and inside the image for the gRPC step, where
grpcio is installed). Each step prints PASS/FAIL/SKIP; the exit status is 1 if any step failed.

    python3 scripts/smoke_checks.py --url http://127.0.0.1:8000 --grpc 127.0.0.1:50051
    python3 scripts/smoke_checks.py --url http://127.0.0.1:8080 --clients 8 --batches 24 \
        --expect-upstreams 3 --steps healthz,evaluate,balance,run-push,metrics
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import random
import re
import struct
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

# The /metrics contract (DESIGN.md §3, runs issue); tests/test_deploy.py holds the same list.
CONTRACT_METRICS = (
    "ce_eval_requests_total",
    "ce_eval_request_duration_seconds",
    "ce_eval_evaluate_duration_seconds",
    "ce_eval_rejected_total",
    "ce_eval_inflight",
    "ce_eval_batches_total",
    "ce_eval_build_info",
)
ALL_STEPS = ("healthz", "readyz", "evaluate", "pages", "grpc", "balance", "run-push", "metrics")
PAGES = ("/docs", "/dashboard")
LOGITS = [[2.0, 1.0, 0.1], [0.5, 2.5, 0.3]]
TARGETS = [0, 1]


class StepFailed(Exception):
    """A check did not hold; the message says what was expected and what came back."""


def reference_ce_sum(logits: list[list[float]], targets: list[int]) -> float:
    """Σ_i −log softmax(z_i)[y_i], written plainly (independent of the service)."""
    total = 0.0
    for row, target in zip(logits, targets, strict=True):
        top = max(row)
        log_norm = top + math.log(sum(math.exp(z - top) for z in row))
        total += log_norm - row[target]
    return total


def http(
    method: str, url: str, body: Any = None, timeout: float = 30.0
) -> tuple[int, dict[str, str], bytes]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def expect_json(
    method: str, url: str, body: Any = None, status: tuple[int, ...] = (200,)
) -> tuple[dict[str, Any], dict[str, str]]:
    code, headers, raw = http(method, url, body)
    if code not in status:
        raise StepFailed(f"{method} {url} → {code} (wanted {status}): {raw[:300]!r}")
    payload: dict[str, Any] = json.loads(raw)
    return payload, headers


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


class Checks:
    def __init__(self, args: argparse.Namespace) -> None:
        self.url = args.url.rstrip("/")
        self.grpc_target: str = args.grpc
        self.clients: int = args.clients
        self.batches: int = args.batches
        self.expect_upstreams: int = args.expect_upstreams
        self.connect_timeout: float = args.connect_timeout

    def healthz(self) -> str:
        payload, _ = expect_json("GET", f"{self.url}/healthz")
        if payload.get("status") != "ok":
            raise StepFailed(f"/healthz said {payload}")
        return "status ok"

    def readyz(self) -> str:
        payload, _ = expect_json("GET", f"{self.url}/readyz")
        if payload.get("status") != "ready":
            raise StepFailed(f"/readyz said {payload}")
        return "status ready"

    def evaluate(self) -> str:
        body: dict[str, Any] = {"loss": "cross_entropy", "logits": LOGITS, "targets": TARGETS}
        body["options"] = {"reduction": "sum"}
        payload, _ = expect_json("POST", f"{self.url}/v1/evaluate", body)
        want = reference_ce_sum(LOGITS, TARGETS)
        if not close(payload["value"], want):
            raise StepFailed(f"HTTP evaluate value {payload['value']} != reference {want}")
        return f"cross_entropy sum {payload['value']:.12f} == reference"

    def pages(self) -> str:
        """The HTML pages and every local asset they load (packaged, served offline)."""
        fetched = 0
        for page in PAGES:
            code, _, raw = http("GET", f"{self.url}{page}")
            if code != 200:
                raise StepFailed(f"GET {page} → {code}")
            base = page.rstrip("/") + "/"
            for ref in re.findall(r'(?:src|href)="([^"#?]+)', raw.decode(errors="replace")):
                if ref.startswith(("http:", "https:", "//")):
                    raise StepFailed(f"{page} loads {ref} from the network (must work offline)")
                if re.match(r"[a-z]+:", ref):  # data:, mailto: … nothing to fetch
                    continue
                url = f"{self.url}{ref}" if ref.startswith("/") else f"{self.url}{base}{ref}"
                asset_code, _, _ = http("GET", url)
                if asset_code != 200:
                    raise StepFailed(f"{page}: asset {ref} → {asset_code}")
                fetched += 1
        return f"{', '.join(PAGES)} and {fetched} local assets load"

    def grpc(self) -> str:
        if not self.grpc_target:
            raise StepFailed("no --grpc target given")
        try:
            import grpc  # type: ignore[import-not-found,unused-ignore]
            from google.protobuf import (  # type: ignore[import-not-found,unused-ignore]
                descriptor_pool,
                json_format,
                message_factory,
            )
            from grpc_health.v1 import (  # type: ignore[import-not-found,unused-ignore]
                health_pb2,
                health_pb2_grpc,
            )
            from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (  # type: ignore[import-not-found,unused-ignore]
                ProtoReflectionDescriptorDatabase,
            )
        except ImportError as exc:
            raise StepFailed(
                f"gRPC client libraries missing in {sys.executable} ({exc}): it needs grpcio, "
                "grpcio-health-checking and grpcio-reflection"
            ) from None
        channel = grpc.insecure_channel(self.grpc_target)
        try:
            grpc.channel_ready_future(channel).result(timeout=self.connect_timeout)
        except grpc.FutureTimeoutError:
            raise StepFailed(f"no gRPC server answers on {self.grpc_target}") from None
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5
        )
        if health.status != health_pb2.HealthCheckResponse.SERVING:
            raise StepFailed(f"grpc.health.v1 status {health.status}, wanted SERVING")
        database = ProtoReflectionDescriptorDatabase(channel)
        service_name = "ce_eval.v1.LossEvaluation"
        if service_name not in database.get_services():
            raise StepFailed(f"reflection lists {database.get_services()}, no {service_name}")
        pool = descriptor_pool.DescriptorPool(database)
        method = pool.FindServiceByName(service_name).FindMethodByName("Evaluate")
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        tensor_type = method.input_type.fields_by_name["logits"].message_type
        flat = [z for row in LOGITS for z in row]
        request = json_format.ParseDict(
            {
                "loss": "cross_entropy",
                "logits": {
                    "dtype": proto_dtype(tensor_type, "float64"),
                    "shape": [len(LOGITS), len(LOGITS[0])],
                    "data": base64.b64encode(struct.pack(f"<{len(flat)}d", *flat)).decode(),
                },
                "targets": {
                    "dtype": proto_dtype(tensor_type, "int64"),
                    "shape": [len(TARGETS)],
                    "data": base64.b64encode(struct.pack(f"<{len(TARGETS)}q", *TARGETS)).decode(),
                },
            },
            request_cls(),
        )
        call = channel.unary_unary(
            f"/{service_name}/Evaluate",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response_cls.FromString,
        )
        response = json_format.MessageToDict(call(request, timeout=10))
        # Default reduction: mean over the valid targets.
        want = reference_ce_sum(LOGITS, TARGETS) / len(TARGETS)
        if not close(float(response.get("value", "nan")), want):
            raise StepFailed(f"gRPC Evaluate value {response.get('value')} != reference {want}")
        return f"health SERVING, reflection lists {service_name}, Evaluate mean == reference"

    def balance(self) -> str:
        body = {"loss": "cross_entropy", "logits": LOGITS, "targets": TARGETS}
        seen: set[str] = set()
        for _ in range(6 * max(self.expect_upstreams, 1)):
            code, headers, raw = http("POST", f"{self.url}/v1/evaluate", body)
            if code != 200:
                raise StepFailed(f"evaluate through the balancer → {code}: {raw[:200]!r}")
            upstream = {k.lower(): v for k, v in headers.items()}.get("x-upstream")
            if upstream is None:
                raise StepFailed("no X-Upstream header: is this nginx from deploy/nginx?")
            seen.add(upstream)
        if len(seen) < self.expect_upstreams:
            raise StepFailed(f"only {sorted(seen)} answered, wanted {self.expect_upstreams}")
        return f"{len(seen)} replicas answered: {', '.join(sorted(seen))}"

    def run_push(self) -> str:
        rng = random.Random(20261123)
        batches: list[dict[str, Any]] = []
        for index in range(self.batches):
            rows = rng.randint(1, 5)
            logits = [[round(rng.uniform(-4, 4), 3) for _ in range(4)] for _ in range(rows)]
            targets = [rng.randrange(4) for _ in range(rows)]
            batches.append({"batch_id": f"b{index:04d}", "logits": logits, "targets": targets})
        created, _ = expect_json(
            "POST",
            f"{self.url}/v1/runs",
            {
                "name": "smoke",
                "loss": "cross_entropy",
                "options": {"reduction": "mean"},
                "metrics": ["accuracy"],
                "tags": {"source": "smoke"},
            },
            status=(201,),
        )
        run_id = created["id"]

        def send(batch: dict[str, Any]) -> bool:
            payload, _ = expect_json("POST", f"{self.url}/v1/runs/{run_id}/batches", batch)
            return bool(payload.get("duplicate", False))

        # Every batch is sent twice (a retry), by different clients, in a shuffled order.
        work = batches + batches
        rng.shuffle(work)
        with ThreadPoolExecutor(max_workers=self.clients) as pool:
            duplicates = sum(pool.map(send, work))
        if duplicates != len(batches):
            raise StepFailed(f"{duplicates} answers marked duplicate, wanted {len(batches)}")
        run, _ = expect_json("GET", f"{self.url}/v1/runs/{run_id}")
        all_logits = [row for b in batches for row in b["logits"]]
        all_targets = [t for b in batches for t in b["targets"]]
        want_sum = reference_ce_sum(all_logits, all_targets)
        problems = []
        if run.get("batches") != len(batches):
            problems.append(f"batches {run.get('batches')} != {len(batches)}")
        if run.get("count") != len(all_targets):
            problems.append(f"count {run.get('count')} != {len(all_targets)}")
        if not math.isclose(float(run.get("sum", "nan")), want_sum, rel_tol=1e-9):
            problems.append(f"sum {run.get('sum')} != reference {want_sum}")
        if problems:
            raise StepFailed("run totals wrong: " + "; ".join(problems))
        return (
            f"run {run_id}: {len(batches)} batches x2 from {self.clients} clients → "
            f"batches={run['batches']} count={run['count']} sum exact"
        )

    def metrics(self) -> str:
        code, _, raw = http("GET", f"{self.url}/metrics")
        if code != 200:
            raise StepFailed(f"GET /metrics → {code}")
        missing = sorted(set(CONTRACT_METRICS) - exported_metric_names(raw.decode()))
        if missing:
            raise StepFailed(f"/metrics lacks {missing}")
        return f"all {len(CONTRACT_METRICS)} contract metrics exported"


def proto_dtype(tensor_type: Any, dtype: str) -> str:
    """``dtype`` as the Tensor message spells it: a string field, or the matching enum name."""
    field = tensor_type.fields_by_name["dtype"]
    if field.enum_type is None:
        return dtype
    for value in field.enum_type.values:
        if value.name.lower().endswith(dtype):
            name: str = value.name
            return name
    raise StepFailed(
        f"Tensor.dtype enum has no {dtype}: {[v.name for v in field.enum_type.values]}"
    )


def exported_metric_names(exposition: str) -> set[str]:
    """Names a Prometheus text exposition offers to queries (families and their samples)."""
    names: set[str] = set()
    for line in exposition.splitlines():
        type_line = re.match(r"# TYPE (\S+) (\S+)", line)
        if type_line:
            name, kind = type_line.groups()
            names.add(name)
            if kind == "counter" and not name.endswith("_total"):
                names.add(f"{name}_total")
            if kind == "info":
                names.add(f"{name}_info")
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="HTTP base URL")
    parser.add_argument("--grpc", default="", help="gRPC host:port for the grpc step")
    parser.add_argument("--steps", default=",".join(ALL_STEPS), help="comma-separated steps")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients (run-push)")
    parser.add_argument("--batches", type=int, default=6, help="batches in the pushed run")
    parser.add_argument("--expect-upstreams", type=int, default=1, help="replicas (balance)")
    parser.add_argument(
        "--connect-timeout", type=float, default=10.0, help="seconds to wait for gRPC"
    )
    args = parser.parse_args(argv)
    checks = Checks(args)
    steps: dict[str, Callable[[], str]] = {
        "healthz": checks.healthz,
        "readyz": checks.readyz,
        "evaluate": checks.evaluate,
        "pages": checks.pages,
        "grpc": checks.grpc,
        "balance": checks.balance,
        "run-push": checks.run_push,
        "metrics": checks.metrics,
    }
    failed = []
    for name in args.steps.split(","):
        try:
            detail = steps[name]()
        except Exception as exc:  # report every step, then fail as a whole
            failed.append(name)
            print(f"FAIL {name}: {type(exc).__name__}: {exc}", flush=True)
        else:
            print(f"PASS {name}: {detail}", flush=True)
    if failed:
        print(f"smoke checks FAILED: {', '.join(failed)}", flush=True)
        return 1
    print("smoke checks passed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
