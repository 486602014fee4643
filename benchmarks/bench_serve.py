"""Serving benchmark: deploykit serve side by side with another revision, the Flask tutorial and the ceiling.

For each image size and concurrency (default: the small photo at 1, 8 and 32 clients) it measures throughput
(images/s) and p50/p99 latency of these systems, in one run:

- ``deploykit serve`` from the working tree, with default settings (plus ``--serve-args``), and one more
  for each ``--variant``;
- with ``--baseline-rev REV``, ``deploykit serve`` at that git revision: a ``git worktree`` of REV in a
  temporary folder, run as ``python -m deploykit serve`` with PYTHONPATH on the worktree and removed at the
  end. ``--baseline-pip`` installs what REV needs that this environment lacks (cd192df needs
  ``gunicorn==27.0.1``) into a cached folder that only the baseline's PYTHONPATH sees;
- ``benchmarks/tutorial_server.py``: the PyTorch "REST API with Flask" tutorial (Flask's development server,
  PyTorch eager, torchvision transforms built per request), with the same resnet18 weights;
- the ceiling: deploykit's decoding and preprocessing (``deploykit.images.load_tensor``: large JPEGs are
  decoded reduced, or in full with ``--exact-decode``) and ONNX Runtime (``deploykit.runtime.Predictor``)
  called in this process, with no HTTP. ``threads``: c threads, each decoding and predicting one image per
  call, on a session with one intra-op thread per core and no spinning; ``threads, 1 ORT thread each``
  (c > 1): the same with one intra-op thread per call; ``batch`` (c > 1): one thread decodes c images and
  predicts them in one call (its latency is that call's); ``ORT defaults`` (c = 1): ONNX Runtime's default
  session (spinning on). The ceiling of a cell is its configuration with the best median throughput.

The servers get the multipart POST of a JPEG (field ``file``, as ``requests.post(url, files=...)``) at
``/predict`` from a closed loop of c keep-alive connections (a raw-socket HTTP/1.1 client, threads over two
processes; ``--client wrk`` uses wrk instead). After the warm-up, the requests that complete inside the
measured window are counted. Image sizes: ``small``, a real photo (matplotlib's grace_hopper.jpg, 512x600,
61 kB); ``phone``, a 4032x3024 JPEG of a few MB made from it (``_common.phone_photo``, cached). The model is
resnet18 with random weights, exported into a temporary folder, unless ``--model``. Everything is on
127.0.0.1.

All servers run at once; every round measures each image size and concurrency for every system before the
next (servers in a rotating order), so a row's systems are measured within a minute or two of each other on
a shared, noisy machine. Each cell reports its median round; each ratio is taken within a round and
reported as the median (range) of the rounds. Resident memory (VmRSS of the server and its child
processes) is read once a server is ready and idle, and again idle after the run, with the peak (VmHWM).

    python benchmarks/bench_serve.py --quick
    python benchmarks/bench_serve.py --baseline-rev cd192df --baseline-pip gunicorn==27.0.1 \\
        --image-size small,phone --repeat 3 --markdown --json serve.json
    python benchmarks/bench_serve.py --skip tutorial --variant "--max-batch-size 8"
    python benchmarks/bench_serve.py --skip tutorial --variant "MALLOC_ARENA_MAX=2 --threads 4"

Leading ``NAME=value`` words of a ``--variant`` go to that server's environment.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import json
import os
import resource
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402 - the scripts folder is not a package
    CACHE,
    REPO,
    LoadResult,
    ServerProcess,
    format_table,
    free_port,
    machine_info,
    model_or_resnet18,
    phone_photo,
    process_tree_cpu_seconds,
    python,
    sample_photo,
    split_env,
    summarize,
    write_json,
)

if TYPE_CHECKING:
    from deploykit.runtime import Predictor

BOUNDARY = "deploykit-bench-7d3f9a"
IMAGE_SIZES = ("small", "phone")
TUTORIAL = "tutorial (Flask dev + PyTorch eager)"


@dataclass(frozen=True)
class BenchImage:
    """One image the benchmark sends: its name in the tables, file, bytes and pixel size."""

    name: str
    path: Path
    data: bytes
    width: int
    height: int

    @classmethod
    def load(cls, name: str, path: Path) -> BenchImage:
        from PIL import Image

        with Image.open(path) as image:
            width, height = image.size
        return cls(name, path, path.read_bytes(), width, height)

    def describe(self) -> str:
        size = len(self.data)
        text = f"{size / 1e6:.2f} MB" if size >= 1e6 else f"{size / 1e3:.0f} kB"
        return f"{self.name} = {self.path.name} ({self.width}x{self.height}, {text})"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "file": str(self.path), "bytes": len(self.data), "width": self.width,
                "height": self.height}


# ---------------------------------------------------------------------------------------------------- ceiling
def open_ceiling_sessions(model: Path) -> dict[str, Predictor]:
    """The in-process sessions: one intra-op thread per core without spinning (as a server that shares its
    cores with request handling would use), one thread without spinning, and ONNX Runtime's defaults."""
    from deploykit.runtime import Predictor, SessionOptions

    return {
        "cores": Predictor.open(model, SessionOptions(allow_spinning=False)),
        "one": Predictor.open(model, SessionOptions(intra_op_threads=1, allow_spinning=False)),
        "defaults": Predictor.open(model, SessionOptions()),
    }


