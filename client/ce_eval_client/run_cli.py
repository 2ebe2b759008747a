"""``ce-eval run create|push|show|list|close|delete`` and ``ce-eval db upgrade|current``.

``run push`` reads the files of :mod:`ce_eval_client.sources` (``.npz``, ``.npy`` directories,
``.safetensors``, Parquet, Arrow IPC), splits them into batches and sends ``--concurrency`` of
them at a time, each with a stable ``batch_id`` = file name, batch index and a hash of the
batch's bytes. A re-run after a crash therefore sends the same ids and the server counts nothing
twice. Failed requests are retried as :mod:`ce_eval_client.retry` says.

``run show RUN`` prints the run's scalars; ``run show RUN --metric NAME`` one statistic from
``GET /v1/runs/{id}/metrics/{name}`` (``--top``, ``--classes``, ``--normalize`` for the confusion
matrix; ``--sort``, ``--order``, ``--limit``, ``--offset`` for the ``per_class`` table).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any
from urllib.parse import urlsplit

from ce_eval_client.cli_errors import CommandError, ServerError, UsageError
from ce_eval_client.retry import DEFAULT_RETRIES, Retrier
from ce_eval_client.sdk import Client, GrpcClient, run_path
from ce_eval_client.sources import FORMATS, Batch, batches_of, find_sources

DEFAULT_URL = "http://127.0.0.1:8000"
NO_DETAIL_ENDPOINT_HINT = (
    "this server has no GET /v1/runs/{id}/metrics/{name} yet; "
    "`ce-eval run show RUN --json` prints what it returns"
)


def check_url(url: str) -> str:
    """``--url`` as given, or a :class:`UsageError` when it is not an http(s) URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"--url {url!r} is not an http(s) URL", "e.g. --url http://127.0.0.1:8000")
    return url.rstrip("/")


