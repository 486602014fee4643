"""Exit codes and the user-facing error hierarchy.

A ``DeployKitError`` is a user error: the CLI prints its message on one line and exits with its
``exit_code``, without a traceback (``--debug`` shows one). Anything else is a bug and keeps its traceback.
``one_line`` turns any exception into the one line of text that such a message quotes.
"""

from __future__ import annotations

import re
from enum import IntEnum

_COLOUR = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # terminal colour codes (torch.onnx puts them in messages)
_ORT_CODE = re.compile(r"\[ONNXRuntimeError\] : \d+ : \w+ : ")


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


def one_line(exc: BaseException, limit: int = 300, *, with_type: bool = False) -> str:
    """An exception's message as one line of at most ``limit`` characters, to put in an error message.

    ONNX Runtime spreads the useful part over several lines ("Got invalid dimensions for input: x ...
    index: 1 Got: 5 Expected: 4"): its lines are joined, without the "[ONNXRuntimeError] : 2 :
    INVALID_ARGUMENT :" prefix. Other messages keep their first line, with the lines after it when it ends
    in a colon that introduces them (torch's "Error(s) in loading state_dict ...:"); when more lines follow
    or the text does not fit, it is cut to its first sentence, the useful part of torch's (advice comes
    after it). Then it is cut to ``limit``. Colour codes and a final period are dropped, so the caller ends
    its own sentence.

    Args:
        exc: the exception.
        limit: the most characters returned, including the type name and a closing "...".
        with_type: put the exception's type name in front (``RuntimeError: ...``).

    Returns:
        The text; the type name alone when the message is empty.
    """
    name = type(exc).__name__
    text = _COLOUR.sub("", str(exc)).strip()
    if not text:
        return name
    room = limit - (len(name) + 2 if with_type else 0)
    if type(exc).__module__.startswith("onnxruntime") or text.startswith("[ONNXRuntimeError]"):
        text = " ".join((_ORT_CODE.sub("", text, count=1) or text).split())
    else:
        lines = text.splitlines()
        cut = len(lines) > 1 or len(text) > room
        text = " ".join((text if lines[0].rstrip().endswith(":") else lines[0]).split())
        if cut and text.find(". ") > 0:
            text = text[:text.find(". ")]
    if text.endswith(".") and not text.endswith(".."):
        text = text[:-1]
    if len(text) > room:
        text = text[:max(room - 3, 0)].rstrip() + "..."
    return f"{name}: {text}" if with_type else text


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
