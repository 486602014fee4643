"""``bench_model``: latency and throughput of an ONNX model, beside another model and PyTorch eager.

Engines are interleaved: every (batch size, threads) configuration is measured in several rounds, and in
each round every engine runs its share in turn, so a burst of machine noise (another process, a frequency
change) lands on all engines alike instead of on whichever ran at that moment. The library only measures;
``deploykit bench`` renders the table, the JSON and the plot. torch is imported only when PyTorch eager runs.
"""

from __future__ import annotations

import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deploykit.card import ModelCard
from deploykit.errors import DeployKitError, UsageError
from deploykit.fingerprint import fingerprint_input

Progress = Callable[[str], None]
Runner = Callable[[np.ndarray], Any]
DEFAULT_DURATION = 2.0
DEFAULT_WARMUP = 3
ROUNDS = 5


@dataclass(frozen=True)
class Measurement:
    """One engine at one batch size and thread count. Latencies are per call (one batch), in milliseconds."""

    engine: str
    label: str
    batch_size: int
    threads: int
    iterations: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    throughput: float

    def to_dict(self) -> dict[str, Any]:
        return {"engine": self.engine, "label": self.label, "batch_size": self.batch_size,
                "threads": self.threads, "iterations": self.iterations,
                "latency_ms": {"p50": round(self.p50_ms, 4), "p90": round(self.p90_ms, 4),
                               "p99": round(self.p99_ms, 4), "mean": round(self.mean_ms, 4)},
                "throughput": round(self.throughput, 3)}


@dataclass(frozen=True)
class Ratio:
    """Throughput of ``engine`` divided by the baseline's, at one configuration."""

    engine: str
    baseline: str
    batch_size: int
    threads: int
    speedup: float

    def to_dict(self) -> dict[str, Any]:
        return {"engine": self.engine, "baseline": self.baseline, "batch_size": self.batch_size,
                "threads": self.threads, "speedup": round(self.speedup, 4)}


