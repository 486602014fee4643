"""The Typer app object and global options, shared by every command module."""

from __future__ import annotations

from dataclasses import dataclass

import typer

from deploykit import __version__


@dataclass
class State:
    debug: bool = False


state = State()

app = typer.Typer(
    name="deploykit",
    help="From a trained PyTorch model to a verified, served, monitored ONNX endpoint.\n\n"
    "Exit codes: 0 ok, 1 error, 2 usage, 3 verification failed, 4 connection or server error, "
    "5 partial failure.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"deploykit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors.",
                               envvar="DEPLOYKIT_DEBUG"),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Show the version."),
) -> None:
    state.debug = debug
