"""Where a served request's time goes at one client: the in-process call against the smallest servers that do
the same work, and deploykit serve.

One client posts the same raw JPEG (``Content-Type: image/jpeg``) to ``POST /predict`` of each system, back to
back on a kept-alive connection, in alternating blocks of ``--block`` requests, with an in-process block
(the same decode, preprocess and ``Predictor.predict`` with the server's session settings) between them, so
that drift on a shared machine hits every system alike. Each block starts after a pause (``--gap-ms``, 100
by default), so that ONNX Runtime threads that spin on after one system's last call (the default session's
do, for about 45 ms) never take a core from the next system's first calls. Systems:

- ``gunicorn + bare WSGI``: ``overhead_apps.raw_app`` under gunicorn with deploykit serve's worker class
  (``--worker gthread``: gunicorn's own), 8 threads: the WSGI server's own cost;
- ``gunicorn + Flask``: ``overhead_apps.flask_app``, one Flask view, what Flask adds;
- ``deploykit serve``: the real server (batcher, metrics, hooks, the full answer);
- ``granian + Flask`` (with ``--granian``, when granian is installed): a WSGI server written in Rust;
- ``deploykit serve [ARGS]`` for each ``--variant ARGS`` (leading NAME=value words go to its environment, so
  ``--variant PYTHONPATH=/tmp/old`` measures another checkout side by side).

The in-process rows use the server's session for a call alone and, as ``in-process (ORT defaults)``, ONNX
Runtime's default session (the best in-process configuration at one client in bench_serve); the ratio column
divides the faster of the two by each system. ``--skip-apps`` leaves out the gunicorn (and granian) apps;
``--multipart`` posts bench_serve's multipart upload to the deploykit servers instead (and leaves the apps
out).

``--copies K`` starts K processes of each server and spreads the blocks over them: two processes of the same
server can differ by a few tenths of a millisecond for the whole run (where their threads landed), which
would otherwise read as a difference between systems. The table gives each system's median latency, what it
adds to the in-process call, and the in-process call over it (the share of the ceiling one client can reach);
then its mean and 90th percentile, and the same ratio by means, which is what a closed loop's throughput sees
(slow calls included).

    python benchmarks/bench_overhead.py --model resnet18.onnx
    python benchmarks/bench_overhead.py --copies 3 --rounds 60 --granian --markdown
    python benchmarks/bench_overhead.py --skip-apps --variant PYTHONPATH=/tmp/old-checkout
"""

from __future__ import annotations

import argparse
import http.client
import importlib.util
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    ServerProcess,
    format_table,
    free_port,
    machine_info,
    model_or_resnet18,
    python,
    sample_photo,
)
from bench_serve import RawClient, multipart_body, start_deploykit  # noqa: E402

HERE = Path(__file__).resolve().parent


WORKER_CLASSES = {"deploykit": "overhead_worker.DeployKitWorker", "gthread": "gthread"}


def start_app(kind: str, app: str, model: Path, workdir: Path, data: bytes, worker: str = "deploykit"
              ) -> ServerProcess:
    """``overhead_apps:<app>`` under gunicorn (8 threads of deploykit serve's worker class, or gunicorn's
    own gthread) or granian."""
    port = free_port()
    if kind == "gunicorn":
        cmd = [
            python(),
            "-m",
            "gunicorn",
            "--chdir",
            str(HERE),
            "--worker-class",
            WORKER_CLASSES[worker],
            "--threads",
            "8",
            "--workers",
            "1",
            "--keep-alive",
            "5",
            "--bind",
            f"127.0.0.1:{port}",
            f"overhead_apps:{app}",
        ]
    else:
        cmd = [
            python(),
            "-m",
            "granian",
            "--interface",
            "wsgi",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--blocking-threads",
            "8",
            "--working-dir",
            str(HERE),
            f"overhead_apps:{app}",
        ]
    server = ServerProcess(
        cmd,
        url=f"http://127.0.0.1:{port}",
        log_path=workdir / f"{kind}-{app}-{port}.log",
        env={"OVERHEAD_MODEL": str(model)},
    )
    server.wait_until(lambda: RawClient("127.0.0.1", port, "/predict", data, "image/jpeg").post() == 200)
    return server


