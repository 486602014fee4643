"""The ``deploykit`` command: one Typer app, one error boundary.

Each command lives in its own module (``cli/export.py``, ``cli/serve.py``, ...) and registers itself on
:data:`app`. Commands only parse options, call one library function, render its result and choose the exit
code; heavy libraries (torch, onnxruntime) are imported inside the library calls, never at start-up.
"""

from __future__ import annotations

import os
import sys

import typer

from deploykit.cli import bench, export, inspect, package, predict, serve, verify  # noqa: F401  (registers commands)
from deploykit.cli._app import app, state
from deploykit.errors import DeployKitError, ExitCode


def _exception_types() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...],
                                tuple[type[BaseException], ...]]:
    """(exit, usage error, abort) classes: Typer >= 0.25 vendors its own click, older Typer raises click's."""
    exits: list[type[BaseException]] = [typer.Exit]
    usage: list[type[BaseException]] = []
    aborts: list[type[BaseException]] = [typer.Abort, KeyboardInterrupt]
    try:
        from typer._click.exceptions import ClickException

        usage.append(ClickException)
    except ImportError:  # older Typer
        pass
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


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app and map every outcome to a documented exit code."""
    from deploykit.cli._output import error

    try:
        rv = app(args=argv, prog_name="deploykit", standalone_mode=False)
    except _EXIT as exc:
        sys.exit(getattr(exc, "exit_code", 0))
    except _USAGE as exc:
        exc.show()  # type: ignore[attr-defined]
        sys.exit(ExitCode.USAGE)
    except _ABORT:
        error("Interrupted.")
        sys.exit(130)
    except DeployKitError as exc:
        if state.debug or os.environ.get("DEPLOYKIT_DEBUG"):
            import traceback

            traceback.print_exc()
        error(str(exc))
        sys.exit(int(exc.exit_code))
    if rv == 130:  # Typer turns Ctrl-C inside a command into the return value 130, silently
        error("Interrupted.")
    sys.exit(int(rv) if isinstance(rv, int) else 0)

