"""``ce-eval run create|push|show|list|close`` and ``ce-eval db upgrade|current``.

``run push`` reads ``.npz`` files (arrays ``logits``, ``targets`` and optionally
``sample_weight``), directories of them, or a directory holding ``logits.npy`` and
``targets.npy`` (optionally ``sample_weight.npy``; memory-mapped), splits them into batches and
sends each with a stable ``batch_id`` = file name, batch index and a hash of the batch's bytes. A
re-run after a crash therefore sends the same ids and the server counts nothing twice. Transport
errors, 429 and 5xx answers are retried with exponential backoff (``Retry-After`` honoured).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections.abc import Sequence
from typing import Any

from ce_eval_client.cli_errors import CommandError
from ce_eval_client.sources import batches_of, find_sources

DEFAULT_URL = "http://127.0.0.1:8000"
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


# --------------------------------------------------------------------------------------- HTTP


class Api:
    """Minimal JSON client for the Runs API with retries on transport errors, 429 and 5xx."""

    def __init__(
        self, url: str, retries: int = 8, timeout: float = 60.0, api_key: str | None = None
    ) -> None:
        import httpx

        headers = {"X-API-Key": api_key} if api_key else {}
        self.client = httpx.Client(base_url=url.rstrip("/"), timeout=timeout, headers=headers)
        self.retries = retries

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        import httpx

        attempt = 0
        while True:
            try:
                response = self.client.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                if attempt >= self.retries:
                    raise CommandError(
                        f"{method} {path}: {exc!r} (after {attempt} retries)"
                    ) from None
                delay = self._backoff(attempt)
            else:
                if response.status_code in RETRY_STATUSES and attempt < self.retries:
                    delay = self._retry_after(response) or self._backoff(attempt)
                elif response.status_code >= 400:
                    raise CommandError(_problem_text(method, path, response))
                else:
                    return response.json() if response.content else None
            attempt += 1
            time.sleep(delay)

    @staticmethod
    def _backoff(attempt: int) -> float:
        return float(min(10.0, 0.2 * 2**attempt) * (0.5 + random.random() / 2))

    @staticmethod
    def _retry_after(response: Any) -> float | None:
        try:
            return min(30.0, float(response.headers.get("retry-after", "")))
        except ValueError:
            return None

    def close(self) -> None:
        self.client.close()


def _problem_text(method: str, path: str, response: Any) -> str:
    try:
        problem = response.json()
        detail = problem.get("detail", response.text)
        errors = problem.get("errors") or []
        where = "; ".join(".".join(map(str, e.get("loc", []))) for e in errors[:3])
        return f"{method} {path}: {response.status_code} {detail}" + (
            f" [{where}]" if where else ""
        )
    except ValueError:
        return f"{method} {path}: {response.status_code} {response.text[:200]}"


# ----------------------------------------------------------------------------------- commands


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=False))


def _key_values(items: Sequence[str], what: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CommandError(f"{what} {item!r} must be KEY=VALUE")
        out[key] = value
    return out


def _options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if args.options:
        try:
            loaded = json.loads(args.options)
        except json.JSONDecodeError as exc:
            raise CommandError(f"--options is not JSON: {exc}") from None
        if not isinstance(loaded, dict):
            raise CommandError("--options must be a JSON object")
        options.update(loaded)
    for key, raw in _key_values(args.option or [], "--option").items():
        try:
            options[key] = json.loads(raw)
        except json.JSONDecodeError:
            options[key] = raw
    return options


def cmd_create(args: argparse.Namespace, api: Api) -> int:
    body: dict[str, Any] = {
        "name": args.name,
        "loss": args.loss,
        "options": _options(args),
        "metrics": args.metric or [],
        "tags": _key_values(args.tag or [], "--tag"),
    }
    if args.class_names:
        body["class_names"] = [c.strip() for c in args.class_names.split(",")]
    run = api.request("POST", "/v1/runs", json=body)
    if args.id_only:
        print(run["id"])
    else:
        _print_json(run)
    return 0


def cmd_push(args: argparse.Namespace, api: Api) -> int:
    from tqdm import tqdm

    if args.batch_size < 1:
        raise CommandError("--batch-size must be >= 1")
    sources = find_sources(args.paths)
    total = sum(-(-s.rows // args.batch_size) for s in sources)
    accepted = duplicates = 0
    last: dict[str, Any] = {}
    with tqdm(total=total, unit="batch", disable=args.quiet, file=sys.stderr) as bar:
        for source in sources:
            for batch_id, body in batches_of(source, args.batch_size):
                answer = api.request(
                    "POST", f"/v1/runs/{args.run_id}/batches", json={"batch_id": batch_id, **body}
                )
                duplicates += bool(answer["duplicate"])
                accepted += not answer["duplicate"]
                last = answer["run"]
                bar.update(1)
                bar.set_postfix(value=last.get("value"), refresh=False)
    summary = {
        "run_id": args.run_id,
        "batches_sent": total,
        "accepted": accepted,
        "duplicates": duplicates,
        "run": last or api.request("GET", f"/v1/runs/{args.run_id}"),
    }
    _print_json(summary)
    return 0


def cmd_show(args: argparse.Namespace, api: Api) -> int:
    _print_json(api.request("GET", f"/v1/runs/{args.run_id}"))
    return 0


def cmd_list(args: argparse.Namespace, api: Api) -> int:
    params: dict[str, Any] = {"limit": args.limit}
    if args.name:
        params["name"] = args.name
    if args.status:
        params["status"] = args.status
    if args.tag:
        params["tag"] = args.tag
    page = api.request("GET", "/v1/runs", params=params)
    if args.json:
        _print_json(page)
        return 0
    print(f"{'id':<26} {'name':<24} {'status':<7} {'loss':<16} {'batches':>7} {'value':>12}")
    for run in page["runs"]:
        value = "-" if run["value"] is None else f"{run['value']:.6g}"
        print(
            f"{run['id']:<26} {run['name'][:24]:<24} {run['status']:<7} {run['loss'][:16]:<16} "
            f"{run['batches']:>7} {value:>12}"
        )
    return 0


def cmd_close(args: argparse.Namespace, api: Api) -> int:
    _print_json(api.request("POST", f"/v1/runs/{args.run_id}/close"))
    return 0


def server_modules(command: str) -> None:
    """The server package, which ``serve`` and ``db`` need (``pip install ./client`` lacks it)."""
    try:
        import service.config  # noqa: F401
    except ModuleNotFoundError as exc:
        raise CommandError(
            f"'ce-eval {command}' needs the ce-eval server (missing module {exc.name!r}); "
            "install it with: pip install ce-eval (or pip install . in the repository)"
        ) from None


def cmd_db(args: argparse.Namespace) -> int:
    server_modules("db")
    from service.config import Settings
    from service.store import Store

    settings = Settings(**({"database_url": args.database_url} if args.database_url else {}))
    store = Store(settings.database_url)
    try:
        if args.db_command == "upgrade":
            store.upgrade(args.revision)
        print(store.current_revision() or "(empty)")
    finally:
        store.dispose()
    return 0


# ------------------------------------------------------------------------------------- parser


def _with_api(handler: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        api = Api(args.url, retries=args.retries, api_key=args.api_key)
        try:
            result: int = handler(args, api)
            return result
        except CommandError as exc:
            print(f"ce-eval: {exc}", file=sys.stderr)
            return 1
        finally:
            api.close()

    return run


def add_commands(sub: Any) -> None:
    """Add ``run`` and ``db`` to the ``ce-eval`` sub-command parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url",
        default=os.environ.get("CE_EVAL_URL", DEFAULT_URL),
        help=f"service base URL (CE_EVAL_URL, default {DEFAULT_URL})",
    )
    common.add_argument("--retries", type=int, default=8, help="retries per request (default 8)")
    common.add_argument(
        "--api-key",
        default=os.environ.get("CE_EVAL_API_KEY") or None,
        help="API key sent as X-API-Key (CE_EVAL_API_KEY); runs are scoped to it",
    )

    run = sub.add_parser("run", help="evaluation runs: create, push batches, show, list, close")
    run_sub = run.add_subparsers(dest="run_command", required=True)

    create = run_sub.add_parser("create", parents=[common], help="create a run")
    create.add_argument("--name", required=True)
    create.add_argument("--loss", default="cross_entropy")
    create.add_argument("--options", help="loss options as a JSON object")
    create.add_argument(
        "--option", action="append", metavar="KEY=VALUE", help="one option (JSON value)"
    )
    create.add_argument("--metric", action="append", help="a metric to aggregate (repeatable)")
    create.add_argument("--tag", action="append", metavar="KEY=VALUE", help="a tag (repeatable)")
    create.add_argument("--class-names", help="comma-separated class names")
    create.add_argument("--id-only", action="store_true", help="print only the new run's id")
    create.set_defaults(func=_with_api(cmd_create))

    push = run_sub.add_parser("push", parents=[common], help="send .npz/.npy data as batches")
    push.add_argument("run_id")
    push.add_argument("paths", nargs="+", help=".npz files, logits.npy, or directories")
    push.add_argument("--batch-size", type=int, default=1024, help="rows per batch (default 1024)")
    push.add_argument("--quiet", action="store_true", help="no progress bar")
    push.set_defaults(func=_with_api(cmd_push))

    show = run_sub.add_parser("show", parents=[common], help="a run's aggregates (JSON)")
    show.add_argument("run_id")
    show.set_defaults(func=_with_api(cmd_show))

    listing = run_sub.add_parser("list", parents=[common], help="list runs, newest first")
    listing.add_argument("--name", help="substring of the name")
    listing.add_argument("--status", choices=["open", "closed"])
    listing.add_argument("--tag", action="append", metavar="KEY:VALUE")
    listing.add_argument("--limit", type=int, default=50)
    listing.add_argument("--json", action="store_true", help="print the JSON page")
    listing.set_defaults(func=_with_api(cmd_list))

    close = run_sub.add_parser("close", parents=[common], help="close a run")
    close.add_argument("run_id")
    close.set_defaults(func=_with_api(cmd_close))

    db = sub.add_parser("db", help="run store schema (Alembic migrations)")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    upgrade = db_sub.add_parser("upgrade", help="apply migrations (default: to head)")
    upgrade.add_argument("revision", nargs="?", default="head")
    current = db_sub.add_parser("current", help="print the applied revision")
    for parser in (upgrade, current):
        parser.add_argument("--database-url", help="default: CE_EVAL_DATABASE_URL / settings")
        parser.set_defaults(func=cmd_db)
