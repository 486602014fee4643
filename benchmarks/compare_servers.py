"""Side-by-side comparison of WSGI servers for ``deploykit serve`` (docs/decisions/0001-wsgi-server.md).

Every candidate serves the same ``create_app(ServeConfig(...))`` app (one model, one worker process, 8 handler
threads; through asgiref's WSGI adapter, one shared thread or one per request) on a free loopback port. All
of them run at once, so that the load tests can interleave them:

- throughput and p50/p99 latency of ``POST /predict`` (one JPEG as multipart) at 1, 8 and 32 keep-alive
  clients, with wrk: a warm-up per server, then two halves of the measured time in opposite server orders;
- resident memory of each server's process tree (VmRSS summed), idle after loading and after the load tests;
- then one server at a time, three attacks: 200 connections with an unfinished request head; 200 with a full
  head and then a body trickled one byte a second; 16 that pipeline 256 ``GET /models`` (5 MB of answers)
  and never read. During each, a normal client's ``GET /v2/health/ready`` and ``POST /predict`` (given up
  after 15 s);
- SIGTERM with 8 requests in flight (8 images each, so that they are still running): how many answer 200,
  whether a new connection is refused during the drain, and the exit code and time.

The app is imported from the Python environment given by ``--python``, never from this working tree: install
a frozen copy of deploykit there, for example::

    git worktree add /tmp/dk-base <commit>
    python3 -m venv /tmp/venv-cmp
    /tmp/venv-cmp/bin/pip install -e /tmp/dk-base waitress granian asgiref gunicorn==27.0.1
    python -m deploykit export resnet18 --weights none --output /tmp/cmp/resnet18.onnx
    apt-get install wrk
    python3 benchmarks/compare_servers.py --python /tmp/venv-cmp/bin/python \\
        --model /tmp/cmp/resnet18.onnx --image photo.jpg

The driver needs only the standard library and wrk; it takes 8-10 minutes on 2 cores. It prints two markdown tables
(``--json`` also writes the raw results); ratios in parentheses are to waitress in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
THREADS = 8
GRACEFUL_TIMEOUT = 30
PROBE_TIMEOUT = 15.0
ATTACK_CONNECTIONS = 200
# A loopback socket's send buffer grows to 4 MB (tcp_wmem), so a reader that stalls backs up a server's
# writes only past that: 256 answers of about 20 kB on each connection. 16 connections outnumber 8 threads.
SLOW_READERS = 16
PIPELINED = 256
BOUNDARY = "dkcmpBoundary7MA4YWxkTrZu0gW"

APP_MODULE = """\
import os
from pathlib import Path

from deploykit.serve.app import create_app
from deploykit.serve.config import ModelSpec, ServeConfig

application = create_app(ServeConfig(models=(ModelSpec("resnet18", Path(os.environ["DK_CMP_MODEL"])),)))
"""

ASGI_MODULE = """\
from asgiref.wsgi import WsgiToAsgi

from cmp_app import application as wsgi_application

application = WsgiToAsgi(wsgi_application)
"""

# asgiref runs every thread-sensitive call (WsgiToAsgi's default) on one shared thread; a
# ThreadSensitiveContext per request, as Django's ASGI handler opens, gives each request a thread of its own.
ASGI_THREAD_PER_REQUEST_MODULE = """\
from asgiref.sync import ThreadSensitiveContext
from asgiref.wsgi import WsgiToAsgi

from cmp_app import application as wsgi_application

adapter = WsgiToAsgi(wsgi_application)


async def application(scope, receive, send):
    async with ThreadSensitiveContext():
        await adapter(scope, receive, send)
"""

WAITRESS_MODULE = f"""\
import sys

from waitress import create_server

from cmp_app import application

