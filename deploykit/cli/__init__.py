"""The ``deploykit`` command: one Typer app, one error boundary.

Each command lives in its own module (``cli/export.py``, ``cli/serve.py``, ...) and registers itself on
:data:`app`. Commands only parse options, call one library function, render its result and choose the exit
code; heavy libraries (torch, onnxruntime) are imported inside the library calls, never at start-up.
"""

from __future__ import annotations

import os
import sys

import click

from deploykit.cli._app import app, state
from deploykit.cli import bench, export, inspect, package, predict, serve, verify  # noqa: F401  (registers commands)
from deploykit.errors import DeployKitError, ExitCode

__all__ = ["app", "main"]


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app and map every outcome to a documented exit code."""
    from deploykit.cli._output import error

    try:
        rv = app(args=argv, prog_name="deploykit", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(ExitCode.USAGE)
    except (click.exceptions.Abort, KeyboardInterrupt):
        error("Interrupted.")
        sys.exit(130)
    except DeployKitError as exc:
        if state.debug or os.environ.get("DEPLOYKIT_DEBUG"):
            import traceback

            traceback.print_exc()
        error(str(exc))
        sys.exit(int(exc.exit_code))
    sys.exit(int(rv) if isinstance(rv, int) else 0)

