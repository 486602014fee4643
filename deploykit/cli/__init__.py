"""The ``deploykit`` command: one Typer app, one error boundary.

Each command lives in its own module (``cli/export.py``, ``cli/serve.py``, ...) and registers itself on
:data:`app`. Commands only parse options, call one library function, render its result and choose the exit
code; heavy libraries (torch, onnxruntime) are imported inside the library calls, never at start-up.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType

import typer

from deploykit.cli import bench, export, inspect, package, predict, serve, verify  # noqa: F401  (registers commands)
from deploykit.cli._app import app, state
from deploykit.errors import DeployKitError, ExitCode


def _exception_types() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...],
                                tuple[type[BaseException], ...]]:
    """(exit, usage error, abort) classes: Typer >= 0.25 vendors its own click, whose errors derive from its
    public ``TyperException``; older Typer raises click's."""
    exits: list[type[BaseException]] = [typer.Exit]
    usage: list[type[BaseException]] = []
    aborts: list[type[BaseException]] = [typer.Abort, KeyboardInterrupt]
    typer_exception = getattr(typer, "TyperException", None)  # Typer >= 0.25
    if isinstance(typer_exception, type) and issubclass(typer_exception, Exception):
        usage.append(typer_exception)
    try:
        import click

        exits.append(click.exceptions.Exit)
        usage.append(click.ClickException)
        aborts.append(click.exceptions.Abort)
    except ImportError:  # newer Typer does not need click
        pass
    return tuple(exits), tuple(usage), tuple(aborts)


_EXIT, _USAGE, _ABORT = _exception_types()

__all__ = ["app", "main"]

# 128 + SIGTERM, what a shell reports for a process SIGTERM ended; 130 is the same for SIGINT (Ctrl-C).
EXIT_TERMINATED = 128 + signal.SIGTERM
_TRUTHY = frozenset({"1", "true", "t", "yes", "y", "on"})


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM, so that ``finally`` and ``except`` blocks (temporary files,
    staging folders) run as they do on Ctrl-C. A BaseException, so ``except Exception`` does not catch it."""


def _on_sigterm(_signum: int, _frame: FrameType | None) -> None:
    raise Terminated


def _debug_requested() -> bool:
    """``--debug``, or DEPLOYKIT_DEBUG set to a true value (1, true, yes, on); ``0`` turns it off."""
    return state.debug or os.environ.get("DEPLOYKIT_DEBUG", "").strip().lower() in _TRUTHY


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app and map every outcome to a documented exit code."""
    # Commands that run their own process management (serve) install their own SIGTERM handler over this one.
    # Python allows handlers only in the main thread; an embedding caller elsewhere keeps its own.
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        _run(argv)
    finally:
        if previous is not None:  # a program that embeds main() gets its own handler back
            signal.signal(signal.SIGTERM, previous)


def _run(argv: list[str] | None) -> None:
    from deploykit.cli._output import error

    try:
        rv = app(args=argv, prog_name="deploykit", standalone_mode=False)
    except _EXIT as exc:
        sys.exit(getattr(exc, "exit_code", 0))
    except _USAGE as exc:
        show = getattr(exc, "show", None)  # Click's usage errors print themselves with the usage line
        if callable(show):
            show()
        else:
            error(str(exc))
        sys.exit(ExitCode.USAGE)
    except _ABORT:
        error("Interrupted.")
        sys.exit(130)
    except Terminated:
        error("Terminated.")
        sys.exit(EXIT_TERMINATED)
    except DeployKitError as exc:
        if _debug_requested():
            import traceback

            traceback.print_exc()
        error(str(exc))
        sys.exit(int(exc.exit_code))
    if rv == 130:  # Typer turns Ctrl-C inside a command into the return value 130, silently
        error("Interrupted.")
    sys.exit(int(rv) if isinstance(rv, int) else 0)

