"""Worker processes of the server: fresh interpreters (``python -P -c``, nothing of the
server's main module or threads) that talk to it over a socket pair.

Before any import of ours a worker leaves SIGINT and SIGTERM to the server (which stops its
workers once its requests are done) and writes no core dump; the directory holding the
server's ``service`` package is searched first unless already on the path (a wheel's
site-packages stays behind the standard library), the server's working directory never
(``-P``, and empty ``PYTHONPATH`` entries dropped). Then ``MODULE.worker_main(conn, args)``
runs with the worker's end of the socket pair.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, NoReturn

from service.errors import ServiceError

#: The directory holding the ``service`` package.
PACKAGES = str(Path(__file__).resolve().parents[2])

_BOOTSTRAP = """\
import importlib, resource, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
if sys.argv[1] not in sys.path:
    sys.path.insert(0, sys.argv[1])
from multiprocessing.connection import Connection
importlib.import_module(sys.argv[2]).worker_main(Connection(int(sys.argv[3])), sys.argv[4:])
"""


def spawn(module: str, args: list[str]) -> tuple[subprocess.Popen[bytes], Connection]:
    """Start ``module.worker_main`` in a worker: the process and the server's end."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    command = [sys.executable, "-P", "-c", _BOOTSTRAP, PACKAGES, module, str(theirs.fileno())]
    try:
        process = subprocess.Popen(
            [*command, *args],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
            env=_environment(),
        )
    finally:
        theirs.close()
    return process, Connection(ours.detach())


def reap(process: subprocess.Popen[bytes], conn: Connection, timeout: float) -> int | None:
    """Close ``conn``, wait ``timeout`` s for the process to end (then kill it): its exit code,
    ``-signum`` when a signal ended it."""
    conn.close()
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def _environment() -> dict[str, str]:
    """The server's environment, with ``PYTHONPATH``'s empty entries (the working directory)
    dropped and relative ones made absolute."""
    entries = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    path = os.pathsep.join(os.path.abspath(entry) for entry in entries if entry)
    return {**os.environ, "PYTHONPATH": path}


def error_reply(error: ServiceError) -> tuple[Any, ...]:
    """A worker's answer for a service error: ``("error", kind, detail, errors,
    errors_total, headers)``."""
    return ("error", type(error), error.detail, error.errors, error.errors_total, error.headers)


def crash_reply(exc: Exception) -> tuple[Any, ...]:
    """A worker's answer for a bug: ``("crash", text)`` (the server answers 500)."""
    return ("crash", f"{type(exc).__name__}: {exc}")


def raise_reply(reply: tuple[Any, ...], worker: str) -> NoReturn:
    """Raise what an ``error`` or ``crash`` reply of ``worker`` carries, here."""
    if reply[0] == "error":
        kind, detail, errors, total, headers = reply[1:]
        error: ServiceError = kind(detail, errors, headers)
        error.errors_total = total
        raise error
    raise RuntimeError(f"{worker}: {reply[1]}")
