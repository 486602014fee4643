"""Server configuration: the frozen ``ServeConfig`` and MODEL spec parsing (files, folders, ``name=path``)."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from deploykit.errors import ModelNotFoundError, UsageError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")

#: Default most rows per ONNX Runtime call when one call at a time has every core (or a GPU): batching
#: is then what keeps the device busy.
MAX_BATCH_ONE_AT_A_TIME = 8
#: ... and when calls run side by side on a share of the cores (the CPU default): each call already has a core
#: of its own, and a larger batch only makes the requests in it wait for each other (at 8 clients on 2 cores,
#: median p99 224 ms at 2 against 320 ms at 8, throughput within 2%;
#: ``bench_serve.py --variant "--max-batch-size 8"``).
MAX_BATCH_SIDE_BY_SIDE = 2

#: Default seconds a connection may stay silent (nothing received, nothing sent) before the server closes it:
#: an idle kept-alive connection, a client stalled in its request, a client that reads nothing of its answer
#: (``--client-timeout``).
DEFAULT_CLIENT_TIMEOUT = 10
#: Default memory for the images being decoded at once (``--decode-budget-mb``): room for one image at the
#: default --max-image-pixels (40 megapixels) even when it must be converted to RGB (8 bytes a pixel).
DEFAULT_DECODE_BUDGET_MB = 320
#: Default most connections open at once (``--max-connections``); past it the server accepts no more until
#: some close (they wait in the listen backlog).
DEFAULT_MAX_CONNECTIONS = 1000


@dataclass(frozen=True)
class ModelSpec:
    """One model to serve: the URL name, the ONNX file and its version (a plain file is version 1)."""

    name: str
    path: Path
    version: str = "1"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "path": str(self.path)}

    def __str__(self) -> str:
        return f"{self.name}={self.path}"


@dataclass(frozen=True)
class ServeConfig:
    """Everything the server needs; built by the CLI or by code, never from Typer objects.

    ``models`` are served in order, the first is the default for ``POST /predict``. ``request_timeout`` and
    ``graceful_timeout`` are seconds, and so is ``client_timeout`` (whole seconds): how long a connection may
    stay silent before it is closed. ``threads`` handle requests whose bytes have all arrived; the HTTP server
    receives requests and sends answers without them, for up to ``max_connections`` connections.
    ``instances``, ``intra_op_threads`` and ``max_batch_size`` None pick values for the machine
    (``registry.inference_plan``).
    ``load_in_background`` makes ``create_app`` return at once (liveness answers while models load).
    """

    models: tuple[ModelSpec, ...]
    host: str = "127.0.0.1"
    port: int = 5000
    threads: int = 8
    max_batch_size: int | None = None
    instances: int | None = None
    max_batch_delay_ms: float = 5.0
    max_queue: int = 64
    request_timeout: float = 30.0
    max_body_mb: float = 20.0
    max_request_images: int = 64
    graceful_timeout: float = 30.0
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    intra_op_threads: int | None = None
    providers: tuple[str, ...] = ("cpu",)
    self_test: bool = True
    log_level: str = "info"
    max_image_pixels: int = 40_000_000
    decode_budget_mb: float = DEFAULT_DECODE_BUDGET_MB
    exact_decode: bool = False
    client_timeout: int = DEFAULT_CLIENT_TIMEOUT
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    load_in_background: bool = False

    def __post_init__(self) -> None:
        checks = [
            (not self.models, "no models to serve"),
            (self.threads < 1, f"--threads must be at least 1, got {self.threads}"),
            (
                self.max_batch_size is not None and self.max_batch_size < 1,
                f"--max-batch-size must be at least 1, got {self.max_batch_size}",
            ),
            (
                self.instances is not None and self.instances < 1,
                f"--instances must be at least 1, got {self.instances}",
            ),
            (
                self.max_batch_delay_ms < 0,
                f"--max-batch-delay-ms must be >= 0, got {self.max_batch_delay_ms}",
            ),
            (self.max_queue < 1, f"--max-queue must be at least 1, got {self.max_queue}"),
            (
                not 1 <= self.client_timeout <= 86400,
                f"--client-timeout must be between 1 and 86400 seconds, got {self.client_timeout}",
            ),
            (
                not 1 <= self.max_connections <= 100_000,
                f"--max-connections must be between 1 and 100000, got {self.max_connections}",
            ),
            (self.request_timeout <= 0, f"--request-timeout must be positive, got {self.request_timeout}"),
            (self.max_body_mb <= 0, f"--max-body-mb must be positive, got {self.max_body_mb}"),
            (self.decode_budget_mb <= 0, f"--decode-budget-mb must be positive, got {self.decode_budget_mb}"),
            (
                self.max_request_images < 1,
                f"--max-request-images must be at least 1, got {self.max_request_images}",
            ),
            (self.graceful_timeout < 0, f"--graceful-timeout must be >= 0, got {self.graceful_timeout}"),
            (not 0 <= self.port <= 65535, f"--port must be 0..65535, got {self.port}"),
            (
                self.intra_op_threads is not None and self.intra_op_threads < 1,
                f"--intra-op-threads must be at least 1, got {self.intra_op_threads}",
            ),
            (self.api_key is not None and not self.api_key.strip(), "--api-key must not be empty"),
        ]
        for option, value in (
            ("--max-batch-delay-ms", self.max_batch_delay_ms),
            ("--request-timeout", self.request_timeout),
            ("--max-body-mb", self.max_body_mb),
            ("--decode-budget-mb", self.decode_budget_mb),
            ("--graceful-timeout", self.graceful_timeout),
        ):
            if not math.isfinite(value):
                raise UsageError(f"{option} must be a finite number, got {value}.")
        for failed, message in checks:
            if failed:
                raise UsageError(message + ".")
        names = [(m.name, m.version) for m in self.models]
        duplicates = sorted({n for n, v in names if names.count((n, v)) > 1})
        if duplicates:
            raise UsageError(
                f"Two models are named {', '.join(duplicates)}.",
                hint="Rename one with name=path, e.g. other=path/to/model.onnx.",
            )

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    @property
    def decode_budget_bytes(self) -> int:
        return int(self.decode_budget_mb * 1024 * 1024)

    @property
    def default_model(self) -> str:
        return self.models[0].name

    def replace(self, **changes: Any) -> ServeConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "api_key"}
        data["models"] = [m.to_dict() for m in self.models]
        data["api_key"] = "***" if self.api_key else None
        return data


def _check_name(name: str, spec: str) -> str:
    if not _NAME.match(name):
        raise UsageError(
            f"Invalid model name {name!r} in {spec!r}: use letters, digits, '_', '-' and '.'.",
            hint="For example: deploykit serve mymodel=model.onnx",
        )
    return name


def parse_model_specs(specs: Sequence[str], *, cwd: str | Path | None = None) -> tuple[ModelSpec, ...]:
    """Turn MODEL arguments into named ONNX files.

    Each spec is an ``.onnx`` file, a folder (every ``*.onnx`` in it, or else a model repository as Triton
    and KServe load it: ``<name>/<version>/model.onnx``, every version), or ``name=path`` to rename a file.
    With no spec, every ``*.onnx`` file in ``cwd`` is served. Raises ``ModelNotFoundError`` when a file is
    missing or nothing is found.
    """
    base = Path(cwd) if cwd is not None else Path.cwd()
    if not specs:
        found = sorted(base.glob("*.onnx"))
        if not found:
            raise ModelNotFoundError(
                f"No .onnx files in {str(base)!r} and no MODEL given.",
                hint="Export one with `deploykit export resnet18`, or pass one: deploykit serve model.onnx",
            )
        return tuple(ModelSpec(_check_name(p.stem, p.name), p.resolve()) for p in found)
    result: list[ModelSpec] = []
    for spec in specs:
        name: str | None = None
        raw = spec
        if "=" in spec and not Path(spec).exists():
            name, raw = spec.split("=", 1)
            name = _check_name(name.strip(), spec)
        path = Path(raw).expanduser()
        if not path.is_absolute():
            path = base / path
        if path.is_dir():
            if name is not None:
                raise UsageError(f"{spec!r}: name=path needs a file, {raw!r} is a folder.")
            found = sorted(path.glob("*.onnx"))
            if found:
                result.extend(ModelSpec(_check_name(p.stem, p.name), p.resolve()) for p in found)
                continue
            repository = _repository(path)
            if not repository:
                raise ModelNotFoundError(
                    f"No .onnx files in folder {raw!r}, and no model repository in it "
                    "(<name>/<version>/model.onnx).",
                    hint="Export one with `deploykit export`; `deploykit package` writes a repository.",
                )
            result.extend(repository)
            continue
        if not path.is_file():
            raise ModelNotFoundError(f"Model file {raw!r} does not exist.", hint="Check the path.")
        result.append(ModelSpec(name or _check_name(path.stem, raw), path.resolve()))
    return tuple(result)


def _repository(folder: Path) -> list[ModelSpec]:
    """The models of a model repository (``<name>/<version>/model.onnx``, versions as whole numbers, with or
    without a ``config.pbtxt``), by name, each version in numeric order; empty when there are none."""
    specs = []
    for model_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        versions = sorted(
            (v for v in model_dir.iterdir() if v.name.isdigit() and (v / "model.onnx").is_file()),
            key=lambda v: int(v.name),
        )
        for version in versions:
            name = _check_name(model_dir.name, str(model_dir))
            specs.append(ModelSpec(name, (version / "model.onnx").resolve(), version.name))
    return specs