def ceiling_shapes(sessions: Mapping[str, Predictor], c: int) -> list[tuple[str, Predictor, int, int]]:
    """(system, session, threads, images per call) of each ceiling configuration at ``c`` clients; none
    without sessions (``--skip ceiling``)."""
    if not sessions:
        return []
    if c == 1:
        return [("ceiling (threads)", sessions["cores"], 1, 1),
                ("ceiling (ORT defaults)", sessions["defaults"], 1, 1)]
    return [("ceiling (threads)", sessions["cores"], c, 1),
            ("ceiling (threads, 1 ORT thread each)", sessions["one"], c, 1),
            ("ceiling (batch)", sessions["cores"], 1, c)]


def run_ceiling(system: str, predictor: Predictor, data: bytes, concurrency: int, threads: int,
                images: int, *, exact: bool, duration: float, warmup: float) -> LoadResult:
    """Decoding, preprocessing and ONNX Runtime in this process: ``threads`` threads calling back to back,
    each call decoding ``images`` copies of ``data`` and predicting them as one batch."""
    import numpy as np

    from deploykit.images import load_tensor

    pp = predictor.card.preprocess

    def call() -> None:
        predictor.predict(np.stack([load_tensor(data, pp, exact=exact) for _ in range(images)]), 5)

    latencies, seconds = _closed_loop(call, threads, duration=duration, warmup=warmup)
    return summarize(system, concurrency, latencies, seconds, images_per_latency=images,
                     note="in-process, no HTTP")


def _closed_loop(call: Callable[[], None], threads: int, *, duration: float,
                 warmup: float) -> tuple[list[float], float]:
    """Run ``call`` back to back in ``threads`` threads: first for ``warmup`` seconds, then calls that start
    within ``duration`` seconds are timed. Returns their latencies and the measured wall time (until the last
    call ends, so a slow batch is never cut off)."""
    barrier = threading.Barrier(threads + 1)
    latencies: list[list[float]] = [[] for _ in range(threads)]
    bounds: dict[str, float] = {}

    def worker(out: list[float]) -> None:
        barrier.wait()
        while time.perf_counter() < bounds["warm_until"]:
            call()
        barrier.wait()
        barrier.wait()
        while True:
            t0 = time.perf_counter()
            if t0 >= bounds["until"]:
                return
            call()
            out.append(time.perf_counter() - t0)

    pool = [threading.Thread(target=worker, args=(out,)) for out in latencies]
    for t in pool:
        t.start()
    bounds["warm_until"] = time.perf_counter() + warmup
    barrier.wait()  # warm-up starts
    barrier.wait()  # every thread finished its warm-up calls
    started = time.perf_counter()
    bounds["until"] = started + duration
    barrier.wait()  # measuring starts
    for t in pool:
        t.join()
    return [x for out in latencies for x in out], time.perf_counter() - started


# ---------------------------------------------------------------------------------------------- load clients
def multipart_body(data: bytes, filename: str) -> tuple[bytes, str]:
    """The body and Content-Type of ``requests.post(url, files={'file': ...})`` for one JPEG."""
    head = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode()
    return head + data + f"\r\n--{BOUNDARY}--\r\n".encode(), f"multipart/form-data; boundary={BOUNDARY}"


WRK_SCRIPT = """
local f = assert(io.open(os.getenv("BENCH_BODY"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = os.getenv("BENCH_CONTENT_TYPE")
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests": %d, "duration_us": %d, "errors": %d, ' ..
    '"p50_us": %d, "p99_us": %d, "mean_us": %f}\\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50), latency:percentile(99), latency.mean))
end
"""