class Session:
    """One command's SDK client (REST, or gRPC for ``--transport grpc``) and retry policy."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.grpc_target: str | None = None
        self.grpc: GrpcClient | None = None
        if getattr(args, "transport", "rest") == "grpc":
            self.grpc_target = args.grpc_target
            self.grpc = GrpcClient(args.grpc_target, timeout=args.timeout, api_key=args.api_key)
        self.url = check_url(args.url)
        self.client = Client(self.url, api_key=args.api_key, timeout=args.timeout)
        self.retrier = Retrier(self.grpc_target or self.url, args.retries)

    def call(self, method: str, path: str, request: Callable[[], Any]) -> Any:
        return self.retrier.call(f"{method} {self.url}{path}", request)

    def call_grpc(self, method: str, request: Callable[[], Any]) -> Any:
        return self.retrier.call(f"grpc {self.grpc_target} {method}", request)

    def close(self) -> None:
        self.client.close()
        if self.grpc is not None:
            self.grpc.close()


# ----------------------------------------------------------------------------------- printing


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=False))


def number(value: Any) -> str:
    """A metric value for a table: integers as they are, floats to 6 significant digits."""
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int) or (float(value).is_integer() and abs(value) < 1e15):
        return str(int(value))
    return f"{value:.6g}"


def is_scalar(value: Any) -> bool:
    """Numbers, and small flat ``{key: number}`` dicts such as ``top_k_accuracy``."""
    if value is None or isinstance(value, int | float | str):
        return True
    return isinstance(value, Mapping) and all(
        v is None or isinstance(v, int | float) for v in value.values()
    )


def scalar_lines(run: Mapping[str, Any]) -> list[str]:
    """The ``run show`` table: identity, totals, the loss, scalar metrics, detail names."""
    tags = ", ".join(f"{k}={v}" for k, v in (run.get("tags") or {}).items())
    lines = [
        f"{run.get('id')}  {run.get('name')}  {run.get('status')}  {run.get('loss')}"
        + (f"  tags: {tags}" if tags else "")
    ]
    rows: list[tuple[str, str]] = [
        ("batches", number(run.get("batches"))),
        ("count", f"{number(run.get('count'))}  (ignored {number(run.get('ignored', 0))})"),
        (
            "value",
            f"{number(run.get('value'))}  (sum {number(run.get('sum'))} / denominator "
            f"{number(run.get('denominator'))})",
        ),
    ]
    details = list(run.get("details") or [])
    for name, value in (run.get("metrics") or {}).items():
        if not is_scalar(value):
            if name not in details:
                details.append(name)
            continue
        if isinstance(value, Mapping):
            rows.append((name, "  ".join(f"{k}: {number(v)}" for k, v in value.items())))
        else:
            rows.append((name, number(value)))
    width = max(len(name) for name, _ in rows)
    lines += [f"{name:<{width}}  {text}" for name, text in rows]
    if details:
        lines.append(
            f"details: {', '.join(details)}  (ce-eval run show {run.get('id')} --metric NAME)"
        )
    return lines


def _class_names(detail: Mapping[str, Any], classes: Sequence[int] | None) -> dict[int, str]:
    """Class id → name from a detail's ``class_names``: a list for ``classes`` (or for all
    classes), or a ``{id: name}`` mapping."""
    names = detail.get("class_names")
    if isinstance(names, Mapping):
        return {int(k): str(v) for k, v in names.items()}
    if isinstance(names, list):
        if classes is not None and len(names) == len(classes):
            return dict(zip(classes, map(str, names), strict=True))
        return dict(enumerate(map(str, names)))
    return {}


def _label(index: Any, names: Mapping[int, str]) -> str:
    return f"{index} ({names[index]})" if index in names else str(index)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return text == "-"
    return True


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Columns two spaces apart: numbers right-aligned, text left-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    right = [all(_is_number(r[i]) for r in rows) for i in range(len(header))]
    return [
        "  ".join(
            f"{cell:>{w}}" if r else f"{cell:<{w}}"
            for cell, w, r in zip(line, widths, right, strict=True)
        ).rstrip()
        for line in [header, *rows]
    ]


def detail_lines(detail: Mapping[str, Any]) -> list[str]:
    """One statistic of ``GET /v1/runs/{id}/metrics/{name}`` as text (see the runs contract)."""
    name = str(detail.get("name"))
    if "top" in detail:
        names = _class_names(detail, None)
        top = detail["top"]
        classes = detail.get("num_classes")
        head = f"{name}: the {len(top)} largest off-diagonal cells of {classes} classes"
        rows = [
            [_label(t["true"], names), _label(t["pred"], names), number(t["count"])] for t in top
        ]
        return [head, *(_table(["true", "pred", "count"], rows) if rows else ["(none)"])]
    if "matrix" in detail:
        classes = list(detail.get("classes") or range(len(detail["matrix"])))
        names = _class_names(detail, classes if "classes" in detail else None)
        total = detail.get("num_classes")
        head = f"{name}: rows true, columns predicted, {len(classes)} of {total} classes"
        rows = [
            [_label(c, names), *(number(v) for v in row)]
            for c, row in zip(classes, detail["matrix"], strict=True)
        ]
        return [head, *_table(["true \\ pred", *map(str, classes)], rows)]
    if "rows" in detail:
        table = detail["rows"]
        columns = ["class", *(["name"] if any("name" in r for r in table) else [])]
        columns += ["precision", "recall", "f1", "support"]
        head = f"{name}: {len(table)} of {detail.get('total')} classes"
        rows = [
            [number(r.get(c)) if c != "name" else str(r.get(c, "")) for c in columns] for r in table
        ]
        return [head, *(_table(columns, rows) if rows else ["(none)"])]
    value = detail.get("value")
    if isinstance(value, Mapping) and value and all(isinstance(v, list) for v in value.values()):
        lengths = {len(v) for v in value.values()}
        if len(lengths) == 1:
            columns = list(value)
            rows = [[number(value[c][i]) for c in columns] for i in range(lengths.pop())]
            return [f"{name}:", *_table(columns, rows)]
    return [f"{name}:", json.dumps(value, indent=2)]


# ----------------------------------------------------------------------------------- commands


def _key_values(items: Sequence[str], what: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"{what} {item!r} must be KEY=VALUE", f"e.g. {what} team=vision")
        out[key] = value
    return out


def _options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if args.options:
        try:
            loaded = json.loads(args.options)
        except json.JSONDecodeError as exc:
            raise UsageError(
                f"--options is not JSON: {exc}", """e.g. --options '{"ignore_index": -1}'"""
            ) from None
        if not isinstance(loaded, dict):
            raise UsageError(
                "--options must be a JSON object", """e.g. --options '{"ignore_index": -1}'"""
            )
        options.update(loaded)
    for key, raw in _key_values(args.option or [], "--option").items():
        try:
            options[key] = json.loads(raw)
        except json.JSONDecodeError:
            options[key] = raw
    return options


def _confidence(args: argparse.Namespace) -> dict[str, Any] | None:
    """``--replicates`` / ``--level`` / ``--seed`` → the run's ``confidence`` (None: none)."""
    if args.replicates is None:
        return None
    confidence: dict[str, Any] = {"replicates": args.replicates, "seed": args.seed}
    if args.level is not None:
        confidence["level"] = args.level
    return confidence


