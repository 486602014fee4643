"""`deploykit predict --protocol v2` against Open Inference Protocol servers that deploykit did not write.

Seldon MLServer (with the small ONNX Runtime runtime in v2servers/mlserver_onnx.py) and KServe's Python model
server (a ``kserve.Model`` running ONNX Runtime, v2servers/kserve_onnx.py) run as processes on loopback, next
to deploykit's own server; each run is compared with local mode (``--model-file``) on the example images.

MLServer cannot share the test venv with kserve: mlserver 1.7.1 caps fastapi below 0.116 (so starlette below
0.47) and kserve 0.20 and later need starlette 1.0 or later; installing it here would take kserve back to 0.16
and protobuf back to 5. So the fixture makes MLServer a venv of its own, once, under the user's cache
(``$XDG_CACHE_HOME/deploykit-tests``), from v2servers/requirements-mlserver.txt.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import SHAPES_IMAGES, LiveServer, free_port, run_cli, start_process

from deploykit.card import read_card
from deploykit.client import PredictClient, RequestError, ServerError
from deploykit.errors import ExitCode

pytestmark = pytest.mark.slow

FIXTURES = Path(__file__).resolve().parent / "v2servers"
MLSERVER_REQUIREMENTS = FIXTURES / "requirements-mlserver.txt"
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "deploykit-tests"
SERVED_NAME = "shapes-onnx"  # the model's name on MLServer and KServe, unlike the card's ("shapes")
START_TIMEOUT = 180  # seconds; MLServer imports a lot on a busy 2-core machine


def mlserver_venv() -> Path:
    """A venv with MLServer from requirements-mlserver.txt, made on first use and kept under CACHE.

    A lock keeps two test sessions from building it at once; a marker written last tells a finished venv
    from one whose build was interrupted, which is built again.
    """
    key = hashlib.sha256(MLSERVER_REQUIREMENTS.read_bytes() + sys.version.encode()).hexdigest()[:12]
    venv = CACHE / f"mlserver-{key}"
    done = venv / ".deploykit-complete"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f"mlserver-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(venv, ignore_errors=True)
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
            subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
                            "-r", str(MLSERVER_REQUIREMENTS)], check=True, timeout=1200)
            done.write_text("")
    return venv


def listening_addresses(port: int) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The local addresses of the sockets listening on ``port``, from /proc/net/tcp and tcp6 (Linux)."""
    found: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        with open(table) as rows:
            for row in list(rows)[1:]:
                local, state = row.split()[1], row.split()[3]
                address, _, hex_port = local.partition(":")
                if state != "0A" or int(hex_port, 16) != port:  # 0A: LISTEN
                    continue
                raw = bytes.fromhex(address)  # in 32-bit words, each in host (little-endian) order
                found.add(ipaddress.ip_address(b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))))
    return found


def assert_loopback_only(server: LiveServer, *ports: int) -> None:
    """Stop the server and fail unless every socket listening on ``ports`` is on a loopback address."""
    addresses = set().union(*(listening_addresses(port) for port in ports))
    outside = [a for a in addresses if not (a.is_loopback or (
        isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None and a.ipv4_mapped.is_loopback))]
    if outside:
        server.terminate()
        pytest.fail(f"{server.args} listens on {sorted(map(str, addresses))}, not only on loopback")


