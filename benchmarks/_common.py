"""Shared helpers for the benchmark scripts: timing, percentiles, tables, JSON, machine details, real photos
(a small one and a phone-camera-size one made from it), and subprocess servers on loopback ports.

Benchmarks are scripts, not tests: they print a table and optionally write JSON; nothing here asserts speed.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
#: Generated inputs (never committed): ``$XDG_CACHE_HOME/deploykit-benchmarks``, else ``~/.cache/...``.
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "deploykit-benchmarks"


def sample_photo() -> Path:
    """A real JPEG photograph (Grace Hopper, 512x600, 61 kB) bundled with matplotlib; no download needed."""
    from matplotlib import cbook

    return Path(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))


def phone_photo(directory: Path | None = None, *, size: tuple[int, int] = (4032, 3024), seed: int = 0,
                quality: int = 92) -> Path:
    """A phone-camera-size JPEG (default 4032x3024, a few MB like a phone's) made from :func:`sample_photo`.

    The real photo is cropped to the aspect ratio of ``size`` (centred), upscaled with Pillow's Lanczos filter
    and given Gaussian sensor grain: read noise plus shot noise that grows with brightness, mostly shared by
    the three channels (luminance grain) with a weaker per-channel part (chroma grain). Without the grain an
    upscaled image is smooth and compresses to a fraction of a real photo's size, which would understate
    upload and decoding. The bytes are deterministic for a given ``seed`` and Pillow and NumPy versions.

    Args:
        directory: where the file is cached (default :data:`CACHE`); it is written once, atomically.
        size: (width, height) in pixels.
        seed: seed of the grain.
        quality: JPEG quality (phones save at about 90-95).
    """
    import numpy as np
    from PIL import Image

    width, height = size
    target = (directory or CACHE) / f"phone-{width}x{height}-seed{seed}-q{quality}.jpg"
    if target.is_file():
        return target
    with Image.open(sample_photo()) as opened:
        source = opened.convert("RGB")
    w, h = source.size
    if w * height >= h * width:  # wider than the target: crop the sides
        crop_w = round(h * width / height)
        box = ((w - crop_w) // 2, 0, (w - crop_w) // 2 + crop_w, h)
    else:  # taller: crop top and bottom
        crop_h = round(w * height / width)
        box = (0, (h - crop_h) // 2, w, (h - crop_h) // 2 + crop_h)
    upscaled = source.resize(size, Image.Resampling.LANCZOS, box=box)
    read_noise, shot_gain, chroma = 3.0, 0.1, 0.5  # sigma 3 levels in the dark, about 5 at mid-grey
    rng = np.random.default_rng(seed)
    pixels = np.empty((height, width, 3), np.uint8)
    for top in range(0, height, 256):  # in bands, to keep the float copies small
        band = np.asarray(upscaled.crop((0, top, width, min(height, top + 256))), dtype=np.float32)
        sigma = np.sqrt(read_noise**2 + shot_gain * band.mean(axis=2, keepdims=True))
        luma = rng.standard_normal((*band.shape[:2], 1), dtype=np.float32)
        band += sigma * (luma + chroma * rng.standard_normal(band.shape, dtype=np.float32))
        pixels[top:top + band.shape[0]] = np.clip(band + 0.5, 0, 255).astype(np.uint8)
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        Image.fromarray(pixels).save(temp, "JPEG", quality=quality)
        os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)
    return target


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation, as ``numpy.percentile``; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class LoadResult:
    """Throughput and latency of one benchmark cell (one system at one concurrency)."""

    system: str
    concurrency: int
    requests: int
    errors: int
    seconds: float
    throughput: float  # completed requests (images) per second
    p50_ms: float
    p99_ms: float
    mean_ms: float
    note: str = ""
    #: CPU seconds (user + system) of the server's process tree during the window, in ms per completed image
    server_cpu_ms: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(system: str, concurrency: int, latencies_s: Sequence[float], seconds: float, *, errors: int = 0,
              images_per_latency: int = 1, note: str = "") -> LoadResult:
    """Build a ``LoadResult`` from per-request (or per-batch) latencies in seconds over a measured window."""
    done = len(latencies_s) * images_per_latency
    return LoadResult(
        system=system, concurrency=concurrency, requests=done, errors=errors, seconds=round(seconds, 3),
        throughput=done / seconds if seconds > 0 else math.nan,
        p50_ms=percentile(latencies_s, 50) * 1e3, p99_ms=percentile(latencies_s, 99) * 1e3,
        mean_ms=(sum(latencies_s) / len(latencies_s) * 1e3) if latencies_s else math.nan, note=note,
    )


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], *, markdown: bool = False) -> str:
    """A plain-text (or Markdown) table; floats get 1 decimal, numbers are right-aligned."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return "-" if math.isnan(value) else f"{value:,.1f}"
        return str(value)

    body = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(headers)]
    numeric = [all(_is_number(r[i]) for r in body) and bool(body) for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True)]
        return ("| " + " | ".join(parts) + " |") if markdown else "  ".join(parts).rstrip()

    out = [line(list(headers))]
    if markdown:
        out.append("|" + "|".join(("-" * (w + 1) + ":") if num else ("-" * (w + 2))
                                  for w, num in zip(widths, numeric, strict=True)) + "|")
    else:
        out.append("  ".join("-" * w for w in widths))
    out.extend(line(r) for r in body)
    return "\n".join(out)


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", "").rstrip("x%"))
    except ValueError:
        return text == "-"
    return True


