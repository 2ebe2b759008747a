"""``ce-eval`` command line."""

from __future__ import annotations

import argparse
import sys
import threading
from types import FrameType

import uvicorn

from service import __version__
from service.admission import Admission
from service.run_cli import add_commands as add_run_commands


class DrainingServer(uvicorn.Server):
    """SIGTERM/SIGINT: refuse new evaluations and fail /readyz at once, keep listening for
    ``drain_delay`` seconds (load balancers notice), then let uvicorn finish in-flight requests
    within its graceful-shutdown timeout. A second signal exits without the delay."""

    def __init__(self, config: uvicorn.Config, admission: Admission, drain_delay: float) -> None:
        super().__init__(config)
        self.admission = admission
        self.drain_delay = drain_delay

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.admission.draining or self.drain_delay <= 0:
            self.admission.draining = True
            super().handle_exit(sig, frame)
            return
        self.admission.draining = True
        timer = threading.Timer(self.drain_delay, super().handle_exit, (sig, frame))
        timer.daemon = True
        timer.start()


def _serve(args: argparse.Namespace) -> int:
    from service.config import Settings
    from service.http.app import create_app
    from service.logs import configure_logging

    overrides = {
        k: v
        for k, v in {
            "host": args.host,
            "port": args.port,
            "backend": args.backend,
            "log_level": args.log_level,
        }.items()
        if v is not None
    }
    settings = Settings(**overrides)
    configure_logging(settings.log_level, settings.log_format)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,
        timeout_graceful_shutdown=int(settings.shutdown_grace_s),
    )
    server = DrainingServer(config, app.state.dataplane.admission, settings.drain_delay_s)
    print(
        f"ce-eval {__version__} serving on http://{settings.host}:{settings.port} "
        f"(backend {settings.backend}; docs at /docs)",
        file=sys.stderr,
        flush=True,
    )
    server.run()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ce-eval", description=__doc__)
    parser.add_argument("--version", action="version", version=f"ce-eval {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the HTTP (and gRPC) service")
    serve.add_argument("--host", help="bind address (CE_EVAL_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="HTTP port (CE_EVAL_PORT, default 8000)")
    serve.add_argument("--backend", choices=["auto", "numpy", "cupy"], help="default backend")
    serve.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], help="log level"
    )
    serve.set_defaults(func=_serve)
    add_run_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
