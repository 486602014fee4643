"""Terminal output: rich on a TTY, plain text and JSON when piped. Only the CLI prints."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console

from deploykit.jsontext import finite

err_console = Console(stderr=True, highlight=False, soft_wrap=True)
out_console = Console(highlight=False, soft_wrap=True)


def stdout_is_tty() -> bool:
    return sys.stdout.isatty()


def error(message: str) -> None:
    """One line on stderr."""
    if err_console.is_terminal:
        err_console.print(f"[bold red]Error:[/] {message}", markup=True, highlight=False)
    else:
        print(f"Error: {message}", file=sys.stderr)


def info(message: str) -> None:
    """A human message on stderr (never stdout, which may carry JSON)."""
    if err_console.is_terminal:
        err_console.print(message, markup=False)
    else:
        print(message, file=sys.stderr)


def to_json(data: Any, *, indent: int | None = None) -> str:
    """Strict JSON text: NaN and infinities become null, which every JSON parser accepts."""
    return json.dumps(finite(data), default=str, indent=indent, allow_nan=False)


def emit_json(data: Any) -> None:
    """One JSON document on stdout."""
    sys.stdout.write(to_json(data) + "\n")
    sys.stdout.flush()


@contextmanager
def progress_status(enabled: bool = True) -> Iterator[Callable[[str], None]]:
    """A spinner on a terminal; silent when stderr is not a TTY. Yields a function to update its text."""
    if not (enabled and err_console.is_terminal):
        yield lambda _msg: None
        return
    with err_console.status("Working...") as status:
        yield lambda msg: status.update(msg + "...")