def write_json(path: str | Path, data: Mapping[str, Any]) -> None:
    """Write JSON atomically (temp file beside it, then rename)."""
    target = Path(path)
    temp = target.with_name(f".{target.name}.tmp")
    temp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(temp, target)


def machine_info() -> dict[str, Any]:
    """CPU, cores, memory, OS and the versions of the libraries that matter for speed."""
    info: dict[str, Any] = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "os": platform.platform(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["memory_gb"] = round(int(line.split()[1]) / 1024 / 1024, 1)
                break
    except OSError:
        pass
    if hasattr(os, "getloadavg"):
        # Other work on the machine skews every figure; the load average at the end of a run shows it.
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    if hasattr(os, "sched_getaffinity"):
        info["usable_cores"] = len(os.sched_getaffinity(0))
    from importlib import metadata

    for package in ("onnxruntime", "torch", "torchvision", "flask", "waitress", "gunicorn", "numpy",
                    "pillow"):
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return info


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _process_tree(pid: int) -> list[int]:
    """A process and all its descendants (e.g. a WSGI master and its workers), from ``/proc``."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def process_tree_mb(pid: int, field: str = "VmRSS") -> float:
    """A memory figure of ``/proc/PID/status`` (MB) summed over a process and its descendants: ``VmRSS`` is
    the resident memory now, ``VmHWM`` each process's peak."""
    total_kb = 0
    for current in _process_tree(pid):
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith(f"{field}:"):
                    total_kb += int(line.split()[1])
        except OSError:
            continue
    return total_kb / 1024


def process_tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process and its live descendants have used so far (``/proc/PID/stat``)."""
    ticks = 0
    for current in _process_tree(pid):
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


class ServerProcess:
    """A server subprocess on a loopback port; ``stop()`` sends SIGTERM and waits."""

    def __init__(self, cmd: Sequence[str], *, url: str, log_path: Path,
                 env: Mapping[str, str] | None = None, cwd: Path = REPO) -> None:
        self.cmd = list(cmd)
        self.url = url
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - kept open for the process's lifetime
        self.process = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                        env={**os.environ, **(env or {})}, cwd=cwd)

    def wait_until(self, ready: Callable[[], bool], timeout: float = 180) -> None:
        """Poll ``ready`` until it is True; raise with the server log if the process dies or times out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.cmd[:4]} exited with {self.process.returncode}:\n{self.log()}")
            try:
                if ready():
                    return
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"{self.cmd[:4]} not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def rss_mb(self) -> float:
        """Resident memory of the server and its child processes, in MB."""
        return process_tree_mb(self.process.pid)

    def peak_mb(self) -> float:
        """The sum of the peak resident memory of the server and its child processes, in MB."""
        return process_tree_mb(self.process.pid, "VmHWM")

    def stop(self, timeout: float = 60) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


def python() -> str:
    """The interpreter running the benchmark, so subprocesses use the same environment."""
    return sys.executable


def split_env(words: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """A variant's words as (environment, arguments): ``NAME=value`` words with an upper-case name go to the
    environment, the others are arguments."""
    env = dict(word.split("=", 1) for word in words if re.fullmatch(r"[A-Z][A-Z0-9_]*=.*", word))
    return env, [word for word in words if word.split("=", 1)[0] not in env]


def model_or_resnet18(model: Path | None, workdir: Path) -> Path:
    """``model``, or resnet18 with random weights exported into ``workdir``.

    The export runs in a subprocess, so that torch is never loaded into the process that measures."""
    if model is not None:
        return model
    print("Exporting resnet18 (random weights) ...", flush=True)
    path = workdir / "resnet18.onnx"
    export = ["export", "resnet18", "--weights", "none", "--output", str(path)]
    subprocess.run([python(), "-m", "deploykit", *export], check=True, stdout=subprocess.DEVNULL)
    return path
