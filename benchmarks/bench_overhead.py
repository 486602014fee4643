"""Where a served request's time goes at one client: the in-process call against the smallest servers that do
the same work, and deploykit serve.

One client posts the same raw JPEG (``Content-Type: image/jpeg``) to ``POST /predict`` of each system, back to
back on a kept-alive connection, in alternating blocks of ``--block`` requests, with an in-process block
(the same decode, preprocess and ``Predictor.predict`` with the server's session settings) between them, so
that drift on a shared machine hits every system alike. Systems:

- ``gunicorn + bare WSGI``: ``overhead_apps.raw_app`` under gunicorn's gthread worker (8 threads), the WSGI
  server's own cost;
- ``gunicorn + Flask``: ``overhead_apps.flask_app``, one Flask view, what Flask adds;
- ``deploykit serve``: the real server (batcher, metrics, hooks, the full answer);
- ``granian + Flask`` (with ``--granian``, when granian is installed): a WSGI server written in Rust.

``--copies K`` starts K processes of each server and spreads the blocks over them: two processes of the same
server can differ by a few tenths of a millisecond for the whole run (where their threads landed), which
would otherwise read as a difference between systems. The table gives each system's median latency, what it
adds to the in-process call, and the in-process call over it (the share of the ceiling one client can reach).

    python benchmarks/bench_overhead.py --model resnet18.onnx
    python benchmarks/bench_overhead.py --copies 3 --rounds 60 --granian --markdown
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ServerProcess, format_table, free_port, machine_info, python, sample_photo  # noqa: E402
from bench_serve import RawClient, start_deploykit  # noqa: E402

HERE = Path(__file__).resolve().parent


def start_app(kind: str, app: str, model: Path, workdir: Path, data: bytes) -> ServerProcess:
    """``overhead_apps:<app>`` under gunicorn (gthread, 8 threads, as deploykit serve) or granian."""
    port = free_port()
    if kind == "gunicorn":
        cmd = [
            python(),
            "-m",
            "gunicorn",
            "--chdir",
            str(HERE),
            "--worker-class",
            "gthread",
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
    parser.add_argument("--copies", type=int, default=1, help="server processes per system (default 1)")
    parser.add_argument("--granian", action="store_true", help="also granian + Flask (pip install granian)")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = parser.parse_args(argv)
    if args.granian and importlib.util.find_spec("granian") is None:
        parser.error("granian is not installed (pip install granian)")
    data = (args.image or sample_photo()).read_bytes()

    with tempfile.TemporaryDirectory(prefix="deploykit-overhead-") as tmp:
        workdir = Path(tmp)
        model = args.model
        if model is None:
            print("Exporting resnet18 (random weights) ...", flush=True)
            model = workdir / "resnet18.onnx"
            export = ["export", "resnet18", "--weights", "none", "--output", str(model)]
            subprocess.run([python(), "-m", "deploykit", *export], check=True, stdout=subprocess.DEVNULL)

        from deploykit.images import decode_image, preprocess
        from deploykit.runtime import Predictor
        from deploykit.serve.config import ModelSpec, ServeConfig
        from deploykit.serve.registry import inference_plan, open_predictors

        config = ServeConfig(models=(ModelSpec("m", model),))
        shared, solo = open_predictors(model, config, inference_plan(config))
        predictor: Predictor = solo or shared  # one client at a time: the session for a call alone

        def in_process() -> None:
            predictor.predict(preprocess(decode_image(data), predictor.card.preprocess)[None], 5)

        starters: dict[str, Callable[[], ServerProcess]] = {
            "gunicorn + bare WSGI": lambda: start_app("gunicorn", "raw_app", model, workdir, data),
            "gunicorn + Flask": lambda: start_app("gunicorn", "flask_app", model, workdir, data),
            "deploykit serve": lambda: start_deploykit(model, workdir, [], data, "image/jpeg"),
        }
        if args.granian:
            starters["granian + Flask"] = lambda: start_app("granian", "flask_app", model, workdir, data)
        servers: list[ServerProcess] = []
        calls: list[tuple[str, Callable[[], object]]] = [("in-process", in_process)]
        try:
            for _copy in range(args.copies):
                for system, start in starters.items():
                    server = start()
                    servers.append(server)
                    port = int(server.url.rsplit(":", 1)[1])
                    calls.append((system, RawClient("127.0.0.1", port, "/predict", data, "image/jpeg").post))
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
                    for _ in range(args.block):
                        t0 = time.perf_counter()
                        call()
                        latencies[system].append(time.perf_counter() - t0)
        finally:
            for server in servers:
                server.stop()

    base = statistics.median(latencies["in-process"])
    rows = []
    for system, values in latencies.items():
        median = statistics.median(values)
        rows.append([system, f"{median * 1e3:.2f}", f"{(median - base) * 1e3:.2f}", f"{base / median:.3f}"])
    info = machine_info()
    print("\nMachine: " + ", ".join(f"{k} {v}" for k, v in info.items()) + "\n")
    print(
        format_table(["system", "median ms", "added ms", "in-process / system"], rows, markdown=args.markdown)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
