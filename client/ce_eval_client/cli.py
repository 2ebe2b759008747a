"""``ce-eval`` command line."""

from __future__ import annotations

import argparse
import os
import sys
from difflib import get_close_matches
from typing import Any

from ce_eval_client import __version__
from ce_eval_client.cli_errors import CommandError, UsageError, unknown_name
from ce_eval_client.gate_cli import add_command as add_gate_command
from ce_eval_client.run_cli import add_commands as add_run_commands
from ce_eval_client.run_cli import add_connection_flags, check_url, server_modules

#: Exit status when stdout is closed early (``ce-eval … | head``), as for a process that
#: SIGPIPE ended: the shell's 128 + 13.
BROKEN_PIPE_EXIT = 141


def _serve(args: argparse.Namespace) -> int:
    import asyncio

    server_modules("serve")
    from service.config import Settings
    from service.http.app import create_app
    from service.logs import configure_logging
    from service.serve import serve

    overrides = {
        k: v
        for k, v in {
            "host": args.host,
            "port": args.port,
            "grpc_port": args.grpc_port,
            "backend": args.backend,
            "log_level": args.log_level,
        }.items()
        if v is not None
    }
    settings = Settings(**overrides)
    configure_logging(settings.log_level, settings.log_format)
    app = create_app(settings)
    print(
        f"ce-eval {__version__} serving on http://{settings.host}:{settings.port} "
        + (f"and grpc {settings.host}:{settings.grpc_port} " if settings.grpc_port else "")
        + f"(backend {settings.backend}; docs at /docs)",
        file=sys.stderr,
        flush=True,
    )
    asyncio.run(serve(app, settings))
    return 0


def load_array(spec: str, flag: str) -> Any:
    """``a.npy``, ``a.npz`` (its only array) or ``a.npz:key`` → array (never unpickles)."""
    import numpy as np

    path, key = spec.rsplit(":", 1) if ".npz:" in spec else (spec, "")
    hint = f"{flag} takes FILE.npy, FILE.npz or FILE.npz:NAME"
    try:
        loaded = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise UsageError(f"{flag} {path}: no such file", hint) from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"{flag} {path}: not a readable .npy/.npz file ({exc})", hint) from None
    if isinstance(loaded, np.ndarray):
        if key:
            raise UsageError(f"{flag} {spec}: {path} holds one array, not named ones", hint)
        return loaded
    with loaded:
        names = list(loaded.files)
        if not key:
            if len(names) != 1:
                raise UsageError(
                    f"{flag} {path} holds {len(names)} arrays ({', '.join(names)})",
                    f"pick one: {flag} {path}:{names[0] if names else 'NAME'}",
                )
            key = names[0]
        if key not in names:
            raise UsageError(
                f"{flag} {spec}: {unknown_name('array', key, names)}",
                f"{flag} {path}:{(get_close_matches(key, names, n=1) or names or ['NAME'])[0]}",
            )
        try:
            return loaded[key]
        except ValueError as exc:
            raise UsageError(f"{flag} {spec}: cannot read the array ({exc})", hint) from None


def _option_value(text: str) -> Any:
    """``--option`` values are JSON when they parse (numbers, lists, null), else strings."""
    import json

    try:
        return json.loads(text)
    except ValueError:
        return text


def _pairs(items: list[str], what: str) -> dict[str, str]:
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"{what} must be KEY=VALUE, got {item!r}", f"e.g. {what} grad=g.npy")
        pairs[key] = value
    return pairs