def kept_alive(client: RawClient) -> Callable[[], int]:
    """``client.post``, reconnecting once when the server closed the kept-alive connection (its keep-alive
    timeout can pass while the other systems take their turns, during the warm-up)."""

    def post() -> int:
        try:
            return client.post()
        except (http.client.RemoteDisconnected, ConnectionError):
            client.close()
            return client.post()

    return post


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument("--model", type=Path, help="ONNX file (default: resnet18, random weights)")
    parser.add_argument("--image", type=Path, help="JPEG to send (default: matplotlib's grace_hopper.jpg)")
    parser.add_argument("--rounds", type=int, default=40, help="rounds of blocks (default 40)")
    parser.add_argument("--block", type=int, default=10, help="requests per block (default 10)")
    parser.add_argument("--gap-ms", type=float, default=100.0,
                        help="pause before each block (default 100), so that ONNX Runtime threads that spin "
                        "on after the previous system's last call do not take a core from the next system")
    parser.add_argument("--copies", type=int, default=1, help="server processes per system (default 1)")
    parser.add_argument("--granian", action="store_true", help="also granian + Flask (pip install granian)")
    parser.add_argument("--variant", action="append", default=[], metavar="ARGS",
                        help="also a deploykit serve with these extra arguments (leading NAME=value words "
                        "go to its environment; repeatable)")
    parser.add_argument("--worker", choices=sorted(WORKER_CLASSES), default="deploykit",
                        help="gunicorn worker class of the apps: deploykit serve's (default) or gunicorn's "
                        "gthread")
    parser.add_argument("--multipart", action="store_true",
                        help="post bench_serve's multipart upload (field 'file') instead of the raw JPEG; "
                        "measures the deploykit servers only")
    parser.add_argument("--skip-apps", action="store_true", help="leave out the gunicorn and granian apps")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = parser.parse_args(argv)
    if args.granian and importlib.util.find_spec("granian") is None:
        parser.error("granian is not installed (pip install granian)")
    data = (args.image or sample_photo()).read_bytes()

    with tempfile.TemporaryDirectory(prefix="deploykit-overhead-") as tmp:
        workdir = Path(tmp)
        model = model_or_resnet18(args.model, workdir)

        from deploykit.images import decode_image, preprocess
        from deploykit.runtime import Predictor, SessionOptions
        from deploykit.serve.config import ModelSpec, ServeConfig
        from deploykit.serve.registry import inference_plan, open_predictors

        config = ServeConfig(models=(ModelSpec("m", model),))
        shared, solo = open_predictors(model, config, inference_plan(config))
        predictor: Predictor = solo or shared  # one client at a time: the session for a call alone

        defaults = Predictor.open(model, SessionOptions())

        def in_process(session: Predictor) -> Callable[[], object]:
            return lambda: session.predict(preprocess(decode_image(data), session.card.preprocess)[None], 5)

        # system -> (start it, the body and content type to post). The apps take the raw JPEG only; with
        # --multipart the deploykit servers get what bench_serve sends.
        raw = (data, "image/jpeg")
        served = multipart_body(data, "photo.jpg") if args.multipart else raw
        with_apps = not (args.skip_apps or args.multipart)
        starters: dict[str, tuple[Callable[[], ServerProcess], tuple[bytes, str]]] = {}
        if with_apps:
            for system, app in (("gunicorn + bare WSGI", "raw_app"), ("gunicorn + Flask", "flask_app")):
                starters[system] = (
                    lambda a=app: start_app("gunicorn", a, model, workdir, data, args.worker),
                    raw,
                )
        for variant in ["", *args.variant]:
            extra = shlex.split(variant)
            starters[f"deploykit serve {variant}".strip()] = (
                lambda x=extra: start_deploykit(model, workdir, x, *served),
                served,
            )
        if args.granian and with_apps:
            starters["granian + Flask"] = (
                lambda: start_app("granian", "flask_app", model, workdir, data),
                raw,
            )
        servers: list[ServerProcess] = []
        calls: list[tuple[str, Callable[[], object]]] = [
            # the default session first: its threads spin on for a while after its last call
            ("in-process (ORT defaults)", in_process(defaults)),
            ("in-process", in_process(predictor)),
        ]
        try:
            for _copy in range(args.copies):
                for system, (start, (body, content_type)) in starters.items():
                    server = start()
                    servers.append(server)
                    port = int(server.url.rsplit(":", 1)[1])
                    client = RawClient("127.0.0.1", port, "/predict", body, content_type)
                    calls.append((system, kept_alive(client)))
            print(
                f"Model {model.name}, {len(data):,}-byte JPEG, {args.rounds} rounds of {args.block} "
                f"requests, {args.copies} process(es) per server",
                flush=True,
            )
            latencies: dict[str, list[float]] = {system: [] for system, _ in calls}
            for _system, call in calls:  # warm up every path
                for _ in range(3 * args.block):
                    call()
            for _round in range(args.rounds):
                for system, call in calls:
                    time.sleep(args.gap_ms / 1000)
                    for _ in range(args.block):
                        t0 = time.perf_counter()
                        call()
                        latencies[system].append(time.perf_counter() - t0)
        finally:
            for server in servers:
                server.stop()

    in_process_names = ("in-process", "in-process (ORT defaults)")
    base = min(statistics.median(latencies[name]) for name in in_process_names)
    # the mean is what a closed loop's throughput sees (1 / mean), slow calls included
    base_mean = min(statistics.fmean(latencies[name]) for name in in_process_names)
    rows = []
    for system, values in latencies.items():
        median, mean = statistics.median(values), statistics.fmean(values)
        p90 = statistics.quantiles(values, n=10)[-1]
        rows.append([system, f"{median * 1e3:.2f}", f"{(median - base) * 1e3:.2f}", f"{base / median:.3f}",
                     f"{mean * 1e3:.2f}", f"{p90 * 1e3:.2f}", f"{base_mean / mean:.3f}"])
    info = machine_info()
    print("\nMachine: " + ", ".join(f"{k} {v}" for k, v in info.items()) + "\n")
    print(
        format_table(["system", "median ms", "added ms", "best in-process / system", "mean ms", "p90 ms",
                      "by means"], rows,
                     markdown=args.markdown)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
