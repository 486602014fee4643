"""The server's resident memory under the uploads that cost the most: what a container's limit must hold.

Scenarios, each against a fresh `deploykit serve` subprocess (resnet18 by default), with default options
unless ``--serve-args`` says otherwise:

- ``png``: 8 clients post a 38-megapixel PNG (6400x6000, a real photo upscaled: no grain, so it stays
  under the default 20 MB body limit) at once, ``--rounds`` times;
- ``phone``: 8 clients post a 12-megapixel phone JPEG (4032x3024, a few MB) back to back for
  ``--seconds``, then the server idles for 10 s.

Reported per scenario: resident memory (VmRSS) idle before, the peak (VmHWM), at the end of the load, and
after 10 s idle; and the HTTP statuses seen (a dropped connection counts as ``dropped``).

    python benchmarks/bench_memory.py [--model m.onnx] [--scenario png,phone] [--serve-args "..."]
"""

from __future__ import annotations

import argparse
import collections
import shlex
import tempfile
import threading
import time
from pathlib import Path

from _common import (
    CACHE,
    ServerProcess,
    format_table,
    free_port,
    model_or_resnet18,
    phone_photo,
    python,
    sample_photo,
)

CLIENTS = 8


def big_png(size: tuple[int, int] = (6400, 6000)) -> Path:
    """A 38-megapixel PNG made from the sample photo (cached)."""
    from PIL import Image

    target = CACHE / f"big-{size[0]}x{size[1]}.png"
    if not target.is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        with Image.open(sample_photo()) as photo:
            image = photo.convert("RGB").resize(size, Image.Resampling.BICUBIC)
        partial = target.with_suffix(".part")
        image.save(partial, "PNG", compress_level=9)
        partial.replace(target)
    return target


def _post(url: str, data: bytes, statuses: collections.Counter[str], lock: threading.Lock) -> None:
    import requests

    try:
        status = str(requests.post(url + "/predict", data=data, headers={"Content-Type": "image/png"},
                                   timeout=300).status_code)
    except requests.RequestException:
        status = "dropped"
    with lock:
        statuses[status] += 1


def run(
    model: Path, scenario: str, serve_args: list[str], rounds: int, seconds: float, workdir: Path
) -> list[str]:
    import requests

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [python(), "-m", "deploykit", "serve", str(model), "--port", str(port), *serve_args]
    server = ServerProcess(cmd, url=url, log_path=workdir / f"{scenario}.log", cwd=workdir)
    try:
        server.wait_until(lambda: requests.get(url + "/v2/health/ready", timeout=2).status_code == 200)
        idle = server.rss_mb()
        data = (big_png() if scenario == "png" else phone_photo()).read_bytes()
        statuses: collections.Counter[str] = collections.Counter()
        lock = threading.Lock()
        if scenario == "png":
            for _ in range(rounds):
                threads = [
                    threading.Thread(target=_post, args=(url, data, statuses, lock)) for _ in range(CLIENTS)
                ]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
        else:
            deadline = time.monotonic() + seconds

            def loop() -> None:
                while time.monotonic() < deadline:
                    _post(url, data, statuses, lock)

            threads = [threading.Thread(target=loop) for _ in range(CLIENTS)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        end = server.rss_mb()
        peak = server.peak_mb()
        time.sleep(10)
        after = server.rss_mb()
        answers = ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items()))
        sizes = [f"{len(data) / 1e6:.1f}", f"{idle:.0f}", f"{peak:.0f}", f"{end:.0f}", f"{after:.0f}"]
        return [scenario, *sizes, answers]
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", type=Path, help="ONNX file with a card (default: resnet18, random weights)"
    )
    parser.add_argument("--scenario", default="png,phone")
    parser.add_argument("--serve-args", default="", help="extra `deploykit serve` arguments")
    parser.add_argument("--rounds", type=int, default=3, help="png: rounds of 8 uploads at once")
    parser.add_argument("--seconds", type=float, default=60, help="phone: seconds of load")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = model_or_resnet18(args.model, Path(tmp))
        rows = [run(model, s, shlex.split(args.serve_args), args.rounds, args.seconds, Path(tmp))
                for s in args.scenario.split(",")]
    print(format_table(["scenario", "upload MB", "idle MB", "peak MB", "end of load MB", "after 10 s idle MB",
                        "answers"], rows, markdown=args.markdown))


if __name__ == "__main__":
    main()
