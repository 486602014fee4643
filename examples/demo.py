"""The end-to-end demo behind `make demo`: export, verify, serve, predict, stop. Offline, about a minute.

It runs the four deploykit commands exactly as a user would type them, on the bundled example model
(a small CNN trained on rendered shapes, examples/shapes/) and its example images, whose true labels are in
their file names. It exits non-zero if any step fails or any prediction is wrong.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
FACTORY = HERE / "shapes" / "model.py"
IMAGES = HERE / "shapes" / "images"


def step(title: str, cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Print the command like a shell would, run it, stop the demo if it fails."""
    print(f"\n$ {' '.join(cmd)}", flush=True)
    result = subprocess.run(cmd, text=True, **kwargs)  # type: ignore[call-overload]
    if result.returncode != 0:
        sys.exit(f"demo: step '{title}' failed with exit code {result.returncode}")
    return result


def wait_ready(url: str, process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"demo: the server exited early with code {process.returncode}")
        try:
            with urllib.request.urlopen(url + "/v2/health/ready", timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    sys.exit("demo: the server did not become ready in time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("demo-out"), help="folder for the exported model")
    parser.add_argument("--port", type=int, default=5057)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    deploykit = [sys.executable, "-m", "deploykit"]
    model = args.out / "shapes.onnx"

    step("export", [*deploykit, "export", f"{FACTORY}:build", "-o", str(model)])
    step("verify", [*deploykit, "verify", str(model), "--images", str(IMAGES)])

    url = f"http://127.0.0.1:{args.port}"
    print(f"\n$ deploykit serve {model} --port {args.port} &", flush=True)
    server = subprocess.Popen([*deploykit, "serve", str(model), "--port", str(args.port)])
    try:
        wait_ready(url, server)
        images = sorted(IMAGES.glob("*.jpg"))
        result = step("predict", [*deploykit, "predict", *map(str, images), "--url", url, "--json"],
                      stdout=subprocess.PIPE)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)

    records = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    print(f"\n{'image':<18} {'true':<10} {'predicted':<10} {'probability':>11}")
    wrong = 0
    for record in records:
        name = Path(record["path"]).name
        truth = name.rsplit("_", 1)[0]
        ok = record["label"] == truth
        wrong += not ok
        print(f"{name:<18} {truth:<10} {record['label'] or record['error']:<10} "
              f"{(record['probability'] or 0):>10.1%} {'ok' if ok else 'WRONG'}")
    print(f"\n{len(records) - wrong}/{len(records)} correct; the server shut down cleanly "
          f"(exit {server.returncode}).")
    if wrong or server.returncode != 0 or not records:
        sys.exit(1)


if __name__ == "__main__":
    main()