def cmd_create(args: argparse.Namespace, session: Session) -> int:
    class_names = [c.strip() for c in args.class_names.split(",")] if args.class_names else None
    run = session.call(
        "POST",
        "/v1/runs",
        lambda: session.client.create_run(
            args.name,
            args.loss,
            options=_options(args),
            metrics=args.metric or [],
            class_names=class_names,
            tags=_key_values(args.tag or [], "--tag"),
            confidence=_confidence(args),
            slice_keys=args.slice_key or (),
            max_slice_values=args.max_slice_values,
        ),
    )
    if args.id_only:
        print(run["id"])
    else:
        _print_json(run)
    return 0


#: The progress bar: rows sent of all rows, rows/s and the time left.
BAR_FORMAT = (
    "{desc}{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} rows, {rate_fmt}, ETA {remaining}{postfix}"
)


def cmd_push(args: argparse.Namespace, session: Session) -> int:
    from tqdm import tqdm

    if args.batch_size < 1:
        raise UsageError(f"--batch-size {args.batch_size} must be >= 1", "e.g. --batch-size 1024")
    if args.concurrency < 1:
        raise UsageError(f"--concurrency {args.concurrency} must be >= 1", "e.g. --concurrency 4")
    sources = find_sources(args.paths)
    first = sources[0].arrays()  # so that a bad first file fails before the bar starts
    path = run_path(args.run_id, "batches")
    tally = {"batches_sent": 0, "accepted": 0, "duplicates": 0}
    bar = tqdm(
        total=sum(s.rows for s in sources),
        unit=" rows",
        bar_format=BAR_FORMAT,
        disable=args.quiet,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    if not args.quiet:
        session.retrier.say = bar.write

    def send(batch: Batch) -> tuple[int, dict[str, Any]]:
        batch_id = batch.batch_id()
        grpc = session.grpc
        if grpc is not None:  # tensors as raw bytes: no base64 on either side
            answer = session.call_grpc(
                "AddBatch", lambda: grpc.add_batch(args.run_id, batch_id, **batch.request())
            )
        else:
            answer = session.call(
                "POST",
                path,
                lambda: session.client.add_batch(args.run_id, batch_id, **batch.request()),
            )
        return batch.rows, answer

    def account(done: Future[tuple[int, dict[str, Any]]]) -> None:
        rows, answer = done.result()
        tally["batches_sent"] += 1
        tally["duplicates" if answer.get("duplicate") else "accepted"] += 1
        bar.update(rows)
        value = (answer.get("run") or {}).get("value")
        bar.set_postfix_str(f"value {number(value)}", refresh=False)

    pool = ThreadPoolExecutor(args.concurrency, thread_name_prefix="ce-eval-push")
    pending: set[Future[tuple[int, dict[str, Any]]]] = set()
    try:
        for source in sources:
            for batch in batches_of(
                source, args.batch_size, first if source is sources[0] else None
            ):
                while len(pending) >= 2 * args.concurrency:  # bounded: encode ahead, not all
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        account(future)
                pending.add(pool.submit(send, batch))
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                account(future)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    grpc = session.grpc
    if grpc is not None:
        run = session.call_grpc("GetRun", lambda: grpc.get_run(args.run_id))
    else:
        run = session.call(
            "GET", run_path(args.run_id), lambda: session.client.get_run(args.run_id)
        )
    _print_json({"run_id": args.run_id, **tally, "run": run})
    return 0


DETAIL_FLAGS = ("top", "classes", "normalize", "sort", "order", "limit", "offset")


def cmd_show(args: argparse.Namespace, session: Session) -> int:
    given = [f"--{flag}" for flag in DETAIL_FLAGS if getattr(args, flag) not in (None, False)]
    if args.metric is None:
        if given:
            raise UsageError(
                f"{', '.join(given)} apply to one statistic",
                f"add --metric NAME, e.g. --metric confusion_matrix {' '.join(given)} …",
            )
        run = session.call(
            "GET", run_path(args.run_id), lambda: session.client.get_run(args.run_id)
        )
        if args.json:
            _print_json(run)
        else:
            print("\n".join(scalar_lines(run)))
        return 0
    query = {flag: getattr(args, flag) for flag in DETAIL_FLAGS}
    if args.classes is not None:
        try:
            query["classes"] = [int(c) for c in args.classes.split(",") if c.strip()]
        except ValueError:
            raise UsageError(
                f"--classes {args.classes!r} must be class ids", "e.g. --classes 3,17,40"
            ) from None
    query["normalize"] = True if args.normalize else None
    path = run_path(args.run_id, "metrics", args.metric)
    try:
        detail = session.call(
            "GET", path, lambda: session.client.run_metric(args.run_id, args.metric, **query)
        )
    except ServerError as exc:
        if " 404 Not Found" in exc.message:  # the route itself, not a run or metric
            raise ServerError(exc.message, NO_DETAIL_ENDPOINT_HINT) from None
        raise
    if args.json:
        _print_json(detail)
    else:
        print("\n".join(detail_lines(detail)))
    return 0


def cmd_list(args: argparse.Namespace, session: Session) -> int:
    page = session.call(
        "GET",
        "/v1/runs",
        lambda: session.client.list_runs(
            name=args.name, tags=args.tag or (), status=args.status, limit=args.limit
        ),
    )
    if args.json:
        _print_json(page)
        return 0
    print(f"{'id':<26} {'name':<24} {'status':<7} {'loss':<16} {'batches':>7} {'value':>12}")
    for run in page["runs"]:
        print(
            f"{run['id']:<26} {run['name'][:24]:<24} {run['status']:<7} {run['loss'][:16]:<16} "
            f"{run['batches']:>7} {number(run['value']):>12}"
        )
    return 0


def cmd_close(args: argparse.Namespace, session: Session) -> int:
    path = run_path(args.run_id, "close")
    _print_json(session.call("POST", path, lambda: session.client.close_run(args.run_id)))
    return 0


def cmd_delete(args: argparse.Namespace, session: Session) -> int:
    session.call("DELETE", run_path(args.run_id), lambda: session.client.delete_run(args.run_id))
    print(f"deleted {args.run_id}")
    return 0


def server_modules(command: str) -> None:
    """The server package, which ``serve`` and ``db`` need (``pip install ./client`` lacks it)."""
    try:
        import service.config  # noqa: F401
    except ModuleNotFoundError as exc:
        raise UsageError(
            f"'ce-eval {command}' needs the ce-eval server (missing module {exc.name!r})",
            "install it with: pip install ce-eval (or pip install . in the repository)",
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


def _with_session(handler: Callable[[argparse.Namespace, Session], int]) -> Any:
    def run(args: argparse.Namespace) -> int:
        session = Session(args)
        try:
            return handler(args, session)
        finally:
            session.close()

    return run


def add_connection_flags(parser: argparse.ArgumentParser) -> None:
    """``--url``, ``--api-key``, ``--retries``, ``--timeout``: how every client command connects."""
    parser.add_argument(
        "--url",
        default=os.environ.get("CE_EVAL_URL", DEFAULT_URL),
        help=f"service base URL (CE_EVAL_URL, default {DEFAULT_URL})",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("CE_EVAL_API_KEY") or None,
        help="API key sent as X-API-Key (CE_EVAL_API_KEY); runs are scoped to it",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=DEFAULT_RETRIES,
        help=(
            f"retries per request on connection errors, 429 and 5xx (default {DEFAULT_RETRIES}, "
            "waiting 0.5, 1, 2 s … or Retry-After); each retry is reported on stderr"
        ),
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per request")


def add_commands(sub: Any) -> None:
    """Add ``run`` and ``db`` to the ``ce-eval`` sub-command parser."""
    common = argparse.ArgumentParser(add_help=False)
    add_connection_flags(common)

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
    create.add_argument(
        "--replicates", type=int, help="bootstrap replicates for confidence intervals (e.g. 200)"
    )
    create.add_argument("--level", type=float, help="interval level (0.95)")
    create.add_argument("--seed", type=int, default=0, help="bootstrap seed (0)")
    create.add_argument(
        "--slice-key", action="append", help="a key batches slice their examples by (repeatable)"
    )
    create.add_argument("--max-slice-values", type=int, help="values a slice key may take (256)")
    create.add_argument("--id-only", action="store_true", help="print only the new run's id")
    create.set_defaults(func=_with_session(cmd_create))

    push = run_sub.add_parser(
        "push",
        parents=[common],
        help="send files of logits/targets as batches",
        description=f"Sends {FORMATS}.",
    )
    push.add_argument("run_id")
    push.add_argument("paths", nargs="+", help="data files or directories")
    push.add_argument("--batch-size", type=int, default=1024, help="rows per batch (default 1024)")
    push.add_argument(
        "--concurrency", type=int, default=4, help="batches in flight at once (default 4)"
    )
    push.add_argument(
        "--transport",
        choices=["rest", "grpc"],
        default="rest",
        help="rest: protobuf with raw tensor bytes to --url (default); grpc: the same bytes "
        "to --grpc-target",
    )
    push.add_argument(
        "--grpc-target",
        default=os.environ.get("CE_EVAL_GRPC_TARGET", "127.0.0.1:50051"),
        help="host:port for --transport grpc (CE_EVAL_GRPC_TARGET, default 127.0.0.1:50051)",
    )
    push.add_argument("--quiet", action="store_true", help="no progress bar")
    push.set_defaults(func=_with_session(cmd_push))

    show = run_sub.add_parser(
        "show", parents=[common], help="a run's scalars, or one statistic with --metric"
    )
    show.add_argument("run_id")
    show.add_argument("--json", action="store_true", help="print the JSON answer")
    show.add_argument("--metric", help="one statistic in full, e.g. confusion_matrix, per_class")
    show.add_argument("--top", type=int, help="confusion_matrix: the K largest off-diagonal cells")
    show.add_argument(
        "--classes", help="confusion_matrix: the sub-block of these class ids (3,17,40)"
    )
    show.add_argument(
        "--normalize", action="store_true", help="confusion_matrix: rows divided by their sums"
    )
    show.add_argument(
        "--sort",
        choices=["class", "precision", "recall", "f1", "support"],
        help="per_class: sort key",
    )
    show.add_argument("--order", choices=["asc", "desc"], help="per_class: sort order")
    show.add_argument("--limit", type=int, help="per_class: rows (server default 100)")
    show.add_argument("--offset", type=int, help="per_class: rows to skip")
    show.set_defaults(func=_with_session(cmd_show))

    listing = run_sub.add_parser("list", parents=[common], help="list runs, newest first")
    listing.add_argument("--name", help="substring of the name")
    listing.add_argument("--status", choices=["open", "closed"])
    listing.add_argument("--tag", action="append", metavar="KEY:VALUE")
    listing.add_argument("--limit", type=int, default=50)
    listing.add_argument("--json", action="store_true", help="print the JSON page")
    listing.set_defaults(func=_with_session(cmd_list))

    close = run_sub.add_parser("close", parents=[common], help="close a run")
    close.add_argument("run_id")
    close.set_defaults(func=_with_session(cmd_close))

    delete = run_sub.add_parser("delete", parents=[common], help="delete a run and its batches")
    delete.add_argument("run_id")
    delete.set_defaults(func=_with_session(cmd_delete))

    db = sub.add_parser("db", help="run store schema (Alembic migrations)")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    upgrade = db_sub.add_parser("upgrade", help="apply migrations (default: to head)")
    upgrade.add_argument("revision", nargs="?", default="head")
    current = db_sub.add_parser("current", help="print the applied revision")
    for parser in (upgrade, current):
        parser.add_argument("--database-url", help="default: CE_EVAL_DATABASE_URL / settings")
        parser.set_defaults(func=cmd_db)


__all__ = ["CommandError", "add_commands", "add_connection_flags", "check_url", "server_modules"]
