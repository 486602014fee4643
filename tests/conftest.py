"""Shared fixtures: exported models (session-scoped) and a live `deploykit serve` process on loopback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from PIL import Image

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples" / "shapes"
SHAPES_FACTORY = f"{EXAMPLES / 'model.py'}:build"
SHAPES_IMAGES = EXAMPLES / "images"


def run_cli(*args: str, env: dict[str, str] | None = None, input: bytes | None = None, timeout: float = 600,
            cwd: str | Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run `python -m deploykit ARGS` in a fresh interpreter, as a user would."""
    full_env = {**os.environ, **(env or {})}
    raw = subprocess.run([sys.executable, "-m", "deploykit", *args], capture_output=True, env=full_env,
                         input=input, timeout=timeout, cwd=cwd)
    # stdin stays binary (images); the output is decoded for the assertions.
    return subprocess.CompletedProcess(raw.args, raw.returncode, raw.stdout.decode("utf-8", "replace"),
                                       raw.stderr.decode("utf-8", "replace"))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def shapes_onnx(models_dir: Path) -> Path:
    """The bundled example model (trained weights), exported once per session, or taken from
    $DEPLOYKIT_TEST_MODELS/shapes.onnx when that is set (`make test-lowest`, whose venv has no torch)."""
    if os.environ.get("DEPLOYKIT_TEST_MODELS"):
        return Path(os.environ["DEPLOYKIT_TEST_MODELS"], "shapes.onnx")
    from deploykit.export import export_model

    return export_model(SHAPES_FACTORY, output=models_dir / "shapes.onnx").path


