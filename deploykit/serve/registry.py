"""The models of one server process: each loaded once, self-tested, with its batcher.

Loading happens in the worker process (ONNX Runtime is not fork-safe), optionally in a background thread so
that liveness answers while models load. Readiness is the conjunction of every model's state.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any

from deploykit.card import ModelCard
from deploykit.errors import DeployKitError
from deploykit.runtime import Predictor, SessionOptions
from deploykit.serve.batching import Batcher
from deploykit.serve.config import ModelSpec, ServeConfig
from deploykit.serve.metrics import Metrics

log = logging.getLogger("deploykit.serve")


def serving_session_options(config: ServeConfig) -> SessionOptions:
    """Session options for serving: no spinning (request threads share the cores) and one thread per core
    split among the worker processes."""
    threads = config.intra_op_threads
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // config.workers)
    return SessionOptions(providers=config.providers, intra_op_threads=threads, allow_spinning=False)


@dataclass
class ModelEntry:
    """One served model and its state."""

    spec: ModelSpec
    default: bool
    predictor: Predictor | None = None
    batcher: Batcher | None = None
    ready: bool = False
    error: str | None = None
    self_test: dict[str, Any] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def card(self) -> ModelCard | None:
        return self.predictor.card if self.predictor is not None else None

    def describe(self) -> dict[str, Any]:
        card = self.card
        data: dict[str, Any] = {
            "name": self.name,
            "default": self.default,
            "ready": self.ready,
            "card": card.to_dict() if card is not None else None,
        }
        if self.error:
            data["error"] = self.error
        return data


class Registry:
    """All models of the server, by name, in the order given (the first is the default)."""

    def __init__(self, config: ServeConfig, metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics
        self.entries = {spec.name: ModelEntry(spec, i == 0) for i, spec in enumerate(config.models)}
        self.draining = False
        self.loaded = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def default(self) -> ModelEntry:
        return next(iter(self.entries.values()))

    @property
    def ready(self) -> bool:
        return self.loaded.is_set() and not self.draining and all(e.ready for e in self.entries.values())

    def not_ready_reason(self) -> str:
        if self.draining:
            return "The server is shutting down."
        for entry in self.entries.values():
            if entry.error:
                return f"Model {entry.name!r} is not ready: {entry.error}"
        if not self.loaded.is_set():
            return "The models are still loading."
        return "The server is not ready."

    def get(self, name: str) -> ModelEntry | None:
        return self.entries.get(name)

    def load(self, background: bool = False) -> None:
        """Load every model (in a daemon thread when ``background``)."""
        if background:
            self._thread = threading.Thread(target=self._load_all, name="deploykit-load", daemon=True)
            self._thread.start()
        else:
            self._load_all()

    def _load_all(self) -> None:
        try:
            for entry in self.entries.values():
                self._load(entry)
        finally:
            release_free_memory()
            self.loaded.set()
        if self.ready:
            log.info("ready: %s", ", ".join(self.entries))

    def _load(self, entry: ModelEntry) -> None:
        config = self.config
        try:
            predictor = Predictor.open(entry.spec.path, serving_session_options(config), name=entry.name)
        except DeployKitError as exc:
            entry.error = str(exc)
            log.error("model %r failed to load: %s", entry.name, exc)
            return
        entry.predictor = predictor
        if config.self_test:
            from deploykit.fingerprint import check_fingerprint

            result = check_fingerprint(predictor.card, lambda x: predictor.run(x)[0])
            entry.self_test = result.to_dict()
            if not result:
                entry.error = (
                    f"fingerprint self-test failed: {result.reason} (the ONNX Runtime outputs differ "
                    "from the exporter's; check the model with `deploykit verify`, or start with "
                    "--no-self-test)"
                )
                log.error("model %r is not ready: %s", entry.name, entry.error)
                return
        static = predictor.card.input.shape[0] if predictor.card.input.shape else None
        metrics = self.metrics
        name = entry.name
        entry.batcher = Batcher(
            predictor.run,
            name=name,
            max_batch_size=config.max_batch_size,
            max_delay=config.max_batch_delay_ms / 1000.0,
            max_queue=config.max_queue,
            static_batch=static if isinstance(static, int) and static > 0 else None,
            instances=config.instances,
            on_batch=lambda rows, seconds: metrics.observe_batch(name, rows, seconds),
        )
        entry.ready = True
        metrics.model_ready.labels(name).set(1)
        log.info(
            "model %r loaded from %s (%d classes, self-test %s)",
            name,
            entry.spec.path,
            predictor.card.num_classes,
            "passed" if config.self_test else "skipped",
        )

    def close(self) -> None:
        """Stop the batchers after their queued requests are done."""
        for entry in self.entries.values():
            if entry.batcher is not None:
                entry.batcher.close()


def release_free_memory() -> None:
    """Give freed heap memory back to the OS (glibc only; a no-op elsewhere).

    Building an ONNX Runtime session parses the whole model and frees most of it again, but glibc keeps
    the freed pages: for resnet18 that is about 90 MB of resident memory per worker that ``malloc_trim``
    returns.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return