def wrk_load(url: str, body_path: Path, content_type: str, concurrency: int, *, duration: float,
             warmup: float, system: str) -> LoadResult:
    """Drive ``url`` with wrk (one thread, ``concurrency`` keep-alive connections) after a warm-up run."""
    script = body_path.with_suffix(".lua")
    script.write_text(WRK_SCRIPT)
    env = {"BENCH_BODY": str(body_path), "BENCH_CONTENT_TYPE": content_type, "PATH": "/usr/bin:/bin"}

    def run(seconds: float) -> dict[str, Any]:
        cmd = ["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", "--timeout", "60s",
               "-s", str(script), url]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=seconds + 120, check=True)
        line = next(x for x in out.stdout.splitlines() if x.startswith("BENCH_JSON "))
        return dict(json.loads(line.split(" ", 1)[1]))

    if warmup > 0:
        run(warmup)
    stats = run(duration)
    seconds = stats["duration_us"] / 1e6
    ok = stats["requests"] - stats["errors"]
    return LoadResult(system=system, concurrency=concurrency, requests=ok, errors=stats["errors"],
                      seconds=round(seconds, 3), throughput=ok / seconds, p50_ms=stats["p50_us"] / 1e3,
                      p99_ms=stats["p99_us"] / 1e3, mean_ms=stats["mean_us"] / 1e3, note="wrk")


class RawClient:
    """A minimal HTTP/1.1 keep-alive client for the load generator: the request is encoded once and the
    answer is read by its Content-Length, so the client takes less CPU from the server it shares the cores
    with than http.client (whose header parsing is pure Python)."""

    def __init__(self, host: str, port: int, path: str, body: bytes, content_type: str) -> None:
        self.address = (host, port)
        self.request = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {content_type}\r\n"
                        f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        self.sock: socket.socket | None = None
        self.buffer = b""

    def post(self) -> int:
        """Send the request, read the whole answer; returns the HTTP status."""
        if self.sock is None:
            self.sock = socket.create_connection(self.address, timeout=120)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.buffer = b""
        self.sock.sendall(self.request)
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += self._receive()
        head, _, rest = self.buffer.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        if "content-length" not in fields:
            raise http.client.HTTPException("answer without Content-Length")
        length = int(fields["content-length"])
        while len(rest) < length:
            rest += self._receive()
        self.buffer = rest[length:]
        if fields.get("connection", "").lower() == "close" or lines[0].startswith("HTTP/1.0"):
            self.close()
        return status

    def _receive(self) -> bytes:
        assert self.sock is not None
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise http.client.RemoteDisconnected("the server closed the connection")
        return chunk

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock = None


def _client_process(host: str, port: int, path: str, body: bytes, content_type: str, threads: int,
                    start: float, window: tuple[float, float]) -> tuple[list[float], int, float]:
    """One load-generator process: ``threads`` keep-alive connections posting back to back until the window
    closes. Returns the latencies of requests completed in the window, the failures, and the CPU seconds this
    process used (to show the client is not the bottleneck)."""
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()

    def worker() -> None:
        client = RawClient(host, port, path, body, content_type)
        mine: list[float] = []
        while time.time() < start:
            time.sleep(0.001)
        while True:
            t0 = time.time()
            if t0 >= window[1]:
                break
            try:
                failed = client.post() != 200
            except (OSError, http.client.HTTPException, ValueError, IndexError):
                client.close()
                failed = True
            t1 = time.time()
            # Count what completes inside the window: under steady load that is unbiased at both edges.
            if window[0] <= t1 < window[1]:
                if failed:
                    with lock:
                        errors[0] += 1
                else:
                    mine.append(t1 - t0)
        client.close()
        with lock:
            latencies.extend(mine)

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return latencies, errors[0], usage.ru_utime + usage.ru_stime