server = create_server(
    application, host="{HOST}", port=int(sys.argv[1]), threads={THREADS},
    connection_limit=2000, channel_timeout=10, cleanup_interval=2,
)
server.run()
"""

WRK_SCRIPT = """\
local f = assert(io.open(os.getenv("DK_CMP_BODY"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = os.getenv("DK_CMP_CTYPE")

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_RESULT {"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, ' ..
    '"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect, e.read, e.write, e.status, e.timeout))
end
"""


@dataclass(frozen=True)
class Candidate:
    """A server to measure: its name in the tables and the command that serves the app on a port."""

    name: str
    command: Callable[[Path, int], list[str]]  # (model, port) -> argv, run in a folder holding the modules


def candidates(python: Path) -> list[Candidate]:
    bin_dir = python.parent
    granian = [str(bin_dir / "granian"), "--host", HOST, "--workers", "1", "--workers-kill-timeout", "30"]
    return [
        Candidate("waitress", lambda _model, port: [str(python), "run_waitress.py", str(port)]),
        Candidate(
            "granian wsgi",
            lambda _model, port: [
                *granian,
                "--port",
                str(port),
                "--interface",
                "wsgi",
                "--blocking-threads",
                str(THREADS),
                "cmp_app:application",
            ],
        ),
        Candidate(
            "granian asgi + WsgiToAsgi",
            lambda _model, port: [
                *granian,
                "--port",
                str(port),
                "--interface",
                "asgi",
                "cmp_asgi:application",
            ],
        ),
        Candidate(
            "granian asgi + WsgiToAsgi, thread per request",
            lambda _model, port: [
                *granian,
                "--port",
                str(port),
                "--interface",
                "asgi",
                "cmp_asgi_threads:application",
            ],
        ),
        Candidate(
            "gunicorn 27 gthread",
            lambda _model, port: [
                str(bin_dir / "gunicorn"),
                "-k",
                "gthread",
                "--threads",
                str(THREADS),
                "-w",
                "1",
                "-b",
                f"{HOST}:{port}",
                "--graceful-timeout",
                str(GRACEFUL_TIMEOUT),
                "--no-control-socket",
                "cmp_app:application",
            ],
        ),
        Candidate(
            "deploykit serve (baseline)",
            lambda model, port: [str(python), "-m", "deploykit", "serve", str(model), "--port", str(port)],
        ),
    ]


# ---------------------------------------------------------------------------------------------------- HTTP


@dataclass
class Outcome:
    """One request's result: the HTTP status, or what went wrong (refused, reset, timeout), and the time."""

    status: int | None
    error: str | None
    seconds: float

    def text(self) -> str:
        if self.status is not None:
            return f"{self.status} in {self.seconds:.2f} s"
        return f"{self.error} after {self.seconds:.1f} s" if self.error == "timeout" else str(self.error)


def multipart(image: bytes, count: int = 1) -> tuple[bytes, str]:
    part = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="photo{{}}.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    )
    body = b"".join(part.format(i).encode() + image + b"\r\n" for i in range(count))
    return body + f"--{BOUNDARY}--\r\n".encode(), f"multipart/form-data; boundary={BOUNDARY}"


def request_bytes(method: str, path: str, body: bytes = b"", content_type: str | None = None) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n"
    if content_type:
        head += f"Content-Type: {content_type}\r\n"
    if body or method == "POST":
        head += f"Content-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


def http(
    port: int, raw: bytes, timeout: float = PROBE_TIMEOUT, sent: threading.Event | None = None
) -> Outcome:
    """Send ``raw`` on a new connection and read the answer, all within ``timeout`` seconds."""
    start = time.perf_counter()
    deadline = start + timeout

    def outcome(status: int | None, error: str | None) -> Outcome:
        return Outcome(status, error, time.perf_counter() - start)

    try:
        sock = socket.create_connection((HOST, port), timeout=timeout)
    except ConnectionRefusedError:
        return outcome(None, "refused")
    except TimeoutError:
        return outcome(None, "timeout")
    except OSError as exc:
        return outcome(None, type(exc).__name__)
    with sock:
        try:
            sock.settimeout(max(0.001, deadline - time.perf_counter()))
            sock.sendall(raw)
            if sent is not None:
                sent.set()
            data = b""
            while b"\r\n\r\n" not in data:
                data += _recv(sock, deadline)
            head, _, rest = data.partition(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            match = re.search(rb"(?im)^content-length:\s*(\d+)", head)
            while match is not None and len(rest) < int(match.group(1)):
                rest += _recv(sock, deadline)
            return outcome(status, None)
        except TimeoutError:
            return outcome(None, "timeout")
        except (ConnectionError, EOFError) as exc:
            return outcome(None, "reset" if isinstance(exc, ConnectionResetError) else "closed")
        except OSError as exc:
            return outcome(None, type(exc).__name__)


def _recv(sock: socket.socket, deadline: float) -> bytes:
    remaining = deadline - time.perf_counter()
    if remaining <= 0:
        raise TimeoutError
    sock.settimeout(remaining)
    chunk = sock.recv(65536)
    if not chunk:
        raise EOFError
    return chunk


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------------------------------------- processes


def tree_rss_mb(pid: int) -> float:
    """VmRSS of ``pid`` and all its descendants, in MB."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        children = [p for p, pp in parents.items() if pp == parent and p not in tree]
        tree.update(children)
        frontier.extend(children)
    total_kb = 0
    for p in tree:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kb += int(line.split()[1])
    return total_kb / 1024


class Server:
    """A candidate running in its own process group, stopped (killed if need be) on exit."""

    def __init__(
        self, candidate: Candidate, workdir: Path, model: Path, env: dict[str, str], logs: Path
    ) -> None:
        self.port = free_port()
        self.log = (logs / f"{re.sub(r'[^a-z0-9]+', '-', candidate.name.lower())}.log").open("wb")
        self.argv = candidate.command(model, self.port)
        self.proc = subprocess.Popen(
            self.argv, cwd=workdir, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.argv[0]} exited with {self.proc.returncode}; see {self.log.name}")
            if http(self.port, request_bytes("GET", "/v2/health/ready"), timeout=2).status == 200:
                return
            time.sleep(0.3)
        raise RuntimeError(f"not ready after {timeout:.0f} s; see {self.log.name}")

    def rss_mb(self) -> float:
        return tree_rss_mb(self.proc.pid)

    def stop(self) -> None:
        """Kill what is left of the server: its process group, which start_new_session made its own."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.log.close()


# ---------------------------------------------------------------------------------------------- measurements


@dataclass
class Results:
    name: str
    load: dict[int, dict[str, float]] = field(default_factory=dict)
    rss_idle_mb: float = 0.0
    rss_loaded_mb: float = 0.0
    attacks: dict[str, dict[str, Any]] = field(default_factory=dict)
    drain: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def run_wrk(port: int, clients: int, seconds: float, script: Path, env: dict[str, str]) -> dict[str, float]:
    argv = ["wrk", "-t", str(min(clients, 2)), "-c", str(clients), "-d", f"{seconds:g}s", "--timeout", "15s"]
    argv += ["-s", str(script), f"http://{HOST}:{port}/predict"]
    out = subprocess.run(
        argv, env=env, capture_output=True, text=True, timeout=seconds + 30, check=False
    ).stdout
    match = re.search(r"WRK_RESULT (\{.*\})", out)
    if match is None:
        raise RuntimeError(f"wrk printed no result:\n{out}")
    raw = json.loads(match.group(1))
    errors = sum(raw[k] for k in ("connect", "read", "write", "status", "timeout"))
    ok = raw["requests"] - raw["status"]
    return {
        "rps": ok / (raw["duration_us"] / 1e6),
        "p50_ms": raw["p50_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "errors": errors,
    }


def probe(port: int, predict: bytes) -> dict[str, str]:
    """A normal client's readiness check and prediction, side by side, each given up after 15 s."""
    results: dict[str, Outcome] = {}

    def one(key: str, raw: bytes) -> None:
        results[key] = http(port, raw)

    threads = [
        threading.Thread(target=one, args=("ready", request_bytes("GET", "/v2/health/ready"))),
        threading.Thread(target=one, args=("predict", predict)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(PROBE_TIMEOUT + 5)
    return {k: results[k].text() if k in results else "no answer" for k in ("ready", "predict")}


@contextlib.contextmanager
def connections(port: int, count: int, rcvbuf: int | None = None) -> Iterator[list[socket.socket]]:
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket()
            if rcvbuf is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.settimeout(3)
            try:
                sock.connect((HOST, port))
            except OSError:
                sock.close()
                continue
            socks.append(sock)
        yield socks
    finally:
        for sock in socks:
            sock.close()


def send_each(socks: list[socket.socket], data: bytes) -> int:
    sent = 0
    for sock in socks:
        with contextlib.suppress(OSError):
            sock.sendall(data)
            sent += 1
    return sent


def attack(server: Server, kind: str, predict: bytes) -> dict[str, Any]:
    """Hold misbehaving connections open, probe as a normal client, then let go and wait for recovery."""
    port = server.port
    result: dict[str, Any] = {}
    if kind == "slow heads":
        with connections(port, ATTACK_CONNECTIONS) as socks:
            result["connected"] = send_each(
                socks, f"POST /predict HTTP/1.1\r\nHost: {HOST}\r\nContent-Ty".encode()
            )
            time.sleep(1)
            result.update(probe(port, predict))
    elif kind == "trickling bodies":
        head = (
            f"POST /predict HTTP/1.1\r\nHost: {HOST}\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: 100000\r\n\r\n"
        ).encode()
        with connections(port, ATTACK_CONNECTIONS) as socks:
            result["connected"] = send_each(socks, head)
            stop = threading.Event()

            def trickle() -> None:
                for _ in range(60):  # bounded: at most a minute
                    if stop.wait(1.0):
                        return
                    for sock in socks:
                        with contextlib.suppress(OSError):
                            sock.send(b"-")

            thread = threading.Thread(target=trickle, daemon=True)
            thread.start()
            time.sleep(2)
            result.update(probe(port, predict))
            stop.set()
            thread.join(5)
    elif kind == "slow readers":
        pipelined = f"GET /models HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode() * PIPELINED
        with connections(port, SLOW_READERS, rcvbuf=4096) as socks:
            for sock in socks:
                sock.settimeout(0.5)
            result["connected"] = send_each(socks, pipelined)
            time.sleep(
                10
            )  # a blocking server needs about 200 answers on a connection before its write blocks
            result.update(probe(port, predict))
            result["rss_mb"] = server.rss_mb()
    result["recovered"] = recover(port)
    return result


def recover(port: int, timeout: float = 30.0) -> str:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if http(port, request_bytes("GET", "/v2/health/ready"), timeout=2).status == 200:
            return f"{time.monotonic() - start:.1f} s"
        time.sleep(0.5)
    return "no"


def drain(server: Server, heavy: bytes) -> dict[str, Any]:
    """SIGTERM with 8 requests in flight: their answers, a new connection during the drain, the exit."""
    outcomes: list[Outcome | None] = [None] * THREADS
    sent = [threading.Event() for _ in range(THREADS)]
    exited: list[float] = []

    def client(i: int) -> None:
        outcomes[i] = http(server.port, heavy, timeout=GRACEFUL_TIMEOUT + 10, sent=sent[i])

    def watch() -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.proc.wait(timeout=GRACEFUL_TIMEOUT + 15)
            exited.append(time.monotonic())

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(THREADS)]
    for t in threads:
        t.start()
    for event in sent:
        event.wait(10)
    time.sleep(1.0)  # every request has been sent; the server is working on them
    signalled = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    time.sleep(0.3)
    during = http(server.port, request_bytes("GET", "/v2/health/ready"), timeout=5)
    for t in [*threads, watcher]:
        t.join(GRACEFUL_TIMEOUT + 20)
    ok = sum(1 for o in outcomes if o is not None and o.status == 200)
    failures = sorted({o.text() if o else "no answer" for o in outcomes if o is None or o.status != 200})
    return {
        "ok": ok,
        "failures": failures,
        "new_connection": during.text(),
        "exit_code": server.proc.returncode if exited else None,
        "exit_seconds": exited[0] - signalled if exited else None,
    }


def load_tests(
    servers: list[tuple[Server, Results]], args: argparse.Namespace, workdir: Path, env: dict[str, str]
) -> None:
    """Each client count in turn; within it every server, interleaved: a warm-up each, then two halves of
    the measured time in opposite orders (A B C, C B A), so that a change in the machine's other load weighs
    on all of them alike. req/s is over both halves; p50 is their mean, p99 the worse half."""
    script = workdir / "post.lua"
    half = args.duration / 2
    for clients in args.clients:
        for server, _ in servers:
            run_wrk(server.port, clients, args.warmup, script, env)
        halves: dict[str, list[dict[str, float]]] = {r.name: [] for _, r in servers}
        for order in (servers, servers[::-1]):
            for server, results in order:
                halves[results.name].append(run_wrk(server.port, clients, half, script, env))
        for _, results in servers:
            a, b = halves[results.name]
            results.load[clients] = {
                "rps": (a["rps"] + b["rps"]) / 2,
                "p50_ms": (a["p50_ms"] + b["p50_ms"]) / 2,
                "p99_ms": max(a["p99_ms"], b["p99_ms"]),
                "errors": a["errors"] + b["errors"],
            }
            log(f"{results.name} c={clients}: {results.load[clients]}")


def robustness(server: Server, results: Results, bodies: dict[str, bytes]) -> None:
    for kind in ("slow heads", "trickling bodies", "slow readers"):
        results.attacks[kind] = attack(server, kind, bodies["predict"])
        log(f"{results.name} {kind}: {results.attacks[kind]}")
    results.drain = drain(server, bodies["heavy"])
    log(f"{results.name} SIGTERM: {results.drain}")


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------- reporting


def ratio(value: float, base: float | None) -> str:
    return f" ({value / base:.2f})" if base else ""


def tables(all_results: list[Results], clients: list[int]) -> str:
    base = next((r for r in all_results if r.name == "waitress" and not r.error), None)
    lines = [
        "| server | "
        + " | ".join(f"c={c} req/s" for c in clients)
        + " | "
        + " | ".join(f"c={c} p50 / p99 ms" for c in clients)
        + " | errors | RSS idle / after load MB |",
        "|---|" + "--:|" * (2 * len(clients) + 2),
    ]
    for r in all_results:
        cells = []
        for c in clients:
            cell = r.load.get(c)
            base_rps = base.load.get(c, {}).get("rps") if base and r is not base else None
            cells.append(f"{cell['rps']:.1f}{ratio(cell['rps'], base_rps)}" if cell else "-")
        for c in clients:
            cell = r.load.get(c)
            cells.append(f"{cell['p50_ms']:.0f} / {cell['p99_ms']:.0f}" if cell else "-")
        errors = sum(int(v["errors"]) for v in r.load.values())
        cells.append(str(errors) if r.load else "-")
        cells.append(f"{r.rss_idle_mb:.0f} / {r.rss_loaded_mb:.0f}" if r.rss_idle_mb else "-")
        lines.append(f"| {r.name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| server | slow heads: ready / predict | trickling bodies: ready / predict "
        "| slow readers: ready / predict (RSS MB) | SIGTERM: in-flight 200 | new connection while draining "
        "| exit |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in all_results:
        cells = []
        for kind in ("slow heads", "trickling bodies", "slow readers"):
            a = r.attacks.get(kind)
            if not a:
                cells.append("-")
                continue
            text = f"{a['ready']} / {a['predict']}"
            if "rss_mb" in a:
                text += f" ({a['rss_mb']:.0f})"
            if a["recovered"] == "no":
                text += "; not recovered after 30 s"
            cells.append(text)
        d = r.drain
        if d:
            fails = f" ({', '.join(d['failures'])})" if d["failures"] else ""
            cells.append(f"{d['ok']}/{THREADS}{fails}")
            cells.append(d["new_connection"])
            cells.append(
                f"{d['exit_code']} after {d['exit_seconds']:.1f} s"
                if d["exit_code"] is not None
                else "did not exit"
            )
        else:
            cells += ["-", "-", r.error or "-"]
        lines.append(f"| {r.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--python", type=Path, required=True, help="python of the venv with the frozen deploykit"
    )
    parser.add_argument("--model", type=Path, required=True, help="the ONNX model to serve")
    parser.add_argument("--image", type=Path, required=True, help="a real JPEG, 50-100 kB")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds measured per load cell")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of warm-up before each load cell")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument(
        "--only", nargs="*", help="measure only the candidates whose name contains one of these"
    )
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--logs", type=Path, help="keep the servers' logs in this folder")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        parser.error("wrk is not installed (apt-get install wrk)")

    if args.logs:
        args.logs.mkdir(parents=True, exist_ok=True)
    image = args.image.read_bytes()
    predict_body, ctype = multipart(image)
    heavy_body, _ = multipart(image, count=8)
    bodies = {
        "predict": request_bytes("POST", "/predict", predict_body, ctype),
        "heavy": request_bytes("POST", "/predict", heavy_body, ctype),
    }
    all_results: list[Results] = []
    with tempfile.TemporaryDirectory(prefix="dk-cmp-") as tmp:
        workdir = Path(tmp)
        for name, text in {
            "cmp_app.py": APP_MODULE,
            "cmp_asgi.py": ASGI_MODULE,
            "cmp_asgi_threads.py": ASGI_THREAD_PER_REQUEST_MODULE,
            "run_waitress.py": WAITRESS_MODULE,
            "post.lua": WRK_SCRIPT,
        }.items():
            (workdir / name).write_text(text)
        (workdir / "body.bin").write_bytes(predict_body)
        env = {
            **os.environ,
            "DK_CMP_MODEL": str(args.model.resolve()),
            "DK_CMP_BODY": str(workdir / "body.bin"),
            "DK_CMP_CTYPE": ctype,
            "PYTHONUNBUFFERED": "1",
        }
        env.pop("PYTHONPATH", None)
        where = subprocess.run(
            [str(args.python), "-c", "import deploykit; print(deploykit.__file__)"],
            cwd=workdir,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        print(f"deploykit from {where}; image {args.image} ({len(image) // 1024} kB)", file=sys.stderr)
        started = time.monotonic()
        load_before = os.getloadavg()
        servers: list[tuple[Server, Results]] = []
        try:
            for candidate in candidates(args.python):
                if args.only and not any(o.lower() in candidate.name.lower() for o in args.only):
                    continue
                results = Results(candidate.name)
                all_results.append(results)
                server = Server(candidate, workdir, args.model.resolve(), env, args.logs or workdir)
                log(f"{candidate.name}: {' '.join(server.argv)}")
                try:
                    server.wait_ready()
                except RuntimeError as exc:
                    results.error = str(exc)
                    server.stop()
                    continue
                time.sleep(1)
                results.rss_idle_mb = server.rss_mb()
                servers.append((server, results))
            load_tests(servers, args, workdir, env)
            time.sleep(1)
            for server, results in servers:
                results.rss_loaded_mb = server.rss_mb()
            for server, results in servers:
                try:
                    robustness(server, results, bodies)
                except Exception as exc:  # noqa: BLE001 - one candidate failing must not lose the others
                    results.error = f"{type(exc).__name__}: {exc}"
                    log(f"{results.name} failed: {results.error}")
                finally:
                    server.stop()
        finally:
            for server, _ in servers:
                server.stop()
        took = time.monotonic() - started
        load_after = os.getloadavg()
    print(tables(all_results, args.clients))
    print(
        f"\n{os.cpu_count()} CPUs; load average {load_before[0]:.1f} before, {load_after[0]:.1f} after; "
        f"{took / 60:.1f} min; {args.image.name} ({len(image) // 1024} kB); deploykit from {where}"
    )
    if args.json:
        machine = {"cpus": os.cpu_count(), "load_before": load_before, "load_after": load_after}
        data = {"machine": machine, "results": [r.__dict__ for r in all_results]}
        args.json.write_text(json.dumps(data, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
