"""Exit codes and the user-facing error hierarchy.

A ``DeployKitError`` is a user error: the CLI prints its message on one line and exits with its
``exit_code``, without a traceback (``--debug`` shows one). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Documented process exit codes, shared by every command."""

    OK = 0
    ERROR = 1
    USAGE = 2
    VERIFICATION_FAILED = 3
    CONNECTION = 4
    PARTIAL = 5


class DeployKitError(Exception):
    """A user error: the message says what went wrong and what to do."""

    exit_code: ExitCode = ExitCode.ERROR

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} {self.hint}" if self.hint else self.message


class UsageError(DeployKitError):
    """Bad arguments or values (exit 2)."""

    exit_code = ExitCode.USAGE


class ModelNotFoundError(UsageError):
    """An unknown model name, a missing file, or a source that cannot be resolved."""


class MissingExtraError(DeployKitError):
    """An optional dependency is not installed."""

    def __init__(self, package: str, extra: str) -> None:
        super().__init__(
            f"This command needs {package}, which is not installed.",
            hint=f"Install it with: pip install 'deploykit[{extra}]'",
        )


class ModelFileError(DeployKitError):
    """An ONNX file that cannot be read, has no model card, or is corrupt."""


class ExportError(DeployKitError):
    """The model could not be exported to ONNX."""


class WeightsUnavailableError(DeployKitError):
    """Pretrained weights are neither cached nor downloadable."""


class VerificationError(DeployKitError):
    """A parity, structural or fingerprint check failed (exit 3)."""

    exit_code = ExitCode.VERIFICATION_FAILED


class ConnectionFailedError(DeployKitError):
    """The server could not be reached or answered with a server error (exit 4)."""

    exit_code = ExitCode.CONNECTION


class RequestError(DeployKitError):
    """The server refused a request with a 4xx answer; the message is the server's."""

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message)
        self.status = status


class NonFiniteOutputError(DeployKitError):
    """A model produced NaN or infinite output values, so they give no prediction."""

    def __init__(self) -> None:
        super().__init__("The model's output is not a finite number (NaN or infinity), so it gives no "
                         "prediction.", hint="The model or its weights are broken; check the file with "
                         "`deploykit verify`.")


class PartialFailureError(DeployKitError):
    """Some items of a batch operation failed while others succeeded (exit 5)."""

    exit_code = ExitCode.PARTIAL


def require(module: str, extra: str = "torch") -> None:
    """Raise ``MissingExtraError`` unless ``module`` can be imported.

    Only checks importability (``find_spec``); it does not import the module.
    """
    import importlib.util

    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken install or an import hook that refuses the module
        found = False
    if not found:
        raise MissingExtraError(module, extra)