def python_load(url: str, body: bytes, content_type: str, concurrency: int, *, duration: float, warmup: float,
                system: str, processes: int = 2, server_pid: int | None = None) -> LoadResult:
    """Closed-loop load from ``processes`` client processes sharing ``concurrency`` connections. With
    ``server_pid``, the result also has the server's CPU time per image over the window."""
    parsed = urlsplit(url)
    procs = max(1, min(processes, concurrency))
    shares = [concurrency // procs + (1 if i < concurrency % procs else 0) for i in range(procs)]
    start = time.time() + 1.0  # lets the processes start before the clock runs
    window = (start + warmup, start + warmup + duration)
    server_cpu: list[float] = []
    with ProcessPoolExecutor(procs) as pool:
        host, port = parsed.hostname or "127.0.0.1", parsed.port or 80
        futures = [pool.submit(_client_process, host, port, parsed.path, body, content_type, n, start, window)
                   for n in shares]
        if server_pid is not None:
            for edge in window:
                time.sleep(max(0.0, edge - time.time()))
                server_cpu.append(process_tree_cpu_seconds(server_pid))
        parts = [f.result() for f in futures]
    latencies = [x for lat, _, _ in parts for x in lat]
    cpu = sum(c for _, _, c in parts) / (window[1] - start)
    result = summarize(system, concurrency, latencies, duration, errors=sum(e for _, e, _ in parts),
                       note=f"python client, {cpu:.0%} of one core")
    if server_cpu and result.requests:
        result = replace(result, server_cpu_ms=(server_cpu[1] - server_cpu[0]) * 1e3 / result.requests)
    return result


# --------------------------------------------------------------------------------------------------- servers
def post_once(url: str, body: bytes, content_type: str) -> tuple[int, Any]:
    """POST ``body`` to ``url``; returns the status and the JSON answer (or its first bytes)."""
    parsed = urlsplit(url)
    conn = http.client.HTTPConnection(parsed.hostname or "127.0.0.1", parsed.port or 80, timeout=120)
    try:
        conn.request("POST", parsed.path, body=body, headers={"Content-Type": content_type})
        response = conn.getresponse()
        text = response.read()
    finally:
        conn.close()
    try:
        return response.status, json.loads(text)
    except ValueError:
        return response.status, text[:200]


def top1(answer: Any) -> str:
    """The top-1 label of a /predict answer: deploykit's ``{"predictions": [{"label": ...}]}`` or the
    tutorial's ``{"class_name": ...}``."""
    if isinstance(answer, dict):
        if "class_name" in answer:
            return str(answer["class_name"])
        predictions = answer.get("predictions")
        if isinstance(predictions, list) and predictions and isinstance(predictions[0], dict):
            return str(predictions[0].get("label"))
    return f"unexpected answer {str(answer)[:80]!r}"


def start_server(name: str, command: Sequence[str], model: Path, workdir: Path, image: BenchImage, *,
                 env: Mapping[str, str] | None = None, cwd: Path = REPO) -> ServerProcess:
    """Start a server command line, with ``{port}`` and ``{model}`` filled in; ready once it answers
    POST /predict of ``image`` with 200."""
    port = free_port()
    cmd = [arg.replace("{port}", str(port)).replace("{model}", str(model)) for arg in command]
    slug = "".join(ch if ch.isalnum() else "-" for ch in name)[:40]
    server = ServerProcess(cmd, url=f"http://127.0.0.1:{port}", log_path=workdir / f"{slug}-{port}.log",
                           env=env, cwd=cwd)
    body, content_type = multipart_body(image.data, image.path.name)
    print(f"Starting {name} ...", flush=True)
    server.wait_until(lambda: post_once(server.url + "/predict", body, content_type)[0] == 200)
    return server


def deploykit_command(extra: Sequence[str]) -> list[str]:
    """``python -m deploykit serve`` on a loopback port: the deploykit it imports depends on the folder it
    runs in and PYTHONPATH."""
    return [python(), "-m", "deploykit", "serve", "{model}", "--host", "127.0.0.1", "--port", "{port}",
            *extra]


# -------------------------------------------------------------------------------------------------- baseline
def git(*args: str, cwd: Path = REPO) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"git {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout.strip()


def working_tree_revision() -> str:
    """HEAD's short hash, with ``+changes`` when deploykit/ has uncommitted changes."""
    head = git("rev-parse", "--short=12", "HEAD")
    return head + ("+changes" if git("status", "--porcelain", "--", "deploykit") else "")


def pip_target(requirements: Sequence[str]) -> Path:
    """A folder (cached under CACHE) with ``requirements`` installed by pip, for the baseline's PYTHONPATH.

    A folder on PYTHONPATH rather than a venv: a venv made by this interpreter with --system-site-packages
    sees the base interpreter's packages, not those of the venv this runs in (onnxruntime, Flask...)."""
    key = hashlib.sha256("\n".join(sorted(requirements)).encode()).hexdigest()[:12]
    target = CACHE / f"pip-{key}"
    if target.is_dir():
        return target
    print(f"Installing {' '.join(requirements)} for the baseline into {target} ...", flush=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".pip-{key}-", dir=CACHE))
    try:
        subprocess.run([python(), "-m", "pip", "install", "--quiet", "--target", str(temp), *requirements],
                       check=True)
        os.replace(temp, target)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return target


