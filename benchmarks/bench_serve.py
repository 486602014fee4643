"""Serving load benchmark: deploykit serve vs the in-process ceiling vs the classic Flask tutorial server.

For each concurrency (default 1, 8, 32) it measures throughput (images/s) and p50/p99 latency, in one run, of:

(a) the ceiling: deploykit's own preprocessing (``deploykit.images``) and ONNX Runtime ``Predictor`` called
    in a tight loop in this process, with no HTTP, with the server's session settings (one intra-op thread
    per core, no spinning; at concurrency 1 also ONNX Runtime's defaults). The best of these is the ceiling:
    ``threads`` - c threads each decode, preprocess and predict one image per call (what c clients ask);
    ``batch``   - one thread decodes c images and predicts them as one batch of c (perfect batching);
    its latency is the time of one batch call;
    ``threads, N ORT thread(s) each`` - as ``threads``, on the session with the share of the cores that the
    server gives calls that run side by side (one thread per call on 2 cores).
(b) ``deploykit serve`` in a subprocess with default settings (and ``--workers N`` for each N of --workers),
(c) ``benchmarks/tutorial_server.py``: Flask's development server, PyTorch eager, torchvision transforms.

(b) and (c) receive the same multipart POST of a real JPEG photo (field ``file``) to ``/predict`` from a load
generator in separate processes: a closed loop of c keep-alive connections (a minimal raw-socket HTTP/1.1
client, threads spread over two processes) that posts back to back; after the warm-up, the requests completing
inside the measured window are counted, so the figures are steady-state. The client's own CPU use is printed
(about 1% of a core at these rates, so it is not the bottleneck). ``--client wrk`` uses wrk instead (Debian
package ``wrk``; its counts include the ramp from a cold start). Everything binds to 127.0.0.1. The model is
resnet18 with random weights, exported into a temporary folder, unless ``--model`` is given.

    python benchmarks/bench_serve.py                    # full run (about 4 minutes on 2 cores)
    python benchmarks/bench_serve.py --quick --json out.json
    python benchmarks/bench_serve.py --workers 1,2 --serve-args "--threads 16"
    python benchmarks/bench_serve.py --skip tutorial --variant "--max-batch-size 8"
    python benchmarks/bench_serve.py --skip tutorial --variant "MALLOC_ARENA_MAX=2 --threads 4"

Each ``--variant`` is one more deploykit serve, measured in the same rounds as the default one; leading
``NAME=value`` words are set in its environment.
"""

from __future__ import annotations

import argparse
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
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402 - the scripts folder is not a package
    LoadResult,
    ServerProcess,
    format_table,
    free_port,
    machine_info,
    model_or_resnet18,
    python,
    sample_photo,
    split_env,
    summarize,
    write_json,
)

if TYPE_CHECKING:
    from deploykit.runtime import Predictor

BOUNDARY = "deploykit-bench-7d3f9a"


