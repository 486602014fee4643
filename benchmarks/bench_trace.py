"""Where one request's time goes, stage by stage, at one client: the client's clock and the server's in one.

One client posts the same image to ``POST /predict`` back to back on a kept-alive connection (bench_serve's
multipart upload, or the raw JPEG with ``--raw``), and ``trace_server.py`` stamps each stage of every request
in the server with the same clock. The table gives the median time of each stage, and the **overhead**: the
whole round trip less the two things the in-process ceiling also does (decode + preprocess, and the ONNX
Runtime call). That figure is steadier than throughput ratios, because the inference time, which differs by
tenths of a millisecond between two processes of the same server, is taken out of it; but a change can move
the inference too, so the round trip and the inference of each round are printed beside it.

Each ``--variant ARGS`` is one more server measured in the same rounds (leading ``NAME=value`` words go to
its environment, e.g. ``--variant PYTHONPATH=/tmp/old-checkout`` for another checkout); rounds alternate the
systems' order. Stamping costs about 1 µs per stage.

    python benchmarks/bench_trace.py --model resnet18.onnx
    python benchmarks/bench_trace.py --model resnet18.onnx --rounds 4 --variant PYTHONPATH=/tmp/base
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
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
    split_env,
)
from bench_serve import RawClient, http_ok, multipart_body  # noqa: E402

HERE = Path(__file__).resolve().parent

#: (row, from stage, to stage); "send" and "received" are the client's marks.
ROWS = [
    ("client sends -> headers parsed", "send", "parsed"),
    ("headers parsed -> body read", "parsed", "read"),
    ("decode + preprocess", "read", "submit"),
    ("submit -> inference starts", "submit", "run"),
    ("inference (ONNX Runtime)", "run", "ran"),
    ("inference ends -> request thread has it", "ran", "result"),
    ("top-k + JSON answer", "result", "answer"),
    ("answer -> last byte written", "answer", "sent"),
    ("last byte written -> client has the answer", "sent", "received"),
]


def requests_of(marks: list[tuple[str, int]], client: list[tuple[int, int]]) -> list[dict[str, int]]:
    """Per client round trip, the first time of each server stage inside it (the last for ``sent``)."""
    marks = sorted(marks, key=lambda m: m[1])
    starts = [i for i, (stage, _) in enumerate(marks) if stage == "parsed"]
    found = []
    for begin, end in zip(starts, [*starts[1:], len(marks)], strict=True):
        stages: dict[str, int] = {}
        for stage, t in marks[begin:end]:
            if stage == "sent" or stage not in stages:
                stages[stage] = t
        found.append(stages)
    out = []
    parsed = [s["parsed"] for s in found]
    for send, received in client:
        inside = [s for s, t in zip(found, parsed, strict=True) if send <= t <= received]
        if len(inside) == 1 and all(stage in inside[0] for _, a, b in ROWS for stage in (a, b)
                                    if stage not in ("send", "received")):
            out.append({**inside[0], "send": send, "received": received})
    return out


def trace(model: Path, workdir: Path, extra: Sequence[str], body: bytes, content_type: str, *,
          warmup: int, count: int) -> list[dict[str, int]]:
    env, args = split_env(extra)
    port = free_port()
    out = workdir / f"marks-{port}.json"
    cmd = [python(), str(HERE / "trace_server.py"), str(out), str(model), "--host", "127.0.0.1", "--port",
           str(port), *args]
    server = ServerProcess(cmd, url=f"http://127.0.0.1:{port}", log_path=workdir / f"trace-{port}.log",
                           env=env)
    try:
        server.wait_until(lambda: http_ok(server.url + "/v2/health/ready"))
        client = RawClient("127.0.0.1", port, "/predict", body, content_type)
        for _ in range(warmup):
            if client.post() != 200:
                raise RuntimeError(f"POST /predict failed:\n{server.log()}")
        times = []
        for _ in range(count):
            send = time.perf_counter_ns()
            status = client.post()
            times.append((send, time.perf_counter_ns()))
            if status != 200:
                raise RuntimeError(f"POST /predict answered {status}:\n{server.log()}")
        client.close()
    finally:
        server.stop()
    return requests_of(json.loads(out.read_text()), times)


def median_us(requests: list[dict[str, int]], a: str, b: str) -> float:
    return statistics.median(r[b] - r[a] for r in requests) / 1000


def overheads_us(requests: list[dict[str, int]]) -> list[float]:
    """Round trip less decode + preprocess and the ONNX Runtime call, per request."""
    return [((r["received"] - r["send"]) - (r["submit"] - r["read"]) - (r["ran"] - r["run"])) / 1000
            for r in requests]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path,
                        help="ONNX file (default: resnet18 with random weights, exported)")
    parser.add_argument("--image", type=Path, help="image to post (default: a real 512x600 JPEG photo)")
    parser.add_argument("--raw", action="store_true", help="post the raw JPEG instead of a multipart upload")
    parser.add_argument("--requests", type=int, default=300, help="traced requests per server and round")
    parser.add_argument("--warmup", type=int, default=50, help="requests before tracing")
    parser.add_argument("--rounds", type=int, default=2, help="rounds; each starts every server afresh")
    parser.add_argument("--variant", action="append", default=[], metavar="ARGS",
                        help="another deploykit serve: [NAME=value ...] [serve options]")
    parser.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    data = (args.image or sample_photo()).read_bytes()
    body, content_type = (data, "image/jpeg") if args.raw else multipart_body(data, "photo.jpg")
    systems = {"deploykit serve": [], **{f"deploykit serve {v}": shlex.split(v) for v in args.variant}}
    traced: dict[str, list[list[dict[str, int]]]] = {name: [] for name in systems}
    with tempfile.TemporaryDirectory(prefix="deploykit-trace-") as tmp:
        workdir = Path(tmp)
        model = model_or_resnet18(args.model, workdir)
        names = list(systems)
        for round_ in range(args.rounds):
            shift = round_ % len(names)
            for name in names[shift:] + names[:shift]:
                requests = trace(model, workdir, systems[name], body, content_type, warmup=args.warmup,
                                 count=args.requests)
                traced[name].append(requests)
                overhead = statistics.median(overheads_us(requests))
                print(f"  round {round_ + 1}  {name:<40} {len(requests)} requests, "
                      f"overhead {overhead:,.0f} µs", flush=True)

    headers = ["stage (median µs)", *names]
    rows: list[list[object]] = []
    everything = {name: [r for run in runs for r in run] for name, runs in traced.items()}
    for label, a, b in ROWS:
        rows.append([label, *(round(median_us(everything[n], a, b), 1) for n in names)])
    rows.append(["round trip (ms)", *(round(median_us(everything[n], "send", "received") / 1000, 2)
                                      for n in names)])
    rows.append(["overhead: round trip - decode - inference", *(
        round(statistics.median(overheads_us(everything[n])), 1) for n in names)])
    for round_ in range(args.rounds):
        rows.append([f"  overhead, round {round_ + 1}", *(
            round(statistics.median(overheads_us(traced[n][round_])), 1) for n in names)])
    for round_ in range(args.rounds):
        rows.append([f"  inference, round {round_ + 1}", *(
            round(median_us(traced[n][round_], "run", "ran"), 1) for n in names)])
    print()
    print(format_table(headers, rows, markdown=args.markdown))
    info = machine_info()
    print("\nMachine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    print(f"Body: {'raw JPEG' if args.raw else 'multipart upload'} of {len(data):,} bytes, "
          f"{args.requests} traced requests per server and round after {args.warmup}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