@dataclass(frozen=True)
class Baseline:
    """deploykit at another revision: its worktree, and the environment that makes it importable."""

    rev: str
    sha: str
    path: Path
    env: dict[str, str]

    @property
    def system(self) -> str:
        return f"deploykit serve @{self.rev}"


@contextlib.contextmanager
def baseline_worktree(rev: str, requirements: Sequence[str], workdir: Path) -> Any:
    """Check out ``rev`` in a worktree under ``workdir``; yields a ``Baseline``; removes the worktree."""
    found = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"], cwd=REPO,
                           capture_output=True, text=True, check=False)
    if found.returncode != 0:
        raise SystemExit(f"--baseline-rev {rev}: no such commit in {REPO} (see `git log --oneline`).")
    sha = found.stdout.strip()
    path = workdir / f"baseline-{sha[:12]}"
    git("worktree", "add", "--detach", "--quiet", str(path), sha)
    try:
        pythonpath = [str(path), *([str(pip_target(requirements))] if requirements else [])]
        baseline = Baseline(rev, sha, path, {"PYTHONPATH": os.pathsep.join(pythonpath)})
        # The server runs in the worktree: ``python -m`` puts the current folder first on sys.path.
        probe = subprocess.run([python(), "-c", "import deploykit; print(deploykit.__file__)"], cwd=path,
                               env={**os.environ, **baseline.env}, capture_output=True, text=True,
                               check=False)
        if probe.returncode != 0 or not probe.stdout.strip().startswith(str(path)):
            raise SystemExit(f"The baseline does not import deploykit from its worktree {path}: "
                             f"{(probe.stdout + probe.stderr).strip()[-400:]}")
        print(f"Baseline {rev} = {sha[:12]}, deploykit from {probe.stdout.strip()}", flush=True)
        yield baseline
    finally:
        removed = subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=REPO, check=False,
                                 capture_output=True)
        if removed.returncode != 0:  # its folder is already gone: drop git's record of it
            subprocess.run(["git", "worktree", "prune"], cwd=REPO, check=False, capture_output=True)