# ---------------------------------------------------------------------------------------------------- ceiling
def run_ceiling(predictor: Predictor, data: bytes, concurrency: int, *, duration: float, warmup: float,
                mode: str) -> LoadResult:
    """Preprocessing + ONNX Runtime in this process, as c threads of single images or batches of c."""
    from deploykit.images import decode_image, preprocess_batch

    pp = predictor.card.preprocess
    images = concurrency if mode == "batch" else 1
    threads = 1 if mode == "batch" else concurrency

    def call() -> None:
        batch = preprocess_batch([decode_image(data) for _ in range(images)], pp)
        predictor.predict(batch, 5)

    latencies, seconds = _closed_loop(call, threads, duration=duration, warmup=warmup)
    return summarize(f"ceiling ({mode})", concurrency, latencies, seconds, images_per_latency=images,
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
    answer is read by its Content-Length, so the client adds about 0.1 ms less per request than http.client
    (whose header parsing is pure Python) and takes less CPU from the server it shares the cores with."""

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
                system: str, processes: int = 2) -> LoadResult:
    """Closed-loop load from ``processes`` client processes sharing ``concurrency`` connections."""
    parsed = urlsplit(url)
    procs = max(1, min(processes, concurrency))
    shares = [concurrency // procs + (1 if i < concurrency % procs else 0) for i in range(procs)]
    start = time.time() + 1.0  # lets the processes start before the clock runs
    window = (start + warmup, start + warmup + duration)
    with ProcessPoolExecutor(procs) as pool:
        host, port = parsed.hostname or "127.0.0.1", parsed.port or 80
        futures = [pool.submit(_client_process, host, port, parsed.path, body, content_type, n, start, window)
                   for n in shares]
        parts = [f.result() for f in futures]
    latencies = [x for lat, _, _ in parts for x in lat]
    cpu = sum(c for _, _, c in parts) / (window[1] - start)
    return summarize(system, concurrency, latencies, duration, errors=sum(e for _, e, _ in parts),
                     note=f"python client, {cpu:.0%} of one core")


# --------------------------------------------------------------------------------------------------- servers
def post_once(url: str, body: bytes, content_type: str) -> tuple[int, Any]:
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


def http_ok(url: str) -> bool:
    parsed = urlsplit(url)
    conn = http.client.HTTPConnection(parsed.hostname or "127.0.0.1", parsed.port or 80, timeout=2)
    try:
        conn.request("GET", parsed.path)
        return conn.getresponse().status == 200
    finally:
        conn.close()


def start_deploykit(model: Path, workdir: Path, extra: Sequence[str], body: bytes,
                    content_type: str) -> ServerProcess:
    port = free_port()
    env, extra = split_env(extra)
    cmd = [python(), "-m", "deploykit", "serve", str(model), "--host", "127.0.0.1", "--port", str(port),
           *extra]
    server = ServerProcess(cmd, url=f"http://127.0.0.1:{port}", log_path=workdir / f"serve-{port}.log",
                           env=env)
    server.wait_until(lambda: http_ok(server.url + "/v2/health/ready"))
    # With several workers, "ready" may come from the first one up; each fresh connection can land on any
    # worker, so also wait until a run of predictions succeeds.
    server.wait_until(lambda: all(post_once(server.url + "/predict", body, content_type)[0] == 200
                                  for _ in range(8)))
    return server


def start_command(command: Sequence[str], model: Path, workdir: Path, body: bytes, content_type: str, *,
                  log_name: str = "server") -> ServerProcess:
    """Any server command line, with ``{port}`` and ``{model}`` filled in; ready once it answers
    POST /predict with 200."""
    port = free_port()
    cmd = [arg.replace("{port}", str(port)).replace("{model}", str(model)) for arg in command]
    server = ServerProcess(cmd, url=f"http://127.0.0.1:{port}", log_path=workdir / f"{log_name}-{port}.log")
    server.wait_until(lambda: post_once(server.url + "/predict", body, content_type)[0] == 200)
    return server


def start_tutorial(model: Path, workdir: Path, body: bytes, content_type: str) -> ServerProcess:
    cmd = [python(), str(Path(__file__).resolve().parent / "tutorial_server.py"), "--port", "{port}"]
    return start_command(cmd, model, workdir, body, content_type, log_name="tutorial")


# ------------------------------------------------------------------------------------------------------ main
def parse_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", type=Path, help="ONNX file (default: resnet18, random weights)")
    parser.add_argument("--image", type=Path, help="JPEG to send (default: matplotlib's grace_hopper.jpg)")
    parser.add_argument("--concurrency", type=parse_ints, default=[1, 8, 32],
                        help="comma list (default 1,8,32)")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per cell (default 10)")
    parser.add_argument("--warmup", type=float, default=3.0, help="warm-up seconds per cell (default 3)")
    parser.add_argument("--workers", type=parse_ints, default=[],
                        help="also/only run deploykit serve with --workers N for each N (comma list)")
    parser.add_argument("--serve-args", default="",
                        help="extra arguments for deploykit serve, e.g. '--threads 16'")
    parser.add_argument("--variant", action="append", default=[], metavar="ARGS",
                        help="also run a deploykit serve with these extra arguments (leading NAME=value "
                             "words go to its environment), side by side (repeatable)")
    parser.add_argument("--server", action="append", default=[], metavar="NAME=COMMAND",
                        help="also measure another server that takes the multipart POST /predict; {port} and "
                             "{model} in COMMAND are filled in (repeatable)")
    parser.add_argument("--client", choices=("python", "wrk"), default="python",
                        help="load generator (python: steady-state window, default; wrk: from a cold start)")
    parser.add_argument("--skip", default="", help="comma list of systems to skip: ceiling, serve, tutorial")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds over all cells; each cell reports its median round (default 1)")
    parser.add_argument("--quick", action="store_true", help="short run: 3 s per cell, 1 s warm-up")
    parser.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    parser.add_argument("--json", type=Path, help="write the results and machine details to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.warmup = 3.0, 1.0
    if args.client == "wrk" and not shutil.which("wrk"):
        parser.error("wrk is not installed (apt-get install wrk); use --client python")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    load_before = [round(x, 2) for x in os.getloadavg()]
    photo = args.image or sample_photo()
    data = photo.read_bytes()
    body, content_type = multipart_body(data, photo.name)
    memory: dict[str, float] = {}
    answers: dict[str, Any] = {}

    def load(url: str, c: int, system: str, workdir: Path) -> LoadResult:
        if args.client == "wrk":
            body_path = workdir / "body.bin"
            body_path.write_bytes(body)
            return wrk_load(url, body_path, content_type, c, duration=args.duration, warmup=args.warmup,
                            system=system)
        return python_load(url, body, content_type, c, duration=args.duration, warmup=args.warmup,
                           system=system)

    def report(result: LoadResult) -> None:
        print(f"  {result.system:<34} c={result.concurrency:<3} {result.throughput:7.1f} img/s  "
              f"p50 {result.p50_ms:7.1f} ms  p99 {result.p99_ms:7.1f} ms  errors {result.errors}", flush=True)

    with tempfile.TemporaryDirectory(prefix="deploykit-bench-") as tmp:
        workdir = Path(tmp)
        model = model_or_resnet18(args.model, workdir)
        print(f"Model {model}, image {photo.name} ({len(data):,} bytes), client {args.client}, "
              f"{args.duration:g} s per cell after {args.warmup:g} s warm-up", flush=True)

        # Start every server first and measure concurrency by concurrency, so that the systems compared in
        # one row are measured minutes apart at most (other work on the machine drifts over a run).
        servers: dict[str, ServerProcess] = {}
        try:
            if "serve" not in skip:
                extra = shlex.split(args.serve_args)
                runs = [["--workers", str(n), *extra] for n in args.workers] if args.workers else [extra]
                runs += [[*extra, *shlex.split(variant)] for variant in args.variant]
                for run in runs:
                    system = " ".join(["deploykit serve", *run])
                    servers[system] = start_deploykit(model, workdir, run, body, content_type)
                    answers[system] = post_once(servers[system].url + "/predict", body,
                                                content_type)[1]["predictions"][0]["label"]
            for spec in args.server:
                system, _, command = spec.partition("=")
                if not command:
                    raise SystemExit(f"--server needs NAME=COMMAND, got {spec!r}")
                servers[system] = start_command(shlex.split(command), model, workdir, body, content_type)
            if "tutorial" not in skip:
                system = "tutorial (Flask dev + PyTorch eager)"
                servers[system] = start_tutorial(model, workdir, body, content_type)
                answers[system] = post_once(servers[system].url + "/predict", body,
                                            content_type)[1]["class_name"]
            memory.update({system: round(server.rss_mb(), 1) for system, server in servers.items()})

            ceilings: dict[bool, list[tuple[Predictor, str]]] = {}
            if "ceiling" not in skip:
                from deploykit.images import decode_image
                from deploykit.runtime import Predictor, SessionOptions
                from deploykit.serve.config import ModelSpec, ServeConfig
                from deploykit.serve.registry import inference_plan, open_predictors

                # The server's own sessions (no spinning): one with every core, and, where the server's
                # default plan has one, the session with a share of the cores that its concurrent calls use.
                # ONNX Runtime's defaults (spinning on) for comparison at concurrency 1.
                config = ServeConfig(models=(ModelSpec("m", model),))
                plan = inference_plan(config)
                shared, solo = open_predictors(model, config, plan)
                predictor = solo or shared
                ceilings[False] = [(predictor, "threads"), (Predictor.open(model, SessionOptions()),
                                                            "threads, ORT defaults")]
                ceilings[True] = [(predictor, "threads"), (predictor, "batch")]
                if solo is not None:
                    ceilings[True].append((shared, f"threads, {plan.threads} ORT thread(s) each"))
                answers["ceiling"] = predictor.predict_images([decode_image(data)], 1)[0][0].label

            cells: dict[tuple[str, int], list[LoadResult]] = {}
            for round_ in range(args.repeat):
                if args.repeat > 1:
                    print(f"Round {round_ + 1} of {args.repeat}", flush=True)
                for c in args.concurrency:
                    measured = []
                    for session, mode in ceilings.get(c > 1, []):
                        measured.append(run_ceiling(session, data, c, duration=args.duration,
                                                    warmup=args.warmup, mode=mode))
                    # each round starts with another server, so that no system is always measured first
                    order = list(servers.items())
                    shift = round_ % len(order) if order else 0
                    for system, server in order[shift:] + order[:shift]:
                        measured.append(load(server.url + "/predict", c, system, workdir))
                    for result in measured:
                        report(result)
                        cells.setdefault((result.system, result.concurrency), []).append(result)
            memory.update({f"{system} (after load)": round(server.rss_mb(), 1)
                           for system, server in servers.items()})
        finally:
            for server in servers.values():
                server.stop()
        # With several rounds, each cell reports its round of median throughput.
        results = [sorted(runs, key=lambda r: r.throughput)[len(runs) // 2] for runs in cells.values()]
        results.sort(key=lambda r: (r.concurrency, _order(r.system)))

    info = machine_info()
    info["load_average_before"] = load_before
    print("\nMachine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    print("Top-1 label per system (must agree): " + json.dumps(answers))
    print("Resident memory (MB, process tree): " + json.dumps(memory) + "\n")
    rows = [[r.system, r.concurrency, r.throughput, r.p50_ms, r.p99_ms, r.errors] for r in results]
    print(format_table(["system", "concurrency", "img/s", "p50 ms", "p99 ms", "errors"], rows,
                       markdown=args.markdown))
    ratios = ratio_rows(cells)
    if ratios:
        print()
        headers = ["served system", "concurrency", "median img/s", "/ ceiling", "/ max ceiling cell",
                   "/ tutorial"]
        print(format_table(headers, ratios, markdown=args.markdown))
    if args.json:
        write_json(args.json, {"machine": info, "settings": {k: str(v) for k, v in vars(args).items()},
                               "image": photo.name, "answers": answers, "memory_mb": memory,
                               "results": [r.to_dict() for r in results],
                               "rounds": [[r.to_dict() for r in runs] for runs in cells.values()],
                               "ratios": [dict(zip(("system", "concurrency", "median_throughput",
                                                    "vs_ceiling", "vs_max_ceiling_cell", "vs_tutorial"), row,
                                                   strict=True))
                                          for row in ratios]})
    return 0


def ratio_rows(cells: Mapping[tuple[str, int], Sequence[LoadResult]]) -> list[list[Any]]:
    """Per served system and concurrency: throughput over the ceiling and over the tutorial server.

    The reference of a concurrency is its best configuration: the ceiling (or tutorial) system with the
    highest median throughput over the rounds. Each round's ratio compares the served cell with that
    system's cell of the same round (measured within a minute of it); the row gives the median of the rounds'
    ratios and their range, so that drift on a shared machine shows instead of hiding in a mean. The column
    "/ max ceiling cell" divides by the best ceiling cell of each round instead: the maximum of several noisy
    cells of near-equal configurations is biased upwards, so it is a stricter, pessimistic figure.
    """
    rows = []
    for (system, concurrency), runs in cells.items():
        if system.startswith(("ceiling", "tutorial")):
            continue
        row: list[Any] = [system, concurrency, statistics.median(r.throughput for r in runs)]
        for prefix, per_round_max in (("ceiling", False), ("ceiling", True), ("tutorial", False)):
            references = [rs for (s, c), rs in cells.items() if c == concurrency and s.startswith(prefix)]
            ratios = []
            if references:
                best = max(references, key=lambda rs: statistics.median(r.throughput for r in rs))
                for round_, served in enumerate(runs):
                    if per_round_max:
                        base = max((rs[round_].throughput for rs in references if len(rs) > round_),
                                   default=0.0)
                    else:
                        base = best[round_].throughput if len(best) > round_ else 0.0
                    if base > 0:
                        ratios.append(served.throughput / base)
            row.append(_ratio_range(ratios))
        rows.append(row)
    return rows


def _ratio_range(ratios: Sequence[float]) -> str:
    if not ratios:
        return "-"
    text = f"{statistics.median(ratios):.2f}x"
    return text if len(ratios) == 1 else f"{text} ({min(ratios):.2f}-{max(ratios):.2f})"


def _order(system: str) -> int:
    """Table order: the ceiling, deploykit serve, other servers (--server), the tutorial."""
    if system.startswith("ceiling"):
        return 0
    if system.startswith("deploykit"):
        return 1
    if system.startswith("tutorial"):
        return 3
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