def _evaluate(args: argparse.Namespace) -> int:
    import json

    import numpy as np

    from ce_eval_client.retry import Retrier
    from ce_eval_client.sdk import Client, Evaluation, GrpcClient

    saves = _pairs(args.output, "--output")
    outputs = ["loss", *[name for name in saves if name != "loss"]]
    kwargs: dict[str, Any] = {
        "options": {k: _option_value(v) for k, v in _pairs(args.option, "--option").items()},
        "outputs": outputs,
        "metrics": args.metric,
        "sample_weight": load_array(args.sample_weight, "--sample-weight")
        if args.sample_weight
        else None,
        "backend": args.backend,
    }
    logits, targets = load_array(args.logits, "--logits"), load_array(args.targets, "--targets")
    client: Client | GrpcClient
    if args.transport == "grpc":
        target, what = args.grpc_target, f"grpc {args.grpc_target} Evaluate"
        client = GrpcClient(target, timeout=args.timeout, api_key=args.api_key)
    else:
        target = check_url(args.url)
        path = f"/v2/models/{args.loss}/infer" if args.transport == "oip" else "/v1/evaluate"
        what = f"POST {target}{path}"
        client = Client(
            target, transport=args.transport, timeout=args.timeout, api_key=args.api_key
        )
    with client:
        result: Evaluation = Retrier(target, args.retries).call(
            what, lambda: client.evaluate(args.loss, logits, targets, **kwargs)
        )
    for name, path in saves.items():
        try:
            np.save(path, result.outputs[name])
        except OSError as exc:
            raise UsageError(
                f"--output {name}={path}: cannot write ({exc.strerror})", None
            ) from None
    summary = {
        key: getattr(result, key)
        for key in ("loss", "value", "sum", "denominator", "count", "ignored", "reduction")
    }
    summary.update(
        unit=result.unit,
        backend=result.backend,
        compute_dtype=result.compute_dtype,
        metrics=result.metrics,
        outputs={
            name: {"shape": list(a.shape), "file": saves.get(name)}
            for name, a in result.outputs.items()
        },
    )
    if args.json:
        print(json.dumps(summary, indent=2, default=float))
        return 0
    value = "n/a" if result.value is None else f"{result.value:.6g} {result.unit}"
    print(
        f"{result.loss}: {value}  ({result.reduction}, sum {result.sum:.6g} / "
        f"denominator {result.denominator:.6g}; {result.count} counted, {result.ignored} ignored)"
    )
    for name, array in result.outputs.items():
        target_file = f" → {saves[name]}" if name in saves else ""
        print(f"  {name}: {array.dtype} {list(array.shape)}{target_file}")
    for name, metric in result.metrics.items():
        print(f"  {name}: {metric}")
    print(f"  backend {result.backend}, compute {result.compute_dtype}, {result.elapsed_ms:.2f} ms")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ce-eval", description=__doc__)
    parser.add_argument("--version", action="version", version=f"ce-eval {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the HTTP (and gRPC) service")
    serve.add_argument("--host", help="bind address (CE_EVAL_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="HTTP port (CE_EVAL_PORT, default 8000)")
    serve.add_argument(
        "--grpc-port", type=int, help="gRPC port (CE_EVAL_GRPC_PORT, default 50051; 0 = off)"
    )
    serve.add_argument("--backend", choices=["auto", "numpy", "cupy"], help="default backend")
    serve.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], help="log level"
    )
    serve.set_defaults(func=_serve)

    evaluate = sub.add_parser("evaluate", help="evaluate a loss on .npy/.npz arrays")
    add_connection_flags(evaluate)
    evaluate.add_argument(
        "--grpc-target",
        default=os.environ.get("CE_EVAL_GRPC_TARGET", "127.0.0.1:50051"),
        help="host:port for --transport grpc (CE_EVAL_GRPC_TARGET, default 127.0.0.1:50051)",
    )
    evaluate.add_argument(
        "--transport",
        choices=["protobuf", "base64", "json", "oip", "grpc"],
        default="protobuf",
        help="wire format (default protobuf over HTTP)",
    )
    evaluate.add_argument("--loss", default="cross_entropy", help="loss name (GET /v1/losses)")
    evaluate.add_argument("--logits", required=True, help="a.npy, a.npz or a.npz:NAME")
    evaluate.add_argument("--targets", required=True, help="y.npy, y.npz or y.npz:NAME")
    evaluate.add_argument("--sample-weight", help="per-sample weights (.npy/.npz)")
    evaluate.add_argument(
        "--option", action="append", default=[], metavar="K=V", help="loss option (JSON value)"
    )
    evaluate.add_argument(
        "--output", action="append", default=[], metavar="NAME=FILE.npy", help="save an output"
    )
    evaluate.add_argument("--metric", action="append", default=[], help="metric name")
    evaluate.add_argument("--backend", choices=["auto", "numpy", "cupy"], help="array backend")
    evaluate.add_argument("--json", action="store_true", help="print the summary as JSON")
    evaluate.set_defaults(func=_evaluate)
    add_run_commands(sub)
    add_gate_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs one command; failures are one line on stderr: exit 2 for usage errors (argparse's
    too), 1 for the server's errors (2 for ``gate``, whose 1 means a failed gate), 130 on
    Ctrl-C, 141 when stdout closes early."""
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as exc:  # --help, --version, argparse's usage errors (2)
            sys.stdout.flush()
            return exc.code if isinstance(exc.code, int) else 2
        result: int = args.func(args)
        sys.stdout.flush()  # here, so a closed pipe is caught below and not at exit
    except CommandError as exc:
        print(exc.line(), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("ce-eval: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `ce-eval … | head`: the reader is gone. Point stdout at /dev/null so the interpreter's
        # last flush at exit finds nowhere to fail, and leave quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return BROKEN_PIPE_EXIT
    return result


if __name__ == "__main__":
    raise SystemExit(main())
