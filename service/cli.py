"""``ce-eval`` command line."""

from __future__ import annotations

import argparse
import sys

from service import __version__


def _serve(args: argparse.Namespace) -> int:
    import asyncio

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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