@pytest.fixture(scope="module")
def mlserver_server(shapes_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """MLServer with the example model in the ONNX Runtime runtime; its model metadata lists no tensors."""
    venv = mlserver_venv()
    repository = tmp_path_factory.mktemp("mlserver")
    port, grpc_port = free_port(), free_port()
    (repository / "settings.json").write_text(json.dumps({
        "host": "127.0.0.1", "http_port": port, "grpc_port": grpc_port, "metrics_endpoint": None,
        "parallel_workers": 0}))
    model_dir = repository / SERVED_NAME
    model_dir.mkdir()
    shutil.copy(shapes_onnx, model_dir / "model.onnx")
    (model_dir / "model-settings.json").write_text(json.dumps({
        "name": SERVED_NAME, "implementation": "mlserver_onnx.OnnxRuntime",
        "parameters": {"uri": "./model.onnx"}}))
    server = start_process([str(venv / "bin" / "mlserver"), "start", str(repository)], port,
                           repository / "mlserver.log", env={"PYTHONPATH": str(FIXTURES)},
                           timeout=START_TIMEOUT, cwd=repository)
    assert_loopback_only(server, port, grpc_port)
    yield server
    server.terminate()


@pytest.fixture(scope="module")
def kserve_server(shapes_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """KServe's ModelServer with a kserve.Model running the example model; its metadata lists the tensors."""
    workdir = tmp_path_factory.mktemp("kserve")
    port = free_port()
    server = start_process([sys.executable, str(FIXTURES / "kserve_onnx.py"), str(shapes_onnx), SERVED_NAME,
                            str(port)], port, workdir / "kserve.log", timeout=START_TIMEOUT, cwd=workdir)
    assert_loopback_only(server, port)
    yield server
    server.terminate()


@pytest.fixture(scope="module")
def local_records(shapes_onnx: Path) -> list[dict]:
    """Local mode (`--model-file`) on the example images: the reference for every server."""
    result = run_cli("predict", str(SHAPES_IMAGES), "--model-file", str(shapes_onnx))
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def server_and_name(request: pytest.FixtureRequest, server: str) -> tuple[LiveServer, str]:
    if server == "deploykit":
        return request.getfixturevalue("shapes_server"), "shapes"
    return request.getfixturevalue(f"{server}_server"), SERVED_NAME


# (binary, classification, tensors_from, extensions) that `predict --protocol v2` settles on by itself.
PLANS = {
    "deploykit": (True, True, "server", ("binary_tensor_data", "classification")),
    "mlserver": (False, False, "card", ()),
    "kserve": (False, False, "server", ("model_repository_extension",)),
}


@pytest.mark.parametrize("server", list(PLANS))
def test_the_client_speaks_what_each_server_lists(server: str, request: pytest.FixtureRequest,
                                                  shapes_onnx: Path) -> None:
    live, name = server_and_name(request, server)
    card = read_card(shapes_onnx)
    with PredictClient(live.url) as client:
        plan = client.v2_plan(name, card)
        forced = client.v2_plan(name, card, binary=not plan.binary)
    binary, classification, tensors_from, extensions = PLANS[server]
    assert (plan.binary, plan.classification, plan.tensors_from) == (binary, classification, tensors_from)
    assert plan.extensions == extensions
    assert (plan.input_name, plan.input_datatype, plan.output_name) == ("input", "FP32", "logits")
    assert plan.input_shape == (-1, 3, 64, 64)
    assert forced.binary is not plan.binary  # --binary / --no-binary win over what the server lists


@pytest.mark.parametrize(("server", "flags"), [
    ("deploykit", []), ("deploykit", ["--no-binary"]),
    ("mlserver", []), ("mlserver", ["--no-binary"]),
    ("kserve", []), ("kserve", ["--binary"]),
])
def test_top1_agrees_with_local_mode(server: str, flags: list[str], request: pytest.FixtureRequest,
                                     shapes_onnx: Path, local_records: list[dict]) -> None:
    live, name = server_and_name(request, server)
    result = run_cli("predict", str(SHAPES_IMAGES), "--url", live.url, "--protocol", "v2", "--model", name,
                     "--card", str(shapes_onnx), *flags)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["path"] for r in records] == [r["path"] for r in local_records]
    assert [r["label"] for r in records] == [r["label"] for r in local_records]
    assert {r["model"] for r in records} == {name}
    # deploykit's classification answer writes probabilities with 6 decimals; the others send the logits.
    assert np.allclose([r["probability"] for r in records], [r["probability"] for r in local_records],
                       atol=1e-4)


def test_binary_on_a_server_that_does_not_list_it_says_so(mlserver_server: LiveServer,
                                                           shapes_onnx: Path) -> None:
    result = run_cli("predict", str(SHAPES_IMAGES), "--url", mlserver_server.url, "--protocol", "v2",
                     "--model", SERVED_NAME, "--card", str(shapes_onnx), "--binary", "--retries", "0")
    assert result.returncode == ExitCode.CONNECTION, result.stderr
    assert result.stdout == ""
    (line,) = [line for line in result.stderr.splitlines() if line.strip()]
    # The exception that ends MLServer's traceback (which one depends on the bytes), not its first line.
    assert re.match(r"Error: The server answered HTTP 500: [\w.]+Error: ", line), line
    assert "Traceback" not in line
    assert "does not list in GET /v2 (it lists: none); pass --no-binary" in line


def test_server_messages_not_tracebacks(mlserver_server: LiveServer, kserve_server: LiveServer,
                                        shapes_onnx: Path) -> None:
    card = read_card(shapes_onnx)
    tensor = np.zeros((1, 3, 64, 64), dtype=np.float32)
    with PredictClient(mlserver_server.url, retries=0) as client:
        with pytest.raises(RequestError) as unknown:
            client.v2_plan("nope", card)
        assert (unknown.value.status, unknown.value.message) == (404, "Model nope not found (HTTP 404)")
        # FastAPI's validation error (422): its fields and messages.
        with pytest.raises(RequestError) as invalid:
            client.request("POST", f"/v2/models/{SERVED_NAME}/infer", json={"inputs": [{"name": "input"}]})
        assert invalid.value.status == 422
        assert "body.inputs.0.shape: Field required" in invalid.value.message
        # A crash in the runtime: MLServer answers a plain-text traceback; its last line is the message.
        wrong = dataclasses.replace(client.v2_plan(SERVED_NAME, card), input_name="image")
        with pytest.raises(ServerError) as crashed:
            client.predict_tensor_v2(tensor, card=card, plan=wrong)
        assert crashed.value.status == 500
        assert crashed.value.message.startswith("The server answered HTTP 500: ValueError: Required inputs")
    with PredictClient(kserve_server.url, retries=0) as client, pytest.raises(RequestError) as unknown:
        client.v2_plan("nope", card)
    assert unknown.value.status == 404
    assert "nope" in unknown.value.message


@pytest.mark.parametrize(("server", "missing"), [
    ("mlserver", f"the V2 metadata of '{SERVED_NAME}' lists no input or output names, shapes or datatypes"),
    ("kserve", f"the V2 metadata of '{SERVED_NAME}' names its tensors, but the preprocessing and labels are "
               "only in the card"),
])
def test_without_a_card_one_line_says_what_is_missing(server: str, missing: str,
                                                      request: pytest.FixtureRequest,
                                                      shapes_images: list[Path]) -> None:
    live, name = server_and_name(request, server)
    result = run_cli("predict", str(shapes_images[0]), "--url", live.url, "--protocol", "v2", "--model", name)
    assert result.returncode == ExitCode.USAGE
    (line,) = [line for line in result.stderr.splitlines() if line.strip()]
    assert missing in line
    assert "--card MODEL.onnx" in line
