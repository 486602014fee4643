"""The models of the server process: each loaded once, self-tested, with its batcher.

Loading happens in a background thread when asked, so that liveness answers while models load. Readiness is
the conjunction of every model's state, and false once the server is draining (SIGTERM).
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deploykit.card import ModelCard
from deploykit.errors import DeployKitError
from deploykit.runtime import Predictor, SessionOptions, create_session, provider_name
from deploykit.serve.answers import ServeError
from deploykit.serve.batching import Batcher
from deploykit.serve.budget import DecodeBudget
from deploykit.serve.config import MAX_BATCH_ONE_AT_A_TIME, MAX_BATCH_SIDE_BY_SIDE, ModelSpec, ServeConfig
from deploykit.serve.memory import release_free_memory
from deploykit.serve.metrics import Metrics

if TYPE_CHECKING:
    from flask import Flask

log = logging.getLogger("deploykit.serve")

EXTENSION = "deploykit"  # the app's ``extensions`` key of its Registry


@dataclass(frozen=True)
class InferencePlan:
    """How the server runs a model: up to ``instances`` ONNX Runtime calls side by side, each on ``threads``
    intra-op threads and of at most ``max_batch_size`` rows; a call that starts with nothing else running,
    queued or being decoded runs on ``solo_threads`` (a second session) instead. On 2 cores by default: a
    lone request gets both cores, concurrent requests get one core each, which keeps decoding and inference
    from fighting over the cores (docs/benchmarks.md)."""

    instances: int
    threads: int
    solo_threads: int
    max_batch_size: int

    def to_dict(self) -> dict[str, int]:
        return {
            "instances": self.instances,
            "threads": self.threads,
            "solo_threads": self.solo_threads,
            "max_batch_size": self.max_batch_size,
        }


def usable_cores(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """Cores this process may use: its CPU affinity (a container's cpuset), capped by its cgroup's CPU quota
    (a Kubernetes CPU limit, which leaves the affinity at every core of the node), rounded down, at least 1.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup_root)
    if quota is not None:
        cores = min(cores, int(quota))  # rounded down: threads past the quota only get throttled
    return max(1, cores)


def cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The CPU quota in cores (cgroup v2 ``cpu.max``, or v1 ``cpu.cfs_quota_us / cpu.cfs_period_us``), or
    None when there is none or it cannot be read."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def inference_plan(config: ServeConfig, cores: int | None = None) -> InferencePlan:
    """``cores`` (default: :func:`usable_cores`) split as ``config`` asks.

    ``--instances`` defaults to one per core on CPU (one elsewhere); ``--intra-op-threads`` fixes the threads
    of every call (no solo session); by default a call alone takes all the cores and calls side by
    side take ``cores / instances`` each. ``--max-batch-size`` defaults to ``MAX_BATCH_SIDE_BY_SIDE`` when
    calls run side by side on CPU and to ``MAX_BATCH_ONE_AT_A_TIME`` otherwise.
    """
    share = max(1, cores or usable_cores())
    on_cpu = all(provider_name(p) == "CPUExecutionProvider" for p in config.providers)
    instances = config.instances or (share if on_cpu else 1)
    batch = config.max_batch_size or (
        MAX_BATCH_SIDE_BY_SIDE if on_cpu and instances > 1 else MAX_BATCH_ONE_AT_A_TIME
    )
    if config.intra_op_threads is not None:
        return InferencePlan(instances, config.intra_op_threads, config.intra_op_threads, batch)
    return InferencePlan(instances, max(1, share // instances), share, batch)


def serving_session_options(config: ServeConfig, threads: int, *, solo: bool = False) -> SessionOptions:
    """Session options for serving with ``threads`` intra-op threads. Calls side by side never spin (request
    threads share the cores); a ``solo`` call has the cores to itself, so its threads may spin between its
    parallel sections (no wake-up latency: 5-10% faster at one client, ``bench_serve.py``'s ceiling with ORT
    defaults against its threads configuration) and stop as soon as it returns."""
    return SessionOptions(
        providers=config.providers,
        intra_op_threads=threads,
        allow_spinning=solo,
        stop_spinning_after_run=solo,
    )


def open_predictors(
    path: str | Path, config: ServeConfig, plan: InferencePlan, *, name: str | None = None
) -> tuple[Predictor, Predictor | None]:
    """The model's sessions for ``plan``: the one calls side by side share (``plan.threads``) and, when the
    plan gives a call alone more threads, the solo one. Raises ``ModelFileError``."""
    shared = Predictor.open(path, serving_session_options(config, plan.threads), name=name)
    if plan.solo_threads == plan.threads:
        return shared, None
    session = create_session(path, serving_session_options(config, plan.solo_threads, solo=True))
    return shared, Predictor(session, shared.card, name=shared.name, path=str(path))


@dataclass
class ModelEntry:
    """One served model and its state."""

    spec: ModelSpec
    default: bool
    #: the highest version of its name, which the routes without a version serve
    latest: bool = True
    predictor: Predictor | None = None
    solo: Predictor | None = None
    plan: InferencePlan | None = None
    batcher: Batcher | None = None
    ready: bool = False
    error: str | None = None
    self_test: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def version(self) -> str:
        return self.spec.version

    @property
    def label(self) -> str:
        """The model's name in metrics and logs: ``name``, or ``name:version`` for an older version."""
        return self.name if self.latest else f"{self.name}:{self.version}"

    @property
    def card(self) -> ModelCard | None:
        return self.predictor.card if self.predictor is not None else None

    def describe(self) -> dict[str, Any]:
        card = self.card
        data: dict[str, Any] = {
            "name": self.name,
            "version": self.version,
            "default": self.default,
            "ready": self.ready,
            "card": card.to_dict() if card is not None else None,
        }
        if self.plan is not None:
            data["inference"] = self.plan.to_dict()
        if self.error:
            data["error"] = self.error
        return data


class Registry:
    """All models of the server, by name, in the order given (the first is the default), each with its
    versions (a model repository's ``<name>/<version>/model.onnx``; a plain file is version 1)."""

    def __init__(self, config: ServeConfig, metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics
        self.versions: dict[str, dict[str, ModelEntry]] = {}
        for spec in config.models:
            self.versions.setdefault(spec.name, {})[spec.version] = ModelEntry(spec, not self.versions)
        for versions in self.versions.values():
            newest = max(versions, key=version_key)
            for version, entry in versions.items():
                entry.latest = version == newest
                entry.default = entry.default and entry.latest
        #: the entry the routes without a version serve, by name
        self.entries = {
            name: next(e for e in versions.values() if e.latest) for name, versions in self.versions.items()
        }
        next(iter(self.entries.values())).default = True
        self.all = [entry for versions in self.versions.values() for entry in versions.values()]
        self.plan = inference_plan(config)
        self.budget = DecodeBudget(config.decode_budget_bytes, max_waiting=config.max_queue)
        self.draining = False
        self.loaded = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def default(self) -> ModelEntry:
        return next(iter(self.entries.values()))

    @property
    def ready(self) -> bool:
        return self.loaded.is_set() and not self.draining and all(e.ready for e in self.all)

    def not_ready_reason(self) -> str:
        if self.draining:
            return "The server is shutting down."
        for entry in self.all:
            if entry.error:
                return f"Model {entry.label!r} is not ready: {entry.error}"
        if not self.loaded.is_set():
            return "The models are still loading."
        return "The server is not ready."

    def known(self, name: str) -> ModelEntry:
        """The model named ``name``; 404 when there is none."""
        entry = self.entries.get(name)
        if entry is None:
            raise ServeError(
                f"Unknown model {name!r}; this server has {', '.join(self.entries)}. See GET /models.",
                status=404,
            )
        return entry

    def version_of(self, name: str, version: str | None) -> ModelEntry:
        """The model ``name`` at ``version`` (None: its highest); 404 for an unknown model or version."""
        entry = self.known(name)
        if version is None or version == entry.version:
            return entry
        found = self.versions[name].get(version)
        if found is None:
            have = ", ".join(sorted(self.versions[name], key=version_key))
            raise ServeError(f"Model {name!r} has no version {version!r}; it has {have}.", status=404)
        return found

    def wait_loaded(self) -> None:
        """Wait (at most ``--request-timeout``) while the models are still loading at start-up: a request
        that arrives then is answered once they are, rather than refused."""
        if not self.loaded.is_set():
            self.loaded.wait(self.config.request_timeout)

    def ready_entry(self, name: str | None, version: str | None = None) -> ModelEntry:
        """The named (or default) model at ``version`` (None: its highest), ready to run; 404 when unknown,
        503 while it is not ready."""
        entry = self.default if name is None else self.version_of(name, version)
        self.wait_loaded()
        if not entry.ready or entry.batcher is None or entry.predictor is None:
            reason = entry.error or "it is still loading"
            raise ServeError(
                f"Model {entry.label!r} is not ready: {reason}", status=503, headers={"Retry-After": "5"}
            )
        return entry

    def load(self, background: bool = False) -> None:
        """Load every model (in a daemon thread when ``background``)."""
        if background:
            self._thread = threading.Thread(target=self._load_all, name="deploykit-load", daemon=True)
            self._thread.start()
        else:
            self._load_all()

    def _load_all(self) -> None:
        try:
            for entry in self.all:
                self._load(entry)
        finally:
            release_free_memory()
            self.loaded.set()
        if self.ready:
            log.info("ready: %s", ", ".join(e.label for e in self.all))

    def _load(self, entry: ModelEntry) -> None:
        config = self.config
        plan = self.plan
        path = entry.spec.path
        self.metrics.model_ready.labels(entry.label).set(0)  # a series from the start: alerts see a failure
        try:
            predictor, solo = open_predictors(path, config, plan, name=entry.name)
        except DeployKitError as exc:
            entry.error = str(exc)
            log.error("model %r failed to load: %s", entry.label, exc)
            return
        entry.predictor = predictor
        entry.solo = solo
        entry.plan = plan
        if config.self_test:
            from deploykit.fingerprint import check_fingerprint

            # each session is tested: their thread counts differ, and so may their kernels' partitioning
            for tested in (predictor, solo) if solo is not None else (predictor,):
                result = check_fingerprint(predictor.card, tested.first_output)
                entry.self_test = result.to_dict()
                if not result:
                    entry.error = (
                        f"fingerprint self-test failed: {result.reason} (the ONNX Runtime outputs differ "
                        "from the exporter's; check the model with `deploykit verify`, or start with "
                        "--no-self-test)"
                    )
                    log.error("model %r is not ready: %s", entry.label, entry.error)
                    return
        metrics = self.metrics
        name = entry.label
        entry.batcher = Batcher(
            predictor.run,
            name=name,
            max_batch_size=plan.max_batch_size,
            max_delay=config.max_batch_delay_ms / 1000.0,
            max_queue=config.max_queue,
            static_batch=predictor.card.fixed_batch,
            instances=plan.instances,
            solo_run=solo.run if solo is not None else None,
            on_batch=lambda rows, seconds, alone: metrics.observe_batch(name, rows, seconds, alone),
        )
        entry.ready = True
        metrics.model_ready.labels(name).set(1)
        log.info(
            "model %r loaded from %s (%d classes, self-test %s; %d instances x %d threads, batches of up to "
            "%d, %s)",
            name,
            path,
            predictor.card.num_classes,
            "passed" if config.self_test else "skipped",
            plan.instances,
            plan.threads,
            plan.max_batch_size,
            f"{plan.solo_threads} threads for a call alone" if solo is not None else "no solo session",
        )

    def close(self) -> None:
        """Stop the batchers after their queued requests are done."""
        for entry in self.all:
            if entry.batcher is not None:
                entry.batcher.close()


def version_key(version: str) -> tuple[int, str]:
    """Versions sort as numbers (Triton's are integers), any other text after them."""
    return (int(version), "") if version.isdigit() else (2**63, version)


def registry_of(app: Flask) -> Registry:
    """The registry that ``create_app`` stored in ``app``."""
    registry: Registry = app.extensions[EXTENSION]
    return registry