# ------------------------------------------------------------------------------------------------------ main
def parse_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_sizes(text: str) -> list[str]:
    sizes = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [x for x in sizes if x not in IMAGE_SIZES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown image size {', '.join(unknown)}; choose from "
                                         f"{', '.join(IMAGE_SIZES)}")
    return sizes


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", type=Path, help="ONNX file (default: resnet18, random weights)")
    parser.add_argument("--image-size", type=parse_sizes, default=None, metavar="SIZES",
                        help="comma list of small (a 512x600 photo, 61 kB) and phone (4032x3024 JPEG, a few "
                             "MB) (default: small, or none when --image is given)")
    parser.add_argument("--image", type=Path, action="append", default=[],
                        help="also send this JPEG (repeatable)")
    parser.add_argument("--concurrency", type=parse_ints, default=[1, 8, 32],
                        help="comma list of client counts (default 1,8,32)")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per cell (default 10)")
    parser.add_argument("--warmup", type=float, default=3.0, help="warm-up seconds per cell (default 3)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds over all cells; each cell reports its median round (default 1)")
    parser.add_argument("--quick", action="store_true", help="short run: 3 s per cell after 1 s warm-up")
    parser.add_argument("--baseline-rev", metavar="REV",
                        help="also run deploykit serve at this git revision (a temporary worktree)")
    parser.add_argument("--baseline-pip", action="append", default=[], metavar="REQ",
                        help="a requirement the baseline needs and this environment lacks, installed into a "
                             "cached folder on the baseline's PYTHONPATH only (repeatable; cd192df: "
                             "gunicorn==27.0.1)")
    parser.add_argument("--serve-args", default="",
                        help="extra arguments for every deploykit serve (baseline too), e.g. '--threads 16'")
    parser.add_argument("--variant", action="append", default=[], metavar="ARGS",
                        help="also run a working-tree deploykit serve with these extra arguments (leading "
                             "NAME=value words go to its environment) (repeatable)")
    parser.add_argument("--server", action="append", default=[], metavar="NAME=COMMAND",
                        help="also measure another server that takes the multipart POST /predict; {port} and "
                             "{model} in COMMAND are filled in (repeatable)")
    parser.add_argument("--exact-decode", action="store_true",
                        help="the ceiling decodes every image in full (load_tensor(exact=True)) instead of "
                             "reducing large JPEGs while decoding, to compare with a server that does")
    parser.add_argument("--skip", default="",
                        help="comma list of systems to skip: ceiling, serve (the working tree), tutorial")
    parser.add_argument("--client", choices=("python", "wrk"), default="python",
                        help="load generator (python: steady-state window, default; wrk: from a cold start)")
    parser.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    parser.add_argument("--json", type=Path, help="write the results and machine details to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.warmup = 3.0, 1.0
    if args.image_size is None:
        args.image_size = [] if args.image else ["small"]
    if not args.image_size and not args.image:
        parser.error("no image: give --image-size or --image")
    if args.repeat < 1 or args.duration <= 0 or args.warmup < 0 or not args.concurrency \
            or min(args.concurrency) < 1:
        parser.error("--repeat and --concurrency must be at least 1, --duration positive, --warmup >= 0")
    for path in args.image:
        if not path.is_file():
            parser.error(f"--image {path}: no such file")
    if args.model is not None and not args.model.is_file():
        parser.error(f"--model {args.model}: no such file")
    if args.client == "wrk" and not shutil.which("wrk"):
        parser.error("wrk is not installed (apt-get install wrk); use --client python")
    for spec in args.server:
        if not spec.partition("=")[2]:
            parser.error(f"--server needs NAME=COMMAND, got {spec!r}")
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if args.skip - {"ceiling", "serve", "tutorial"}:
        parser.error(f"--skip: unknown {', '.join(sorted(args.skip - {'ceiling', 'serve', 'tutorial'}))}; "
                     "choose from ceiling, serve, tutorial")
    return args


def bench_images(args: argparse.Namespace) -> list[BenchImage]:
    images = []
    for size in args.image_size:
        if size == "phone":
            print("Generating (or reusing) the phone-size photo ...", flush=True)
        images.append(BenchImage.load(size, sample_photo() if size == "small" else phone_photo()))
    images += [BenchImage.load(path.name, path) for path in args.image]
    return images


def schema_1_copy(model: Path, workdir: Path) -> Path:
    """The model with its card in schema 1 (a square ``crop``, no ``channels``), for a baseline older than
    schema 2; the graph is the same."""
    import onnx

    from deploykit.card import CARD_KEY

    proto = onnx.load(str(model))
    for prop in proto.metadata_props:
        if prop.key == CARD_KEY:
            card = json.loads(prop.value)
            pp = card["preprocess"]
            if pp.pop("height") != pp.pop("width") or pp.pop("channels") != 3:
                raise SystemExit("a schema 1 card describes square RGB inputs only")
            pp["crop"] = card["inputs"][0]["shape"][-1]
            card["schema_version"] = 1
            prop.value = json.dumps(card)
    copy = workdir / f"{model.stem}.schema1.onnx"
    onnx.save(proto, str(copy))
    return copy


def start_servers(args: argparse.Namespace, model: Path, workdir: Path, image: BenchImage,
                  baseline: Baseline | None,
                  servers: dict[str, ServerProcess]) -> dict[str, dict[str, float]]:
    """Start every server of the run into ``servers``; returns each one's resident memory once ready."""
    extra = shlex.split(args.serve_args)
    if "serve" not in args.skip:
        for words in [[], *(shlex.split(v) for v in args.variant)]:
            env, more = split_env(words)
            system = " ".join(["deploykit serve", *extra, *words])
            servers[system] = start_server(system, deploykit_command([*extra, *more]), model, workdir, image,
                                           env=env)
    if baseline is not None:
        system = " ".join([baseline.system, *extra])
        try:
            servers[system] = start_server(system, deploykit_command(extra), schema_1_copy(model, workdir),
                                           workdir, image, env=baseline.env, cwd=baseline.path)
        except RuntimeError as exc:
            raise SystemExit(f"{exc}\nIf the baseline lacks a package, give it with --baseline-pip "
                             "(cd192df: --baseline-pip gunicorn==27.0.1).") from exc
    for spec in args.server:
        system, _, command = spec.partition("=")
        servers[system] = start_server(system, shlex.split(command), model, workdir, image)
    if "tutorial" not in args.skip:
        script = Path(__file__).resolve().parent / "tutorial_server.py"
        command = [python(), str(script), "--port", "{port}"]
        servers[TUTORIAL] = start_server(TUTORIAL, command, model, workdir, image)
    # every server is up and idle now: its models are loaded and it has answered one request
    return {system: {"ready": round(server.rss_mb(), 1)} for system, server in servers.items()}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    load_before = [round(x, 2) for x in os.getloadavg()]
    images = bench_images(args)
    bodies = {image.name: multipart_body(image.data, image.path.name) for image in images}
    revisions = {"working tree": working_tree_revision()}
    answers: dict[str, dict[str, str]] = {image.name: {} for image in images}
    cells: dict[tuple[str, str, int], list[LoadResult]] = {}
    baseline_system = None

    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="deploykit-bench-")))
        model = model_or_resnet18(args.model, workdir)
        print(f"Model {model}; client {args.client}; {args.duration:g} s per cell after {args.warmup:g} s "
              f"warm-up; {args.repeat} round(s)", flush=True)
        print("Images: " + "; ".join(image.describe() for image in images), flush=True)
        baseline = None
        if args.baseline_rev:
            baseline = stack.enter_context(baseline_worktree(args.baseline_rev, args.baseline_pip, workdir))
            baseline_system = " ".join([baseline.system, *shlex.split(args.serve_args)])
            revisions["baseline"] = f"{baseline.rev} = {baseline.sha[:12]}"
        servers: dict[str, ServerProcess] = {}

        @stack.callback  # before the worktree and the temporary folder go
        def stop_servers() -> None:
            for server in servers.values():
                server.stop()

        # Every server first, then the cells, so that the systems of one row are measured close together.
        memory = start_servers(args, model, workdir, images[0], baseline, servers)
        sessions: dict[str, Predictor] = {}
        if "ceiling" not in args.skip:
            from deploykit.images import load_tensor

            sessions = open_ceiling_sessions(model)
            for image in images:
                predictor = sessions["cores"]
                tensor = load_tensor(image.data, predictor.card.preprocess, exact=args.exact_decode)
                best = predictor.predict(tensor[None], 1)[0][0]
                answers[image.name]["ceiling"] = best.label
        for image in images:
            for system, server in servers.items():
                answers[image.name][system] = top1(post_once(server.url + "/predict", *bodies[image.name])[1])

        def load(system: str, server: ServerProcess, image: BenchImage, c: int) -> LoadResult:
            body, content_type = bodies[image.name]
            if args.client == "wrk":
                body_path = workdir / f"body-{image.name}.bin"
                body_path.write_bytes(body)
                return wrk_load(server.url + "/predict", body_path, content_type, c, duration=args.duration,
                                warmup=args.warmup, system=system)
            return python_load(server.url + "/predict", body, content_type, c, duration=args.duration,
                               warmup=args.warmup, system=system, server_pid=server.process.pid)

        turn = 0
        for round_ in range(args.repeat):
            if args.repeat > 1:
                print(f"Round {round_ + 1} of {args.repeat}", flush=True)
            for image in images:
                for c in args.concurrency:
                    measured = [run_ceiling(system, session, image.data, c, threads, per_call,
                                            exact=args.exact_decode, duration=args.duration,
                                            warmup=args.warmup)
                                for system, session, threads, per_call in ceiling_shapes(sessions, c)]
                    # each cell starts with another server, so that none is always measured first
                    order = list(servers.items())
                    order = order[turn % len(order):] + order[:turn % len(order)] if order else []
                    turn += 1
                    measured += [load(system, server, image, c) for system, server in order]
                    for r in measured:
                        cpu = "" if r.server_cpu_ms is None else f"  server CPU {r.server_cpu_ms:5.1f} ms/img"
                        print(f"  {image.name:<6} {r.system:<38} c={c:<3} {r.throughput:7.1f} img/s  "
                              f"p50 {r.p50_ms:8.1f} ms  p99 {r.p99_ms:8.1f} ms  errors {r.errors}{cpu}",
                              flush=True)
                        cells.setdefault((r.system, image.name, c), []).append(r)
        short = {(image, c) for (_, image, c), runs in cells.items() if any(r.requests < c for r in runs)}
        if short:
            names = [f"{image.name} c={c}" for image in images for c in args.concurrency
                     if (image.name, c) in short]
            print(f"Warning: fewer requests than clients completed in the window of {', '.join(names)}: "
                  "the window is shorter than a request; give a longer --duration.", flush=True)
        time.sleep(2.0)  # idle before reading the memory after the run
        for system, server in servers.items():
            memory[system].update(after_run=round(server.rss_mb(), 1), peak=round(server.peak_mb(), 1))

    info = machine_info()
    info["load_average_before"] = load_before
    print("\nMachine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    print("Revisions: " + ", ".join(f"{k} {v}" for k, v in revisions.items()))
    print("Images: " + "; ".join(image.describe() for image in images))
    # Same weights and preprocessing: the labels agree, except where a server decodes a large image reduced
    # and another in full (random weights make the top-1 of a photo fragile).
    print("Top-1 label per image and system: " + json.dumps(answers) + "\n")
    rank = {image.name: i for i, image in enumerate(images)}
    # With several rounds, each cell reports its round of median throughput.
    results = sorted(((image, sorted(runs, key=lambda r: r.throughput)[len(runs) // 2])
                      for (_, image, _), runs in cells.items()),
                     key=lambda pair: (rank[pair[0]], pair[1].concurrency, _order(pair[1].system)))
    rows = [[r.system, image, r.concurrency, r.throughput, r.p50_ms, r.p99_ms,
             "-" if r.server_cpu_ms is None else r.server_cpu_ms, r.errors] for image, r in results]
    print(format_table(["system", "image", "clients", "img/s", "p50 ms", "p99 ms", "server CPU ms/img",
                        "errors"], rows, markdown=args.markdown))
    ratios = sorted(ratio_rows(cells, baseline_system),
                    key=lambda row: (rank[row[1]], row[2], _order(row[0])))
    if ratios:
        print()
        print(format_table(["served system", "image", "clients", "median img/s", "/ ceiling", "/ tutorial",
                            "/ baseline"], ratios, markdown=args.markdown))
    if memory:
        print()
        nan = float("nan")
        print(format_table(["server", "MB ready (idle)", "MB after the run (idle)", "MB peak"],
                           [[system, m["ready"], m.get("after_run", nan), m.get("peak", nan)]
                            for system, m in memory.items()], markdown=args.markdown))
    if args.json:
        write_json(args.json, {
            "machine": info, "settings": {k: str(v) for k, v in vars(args).items()}, "revisions": revisions,
            "images": [image.to_dict() for image in images], "answers": answers, "memory_mb": memory,
            "results": [{**r.to_dict(), "image": image} for image, r in results],
            "rounds": [[{**r.to_dict(), "image": image} for r in runs]
                       for (_, image, _), runs in cells.items()],
            "ratios": [dict(zip(("system", "image", "concurrency", "median_throughput", "vs_ceiling",
                                 "vs_tutorial", "vs_baseline"), row, strict=True)) for row in ratios],
        })
    return 0


def ratio_rows(cells: Mapping[tuple[str, str, int], Sequence[LoadResult]],
               baseline: str | None) -> list[list[Any]]:
    """Per served system, image and concurrency: its median throughput and its throughput over the ceiling,
    the tutorial server and the baseline revision.

    The reference of a cell is the ceiling configuration (or tutorial, or baseline) with the highest median
    throughput over the rounds. Each round's ratio compares the served cell with the reference's cell of the
    same round (measured close in time); the row gives the median of the rounds' ratios and their range, so
    that drift on a shared machine shows instead of hiding in a mean.
    """
    rows = []
    for (system, image, concurrency), runs in cells.items():
        if system.startswith("ceiling") or system == TUTORIAL:
            continue
        row: list[Any] = [system, image, concurrency, statistics.median(r.throughput for r in runs)]
        same_cell = {s: rs for (s, i, c), rs in cells.items() if i == image and c == concurrency}
        for references in ([rs for s, rs in same_cell.items() if s.startswith("ceiling")],
                           [rs for s, rs in same_cell.items() if s == TUTORIAL],
                           [rs for s, rs in same_cell.items() if s == baseline and s != system]):
            ratios = []
            if references:
                best = max(references, key=lambda rs: statistics.median(r.throughput for r in rs))
                ratios = [served.throughput / base.throughput
                          for served, base in zip(runs, best, strict=False) if base.throughput > 0]
            row.append(_ratio_range(ratios))
        rows.append(row)
    return rows


def _ratio_range(ratios: Sequence[float]) -> str:
    if not ratios:
        return "-"
    text = f"{statistics.median(ratios):.2f}x"
    return text if len(ratios) == 1 else f"{text} ({min(ratios):.2f}-{max(ratios):.2f})"


def _order(system: str) -> int:
    """Table order: the ceiling, deploykit serve, the baseline, other servers (--server), the tutorial."""
    if system.startswith("ceiling"):
        return 0
    if system.startswith("deploykit serve @"):
        return 2
    if system.startswith("deploykit"):
        return 1
    if system == TUTORIAL:
        return 4
    return 3


if __name__ == "__main__":
    raise SystemExit(main())
