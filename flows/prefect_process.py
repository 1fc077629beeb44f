"""The Prefect process around a ``condense`` command: quiet, offline settings before Prefect is
imported; a local API server started quietly that dies with the command; the flow run in a thread so
that SIGINT/SIGTERM stop the command at once (everything finished is committed, so the same command
resumes)."""

from __future__ import annotations

import contextvars
import ctypes
import functools
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prefect.server.api.server import SubprocessASGIServer

QUIET_PREFECT = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
}


def configure_prefect(debug: bool) -> None:
    for name, value in QUIET_PREFECT.items():
        os.environ.setdefault(name, value)
    # Failures are reported by this command as one line; Prefect's own tracebacks only with --debug.
    level = "INFO" if debug else "CRITICAL"
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", level)
    os.environ.setdefault("PREFECT_INTERNAL_LOGGING_LEVEL", level)  # e.g. the events worker's exit notes
    # The ephemeral API server logs its shutdown (cancelled event flushes, sqlalchemy pool resets, via
    # the root logger) as errors: noise for a local run.
    os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", level)
    os.environ.setdefault("PREFECT_LOGGING_ROOT_LEVEL", level)


def _dies_with_parent() -> None:
    """In the server's process, before it runs: ask Linux to send it SIGTERM when this command's
    process is gone, even by SIGKILL, so no server outlives the run it served."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _start_server(server: SubprocessASGIServer) -> None:
    from condense.errors import CondenseError

    popen = subprocess.Popen
    if sys.platform == "linux":  # only this thread runs now: nothing else starts processes meanwhile
        subprocess.Popen = functools.partial(popen, preexec_fn=_dies_with_parent)  # type: ignore[misc]
    try:
        server.start()
    except RuntimeError as err:
        if "Timed out" not in str(err):
            raise
        raise CondenseError(
            "Prefect's local API server did not start in time (its first start migrates a database in"
            " PREFECT_HOME, slow on a busy machine); rerun, raise"
            " PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, or start `prefect server start` and set"
            " PREFECT_API_URL"
        ) from None
    finally:
        subprocess.Popen = popen  # type: ignore[misc]


def start_local_api_quietly(debug: bool = False) -> SubprocessASGIServer:
    """Start Prefect's ephemeral API server now, its output going to a log file in PREFECT_HOME.

    The server is a subprocess that inherits stderr, and at shutdown it sometimes logs cancelled
    database work as errors, after this command has said all it has to say. Prefect reuses this
    same server instance for the rest of the process.
    """
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_HOME

    server = SubprocessASGIServer()
    if debug:
        _start_server(server)
        return server
    home = Path(PREFECT_HOME.value())
    home.mkdir(parents=True, exist_ok=True)
    saved = os.dup(2)
    with open(home / "condense-ephemeral-server.log", "ab") as log:
        os.dup2(log.fileno(), 2)
        try:
            _start_server(server)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    return server


def in_thread(function: Any, *args: Any) -> Any:
    """Call ``function`` in a thread (with this thread's context, Prefect's settings included) and
    wait for it here. The flow engine, run in the main thread, replaces the SIGTERM handler and then
    waits for every running task before letting the signal through; from another thread it cannot,
    so this thread stays free to stop the command at once (:func:`stop_on_signals`)."""
    outcome: dict[str, Any] = {}

    def call() -> None:
        try:
            outcome["value"] = function(*args)
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread below
            outcome["error"] = err

    thread = threading.Thread(
        target=contextvars.copy_context().run, args=(call,), name="condense-flow", daemon=True
    )
    thread.start()
    while thread.is_alive():
        thread.join(0.5)  # wakes for signals, unlike a join without a timeout on some Pythons
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def stop_on_signals(servers: list[SubprocessASGIServer]) -> None:
    """SIGINT or SIGTERM stops the command within moments: jobs run in threads that would otherwise
    finish their epoch first. Everything finished is committed and checkpoints are written atomically,
    so nothing is lost: the same command resumes. The local API server stops with it."""

    def stop(signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        print(
            f"error: stopped by {name}; rerun the same command to resume from the last checkpoint",
            file=sys.stderr,
        )
        for server in servers:
            if server.server_process is not None:
                server.server_process.kill()
        os._exit(128 + signum)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