@pytest.fixture(scope="session")
def nan_shapes_onnx(shapes_onnx: Path, models_dir: Path) -> Path:
    """The example model with its last layer's bias set to NaN: every output is NaN (a broken model)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(shapes_onnx))
    gemm = [n for n in model.graph.node if n.op_type == "Gemm"][-1]
    bias = next(i for i in model.graph.initializer if i.name == gemm.input[2])
    bias.CopyFrom(numpy_helper.from_array(np.full_like(numpy_helper.to_array(bias), np.nan), bias.name))
    broken = models_dir / "shapes-nan.onnx"
    onnx.save(model, str(broken))
    return broken


@pytest.fixture(scope="session")
def resnet18_onnx(models_dir: Path) -> Path:
    """resnet18 with seeded random weights, exported once per session, or taken from
    $DEPLOYKIT_TEST_MODELS/resnet18.onnx when that is set (`make test-lowest`, whose venv has no torch)."""
    if os.environ.get("DEPLOYKIT_TEST_MODELS"):
        return Path(os.environ["DEPLOYKIT_TEST_MODELS"], "resnet18.onnx")
    from deploykit.export import export_model

    return export_model("resnet18", weights="none", output=models_dir / "resnet18.onnx").path


@pytest.fixture(scope="session")
def shapes_images() -> list[Path]:
    images = sorted(SHAPES_IMAGES.glob("*.jpg"))
    assert images, f"no example images in {SHAPES_IMAGES}"
    return images


@dataclass
class LiveServer:
    """A `deploykit serve` subprocess; `url` is its base URL."""

    process: subprocess.Popen[bytes]
    url: str
    log_path: Path
    args: list[str] = field(default_factory=list)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM, then wait for the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise


def start_server(args: list[str], log_path: Path, *, env: dict[str, str] | None = None,
                 ready_path: str = "/v2/health/ready", timeout: float = 90) -> LiveServer:
    """Start `deploykit serve ARGS --port FREE` and wait until `ready_path` answers 200."""
    port = free_port()
    cmd = [sys.executable, "-m", "deploykit", "serve", *args, "--host", "127.0.0.1", "--port", str(port)]
    return start_process(cmd, port, log_path, env=env, ready_path=ready_path, timeout=timeout)


def start_process(cmd: list[str], port: int, log_path: Path, *, env: dict[str, str] | None = None,
                  ready_path: str = "/v2/health/ready", timeout: float = 90,
                  cwd: str | Path | None = None) -> LiveServer:
    """Start a server process `cmd` that listens on loopback `port`; wait until `ready_path` answers 200."""
    import requests

    log = open(log_path, "wb")  # noqa: SIM115 - kept open for the process's lifetime
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                               cwd=cwd)
    url = f"http://127.0.0.1:{port}"
    server = LiveServer(process, url, log_path, cmd)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.log()}")
        try:
            if requests.get(url + ready_path, timeout=1).status_code == 200:
                return server
        except (requests.ConnectionError, requests.Timeout):  # a booting worker may not answer within 1 s
            pass
        time.sleep(0.1)
    server.terminate()
    raise RuntimeError(f"server not ready after {timeout}s:\n{server.log()}")


@pytest.fixture
def live_server_factory(tmp_path: Path) -> Iterator[Callable[..., LiveServer]]:
    """Start servers with custom arguments; all are stopped with SIGTERM at teardown."""
    started: list[LiveServer] = []

    def factory(*args: str, env: dict[str, str] | None = None) -> LiveServer:
        server = start_server(list(args), tmp_path / f"server-{len(started)}.log", env=env)
        started.append(server)
        return server

    yield factory
    for server in started:
        server.terminate()


@pytest.fixture(scope="session")
def shapes_server(shapes_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """One shared server with the example model, for read-only tests."""
    server = start_server([str(shapes_onnx)], tmp_path_factory.mktemp("server") / "server.log")
    yield server
    server.terminate()


@pytest.fixture(scope="session")
def absent_provider() -> tuple[str, str]:
    """An execution provider that this onnxruntime build lacks, as (short name, ONNX Runtime's name): the
    CPU build lacks CUDA, the GPU build lacks OpenVINO, so the tests of "not available" decide on the code
    alone."""
    from deploykit.runtime import PROVIDER_ALIASES, available_providers

    available = set(available_providers())
    absent = [(short, full) for short, full in PROVIDER_ALIASES.items() if full not in available]
    assert absent, f"this onnxruntime has every provider deploykit names: {sorted(available)}"
    return absent[0]


@pytest.fixture
def refused_downloads() -> Iterator[dict[str, str]]:
    """Environment variables that make every HTTP(S) download of a subprocess fail at once, network or not:
    the proxy they name is a port bound here and never listened on (connection refused), and nothing is
    exempt from it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as closed:
        closed.bind(("127.0.0.1", 0))  # bound, so no other process takes the port while the test runs
        proxy = f"http://127.0.0.1:{closed.getsockname()[1]}"
        names = ("http_proxy", "https_proxy", "all_proxy")
        yield {
            **{name: proxy for name in names},
            **{name.upper(): proxy for name in names},
            "no_proxy": "",
            "NO_PROXY": "",
        }


REAL_PHOTO = Path(__file__).resolve().parent / "data" / "grace_hopper.jpg"


def upscaled_photo(size: tuple[int, int], *, grain: float = 0.0, seed: int = 0) -> Image.Image:
    """The real test photo (tests/data, 512x600) cropped to ``size``'s aspect ratio and upscaled to it with
    Lanczos; ``grain`` adds Gaussian sensor noise of that many grey levels per channel (a phone's is about 5).
    """
    import numpy as np
    from PIL import Image

    with Image.open(REAL_PHOTO) as opened:
        source = opened.convert("RGB")
    aspect = size[0] / size[1]
    width, height = source.size
    crop = (round(height * aspect), height) if width / height > aspect else (width, round(width / aspect))
    left, top = (width - crop[0]) // 2, (height - crop[1]) // 2
    big = source.resize(size, Image.Resampling.LANCZOS, box=(left, top, left + crop[0], top + crop[1]))
    if not grain:
        return big
    pixels = np.asarray(big, dtype=np.float32)
    pixels += np.random.default_rng(seed).standard_normal(pixels.shape, dtype=np.float32) * grain
    return Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8))


@pytest.fixture(scope="session")
def phone_jpeg_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A phone-size JPEG of the real test photo: 4032x3024 with a phone's grain, quality 92, about 3 MB."""
    path = tmp_path_factory.mktemp("phone") / "IMG_0001.jpg"
    upscaled_photo((4032, 3024), grain=5.0).save(path, "JPEG", quality=92)
    return path