@dataclass(frozen=True)
class BenchReport:
    """All measurements of one ``bench_model`` run, the engines' descriptions and the machine."""

    model: Path
    against: Path | None
    engines: dict[str, str]
    measurements: tuple[Measurement, ...]
    baseline: str | None
    batch_sizes: tuple[int, ...]
    threads: tuple[int, ...]
    warmup: int
    duration: float | None
    iterations: int | None
    machine: dict[str, Any]
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def ratios(self) -> tuple[Ratio, ...]:
        """Every engine's throughput relative to the baseline (``against``, else PyTorch eager)."""
        if self.baseline is None:
            return ()
        base = {(m.batch_size, m.threads): m.throughput
                for m in self.measurements if m.engine == self.baseline}
        return tuple(Ratio(m.engine, self.baseline, m.batch_size, m.threads,
                           m.throughput / base[(m.batch_size, m.threads)])
                     for m in self.measurements
                     if m.engine != self.baseline and base.get((m.batch_size, m.threads)))

    def measurement(self, engine: str, batch_size: int, threads: int) -> Measurement:
        return next(m for m in self.measurements
                    if (m.engine, m.batch_size, m.threads) == (engine, batch_size, threads))

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": str(self.model),
            "against": str(self.against) if self.against else None,
            "engines": dict(self.engines),
            "baseline": self.baseline,
            "config": {"batch_sizes": list(self.batch_sizes), "threads": list(self.threads),
                       "warmup": self.warmup, "duration": self.duration, "iterations": self.iterations,
                       "rounds": ROUNDS},
            "machine": dict(self.machine),
            "results": [m.to_dict() for m in self.measurements],
            "ratios": [r.to_dict() for r in self.ratios],
            "notes": list(self.notes),
        }

    def __str__(self) -> str:
        cpu = self.machine.get("cpu") or "unknown CPU"
        vnni = ", VNNI" if self.machine.get("vnni") else ""
        lines = [f"Benchmark of {self.model.name} on {cpu} ({self.machine.get('cores')} cores{vnni})"]
        ratios = {(r.engine, r.batch_size, r.threads): r.speedup for r in self.ratios}
        width = max(len("engine"), *(len(label) for label in self.engines.values()))
        header = (f"{'engine':<{width}} {'batch':>5} {'threads':>7} {'p50 ms':>9} {'p90 ms':>9} "
                  f"{'p99 ms':>9} {'img/s':>9}")
        if ratios and self.baseline:
            header += f"  vs {self.engines[self.baseline].split(' (')[0]}"
        lines += [header, "-" * len(header)]
        for m in self.measurements:
            row = (f"{m.label:<{width}} {m.batch_size:>5} {m.threads:>7} {m.p50_ms:>9.2f} {m.p90_ms:>9.2f} "
                   f"{m.p99_ms:>9.2f} {m.throughput:>9.1f}")
            if (m.engine, m.batch_size, m.threads) in ratios:
                row += f"  {ratios[(m.engine, m.batch_size, m.threads)]:.2f}x"
            lines.append(row)
        lines += [f"Note: {note}" for note in self.notes]
        load, cores = self.machine.get("load_average"), self.machine.get("cores")
        if load and cores and load[0] > cores:
            lines.append(f"Note: load average {load[0]:g} on {cores} cores when measuring started; other "
                         "processes competed for the CPU, so absolute figures are noisy (ratios less so).")
        return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    """CPU model, core count, the int8 dot-product instructions present, and library versions."""
    import onnxruntime

    flags: set[str] = set()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    cpu = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "vnni": bool(flags & {"avx512_vnni", "avx_vnni"}),
            "isa": sorted(flags & {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8"}),
            "onnxruntime": onnxruntime.__version__, "python": platform.python_version(),
            # Other processes compete for the cores; a load average above the core count means noisy figures.
            "load_average": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None}


def bench_model(
    path: str | Path,
    *,
    against: str | Path | None = None,
    batch_sizes: Sequence[int] = (1, 8),
    threads: Sequence[int] = (1, 2),
    warmup: int = DEFAULT_WARMUP,
    duration: float | None = DEFAULT_DURATION,
    iterations: int | None = None,
    torch_eager: bool | str = "auto",
    progress: Progress | None = None,
) -> BenchReport:
    """Measure latency (p50/p90/p99) and throughput of an ONNX model per batch size and thread count.

    Args:
        against: another ONNX file (e.g. the fp32 parent of an int8 model) measured in the same run.
        duration: seconds of timed runs per engine and configuration; ``iterations`` (calls per engine and
            configuration) replaces it when given.
        torch_eager: ``"auto"`` adds PyTorch eager when torch is installed and the card's source can be
            rebuilt (a note says why not otherwise); True requires it; False leaves it out.

    Raises:
        UsageError: invalid values, or a batch size a static-batch model cannot take.
        ModelFileError: unreadable model.
        DeployKitError: ``torch_eager=True`` and the source cannot be rebuilt.
    """
    from deploykit.card import read_card
    from deploykit.runtime import Predictor, SessionOptions

    say = progress or (lambda _msg: None)
    batch_sizes, threads = tuple(dict.fromkeys(batch_sizes)), tuple(dict.fromkeys(threads))
    if not batch_sizes or min(batch_sizes) < 1:
        raise UsageError("--batch-size values must be at least 1.")
    if not threads or min(threads) < 1:
        raise UsageError("--threads values must be at least 1.")
    if warmup < 0:
        raise UsageError(f"--warmup must not be negative, got {warmup}.")
    if iterations is not None:
        if iterations < 1:
            raise UsageError(f"--iterations must be at least 1, got {iterations}.")
        duration = None
    elif duration is None or not 0 < duration < math.inf:  # NaN fails the comparison too, and never ends
        raise UsageError(f"--duration must be a positive, finite number of seconds, got {duration}.")

    model = Path(path)
    card = read_card(model)
    _check_batches(card, batch_sizes, str(model))
    engines: dict[str, str] = {"onnx": f"onnxruntime {card.precision} ({model.name})"}
    paths: dict[str, Path] = {"onnx": model}
    other_card: ModelCard | None = None
    if against is not None:
        other = Path(against)
        other_card = read_card(other)
        _check_batches(other_card, batch_sizes, str(other))
        if other_card.preprocess.input_shape(1) != card.preprocess.input_shape(1):
            raise UsageError(f"{other.name} takes input {other_card.preprocess.input_shape('N')}, but "
                             f"{model.name} takes {card.preprocess.input_shape('N')}; "
                             "compare models of one input shape.")
        label = f"onnxruntime {other_card.precision} ({other.name})"
        engines["against"] = label if label != engines["onnx"] else f"{label} [against]"
        paths["against"] = other

    notes: list[str] = []
    eager = _eager_model(card, torch_eager, notes, say)
    if eager is not None:
        engines["pytorch"] = f"pytorch eager ({card.source.kind}, fp32)"

    runners: dict[tuple[str, int], Runner] = {}
    for name, file in paths.items():
        for count in threads:
            predictor = Predictor.open(file, SessionOptions(intra_op_threads=count), card=card)
            runners[(name, count)] = _ort_runner(predictor)
    if eager is not None:
        for count in threads:
            runners[("pytorch", count)] = _torch_runner(eager, count)

    measurements: list[Measurement] = []
    saved_threads = _torch_threads() if eager is not None else None
    try:
        for batch in batch_sizes:
            x = fingerprint_input(card.preprocess, seed=1234, batch=batch)
            for count in threads:
                say(f"Measuring batch {batch}, {count} thread(s)")
                timings = _interleaved({name: runners[(name, count)] for name in engines}, x, warmup=warmup,
                                       duration=duration, iterations=iterations)
                for name, seconds in timings.items():
                    measurements.append(_summarise(name, engines[name], batch, count, seconds))
    finally:
        if saved_threads is not None:
            _set_torch_threads(saved_threads)
    baseline = "against" if against is not None else "pytorch" if eager is not None else None
    return BenchReport(model=model, against=Path(against) if against else None, engines=engines,
                       measurements=tuple(measurements), baseline=baseline, batch_sizes=batch_sizes,
                       threads=threads, warmup=warmup, duration=duration, iterations=iterations,
                       machine=machine_info(), notes=tuple(notes))


def _check_batches(card: ModelCard, batch_sizes: Sequence[int], origin: str) -> None:
    fixed = card.input.shape[0] if card.input.shape else None
    if isinstance(fixed, int) and any(b != fixed for b in batch_sizes):
        raise UsageError(f"{origin} has a fixed batch size of {fixed}; pass --batch-size {fixed}.")


def _ort_runner(predictor: Any) -> Runner:
    session, name, outputs = predictor.session, predictor.input_name, predictor.output_names
    return lambda x: session.run(outputs, {name: x})


def _torch_threads() -> int:
    import torch

    return int(torch.get_num_threads())


def _set_torch_threads(count: int) -> None:
    import torch

    torch.set_num_threads(count)


def _torch_runner(module: Any, threads: int) -> Runner:
    import torch

    def run(x: np.ndarray) -> Any:
        # Set on every call: engines are interleaved, and each runner has its own thread count.
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        with torch.inference_mode():
            return module(torch.from_numpy(x))

    return run


def _eager_model(card: ModelCard, torch_eager: bool | str, notes: list[str], say: Progress) -> Any:
    """The card's PyTorch source as an eval-mode module, or None with a note saying why."""
    import importlib.util

    if torch_eager is False or torch_eager == "off":
        return None
    required = torch_eager is True or torch_eager == "on"
    if importlib.util.find_spec("torch") is None:
        if required:
            from deploykit.errors import MissingExtraError

            raise MissingExtraError("torch", "torch")
        notes.append("PyTorch eager not measured: torch is not installed.")
        return None
    if card.source.kind == "onnx":
        if required:
            raise UsageError("The model card names no PyTorch source, so PyTorch eager cannot be measured.")
        notes.append("PyTorch eager not measured: the model card names no PyTorch source.")
        return None
    from deploykit.sources import rebuild_source

    say("Rebuilding the PyTorch source for eager mode")
    try:
        return rebuild_source(card.source).module.eval()
    except DeployKitError as exc:
        if required:
            raise
        notes.append(f"PyTorch eager not measured: {exc}")
        return None


def _interleaved(runners: dict[str, Runner], x: np.ndarray, *, warmup: int, duration: float | None,
                 iterations: int | None) -> dict[str, list[float]]:
    """Per-call seconds for each runner, measured in ``ROUNDS`` rounds that take turns between runners."""
    for run in runners.values():
        for _ in range(warmup):
            run(x)
    timings: dict[str, list[float]] = {name: [] for name in runners}
    for round_index in range(ROUNDS):
        # Alternate the order too, so no engine always follows the same neighbour.
        order = list(runners) if round_index % 2 == 0 else list(reversed(runners))
        for name in order:
            run, samples = runners[name], timings[name]
            if iterations is not None:
                count = iterations // ROUNDS + (1 if round_index < iterations % ROUNDS else 0)
                for _ in range(count):
                    start = time.perf_counter()
                    run(x)
                    samples.append(time.perf_counter() - start)
            else:
                assert duration is not None
                deadline = time.perf_counter() + duration / ROUNDS
                while True:
                    start = time.perf_counter()
                    run(x)
                    end = time.perf_counter()
                    samples.append(end - start)
                    if end >= deadline:
                        break
    return timings


def _summarise(engine: str, label: str, batch: int, threads: int, seconds: list[float]) -> Measurement:
    ms = np.asarray(seconds, dtype=np.float64) * 1000.0
    p50, p90, p99 = (float(v) for v in np.percentile(ms, [50, 90, 99]))
    return Measurement(engine=engine, label=label, batch_size=batch, threads=threads, iterations=len(seconds),
                       p50_ms=p50, p90_ms=p90, p99_ms=p99, mean_ms=float(ms.mean()),
                       throughput=batch * len(seconds) / (float(ms.sum()) / 1000.0))
