"""Where one request's CPU time goes, and how many cores one `deploykit serve` process can keep busy.

The server is one Python process. Its inference (ONNX Runtime) and image decoding (Pillow) run without
Python's global interpreter lock; the rest of a request (Flask, the JSON answer, NumPy glue) holds it. This
script posts images to the real app in-process, one request at a time, and measures per request:

- the CPU time of the thread that handled it (decode, preprocess, Flask, answer): an upper bound of the time
  the request holds the GIL, since Pillow's decoder and resize release it;
- the CPU time of the whole process (handler + batcher + ONNX Runtime, on one thread that does not spin).

One process saturates when the GIL-bound part fills one core: at about ``process CPU / handler CPU`` cores
(a lower bound, since the handler's CPU overstates its GIL time). Past that, run more replicas.

    python benchmarks/bench_cpu.py [--model resnet18.onnx] [--requests 60]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _common import format_table, model_or_resnet18, phone_photo, sample_photo


def measure(model: Path, image: Path, requests: int) -> tuple[float, float, float]:
    """(handler CPU ms, process CPU ms, wall ms) per request, medians over ``requests`` after a warm-up."""
    import statistics

    from deploykit.serve.app import create_app
    from deploykit.serve.config import ModelSpec, ServeConfig
    from deploykit.serve.memory import tune_heap

    tune_heap()  # the heap settings of `deploykit serve`, without which every request faults in its arrays
    # one ONNX Runtime thread that never spins: the process's CPU is then the work done, not waiting
    app = create_app(ServeConfig(models=(ModelSpec("m", model),), intra_op_threads=1, instances=1))
    client = app.test_client()
    data = image.read_bytes()
    for _ in range(3):
        assert client.post("/predict", data=data, content_type="image/jpeg").status_code == 200
    handler, process, wall = [], [], []
    for _ in range(requests):
        t0, p0, w0 = time.thread_time(), time.process_time(), time.perf_counter()
        response = client.post("/predict", data=data, content_type="image/jpeg")
        t1, p1, w1 = time.thread_time(), time.process_time(), time.perf_counter()
        assert response.status_code == 200, response.json
        handler.append((t1 - t0) * 1000)
        process.append((p1 - p0) * 1000)
        wall.append((w1 - w0) * 1000)
    return statistics.median(handler), statistics.median(process), statistics.median(wall)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", type=Path, help="ONNX file with a card (default: resnet18, random weights)"
    )
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = model_or_resnet18(args.model, Path(tmp))
        rows = []
        images = (("small photo (512x600)", sample_photo()), ("phone photo (4032x3024)", phone_photo()))
        for label, image in images:
            handler, process, wall = measure(model, image, args.requests)
            cores = process / handler
            rows.append([label, f"{handler:.1f}", f"{process:.1f}", f"{wall:.1f}", f"{cores:.1f}"])
    print(format_table(
        ["image", "handler CPU ms", "process CPU ms", "wall ms", "cores one process can feed"],
        rows,
        markdown=args.markdown,
    ))


if __name__ == "__main__":
    main()
