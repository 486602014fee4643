"""`deploykit predict` and deploykit.predict: inputs, formats, order, exit codes, protocols, local mode.

Everything runs against a real `deploykit serve` subprocess on a loopback port (or ONNX Runtime in-process for
local mode); CLI tests run `python -m deploykit` in a fresh interpreter.
"""

from __future__ import annotations

import csv
import io
import json
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, SHAPES_FACTORY, LiveServer, free_port, run_cli
from PIL import Image

from deploykit.errors import ConnectionFailedError, DeployKitError, RequestError, UsageError
from deploykit.predict import ImageResult, ImageSource, expand_inputs, predict_images, run_ordered
from deploykit.runtime import Prediction

RECORD_KEYS = ["path", "model", "label", "index", "probability", "top_k", "latency_ms", "error"]


def true_label(path: str | Path) -> str:
    return Path(path).name.split("_")[-2] if "_" in Path(path).name else ""


def records(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


def run_predict_stdin(args: list[str], data: bytes) -> subprocess.CompletedProcess[bytes]:
    """Like run_cli, but stdin carries raw bytes (an image), which run_cli's text mode would re-encode."""
    return subprocess.run([sys.executable, "-m", "deploykit", "predict", *args], input=data,
                          capture_output=True, timeout=300, check=False)


@pytest.fixture(scope="module")
def many_images(shapes_images: list[Path], tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """60 images named NNN_<label>_<k>.jpg; every third one is a large (1600 px) copy, so that it takes longer
    to upload and decode and later, smaller ones overtake it under concurrency."""
    folder = tmp_path_factory.mktemp("many")
    paths = []
    for n in range(60):
        source = shapes_images[n % len(shapes_images)]
        target = folder / f"{n:03d}_{source.name}"
        if n % 3 == 0:
            big = Image.open(source).convert("RGB").resize((1600, 1600), Image.Resampling.BILINEAR)
            big.save(target, quality=95)
        else:
            target.write_bytes(source.read_bytes())
        paths.append(target)
    return paths


# ---- CLI against the server


def test_one_image_prints_one_json_record(shapes_server: LiveServer, shapes_images: list[Path]) -> None:
    image = shapes_images[0]
    result = run_cli("predict", str(image), "--url", shapes_server.url, "--top-k", "3")
    assert result.returncode == 0, result.stderr
    (record,) = records(result.stdout)  # not a TTY: JSON Lines, nothing decorative
    assert list(record) == RECORD_KEYS
    assert record["path"] == str(image)
    assert record["model"] == "shapes"
    assert record["label"] == true_label(image) == record["top_k"][0]["label"]
    assert record["index"] == record["top_k"][0]["index"]
    assert record["probability"] == record["top_k"][0]["probability"]
    assert len(record["top_k"]) == 3
    assert record["latency_ms"] > 0
    assert record["error"] is None
    assert result.stderr == ""


def test_directory_recursive_images_only_sorted(shapes_server: LiveServer, shapes_images: list[Path],
                                                tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    for i, image in enumerate(shapes_images):
        (tmp_path / ("sub" if i % 2 else "") / image.name).write_bytes(image.read_bytes())
    (tmp_path / "notes.txt").write_text("not an image")
    result = run_cli("predict", str(tmp_path), "--url", shapes_server.url, "--json")
    assert result.returncode == 0, result.stderr
    got = records(result.stdout)
    assert [r["path"] for r in got] == sorted(str(p) for p in tmp_path.rglob("*.jpg"))
    assert [r["label"] for r in got] == [true_label(r["path"]) for r in got]


def test_image_from_stdin(shapes_server: LiveServer, shapes_images: list[Path]) -> None:
    image = shapes_images[-1]
    result = run_predict_stdin(["-", "--url", shapes_server.url], image.read_bytes())
    assert result.returncode == 0, result.stderr
    (record,) = records(result.stdout.decode())
    assert record["path"] == "-"
    assert record["label"] == true_label(image)


def test_files_from_stdin_keeps_the_given_order(shapes_server: LiveServer, shapes_images: list[Path]) -> None:
    order = list(shapes_images)
    random.Random(7).shuffle(order)
    listing = "\n".join(str(p) for p in order) + "\n\n"
    result = run_cli("predict", "--files-from", "-", "--url", shapes_server.url, input=listing.encode())
    assert result.returncode == 0, result.stderr
    got = records(result.stdout)
    assert [r["path"] for r in got] == [str(p) for p in order]
    assert [r["label"] for r in got] == [true_label(p) for p in order]


def test_csv_output(shapes_server: LiveServer, shapes_images: list[Path]) -> None:
    images = shapes_images[:4]
    result = run_cli("predict", *map(str, images), "--url", shapes_server.url, "--format", "csv", "-k", "2")
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert result.stdout.splitlines()[0].startswith("path,model,label,index,probability,latency_ms,error")
    assert [r["path"] for r in rows] == [str(p) for p in images]
    for row in rows:
        assert row["label"] == true_label(row["path"])
        assert row["model"] == "shapes"
        assert 0 < float(row["probability"]) <= 1
        assert row["error"] == ""
        assert row["top_k"].split(";")[0].split(":")[0] == row["label"]
        assert len(row["top_k"].split(";")) == 2


def test_table_format(shapes_server: LiveServer, shapes_images: list[Path]) -> None:
    result = run_cli("predict", str(shapes_images[0]), "--url", shapes_server.url, "--format", "table")
    assert result.returncode == 0, result.stderr
    assert "Image" in result.stdout
    assert true_label(shapes_images[0]) in result.stdout
    assert "1 image in" in result.stderr


def test_results_stay_in_input_order_under_concurrency(shapes_server: LiveServer,
                                                        many_images: list[Path]) -> None:
    order = list(many_images)
    random.Random(3).shuffle(order)
    args = ["predict", *map(str, order), "--url", shapes_server.url, "-k", "2"]
    concurrent = run_cli(*args, "--concurrency", "8")
    sequential = run_cli(*args, "--concurrency", "1")
    assert concurrent.returncode == 0, concurrent.stderr
    assert sequential.returncode == 0, sequential.stderr
    got, expected = records(concurrent.stdout), records(sequential.stdout)
    assert [r["path"] for r in got] == [str(p) for p in order]
    # Each record belongs to its own path: the same answer as when the images are sent one by one.
    for record, reference in zip(got, expected, strict=True):
        assert record["path"] == reference["path"]
        assert [c["index"] for c in record["top_k"]] == [c["index"] for c in reference["top_k"]]
        assert record["probability"] == pytest.approx(reference["probability"], abs=1e-5)
    small = [r for r in got if int(Path(r["path"]).name[:3]) % 3]  # unscaled copies of the examples
    assert [r["label"] for r in small] == [true_label(r["path"]) for r in small]


def test_unreachable_server_exits_4_with_one_line(shapes_images: list[Path]) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    result = run_cli("predict", str(shapes_images[0]), "--url", url, timeout=60)
    assert result.returncode == 4
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Cannot reach the server" in lines[0]
    assert url in lines[0]
    assert "Traceback" not in result.stderr


def test_broken_image_among_good_ones_exits_5(shapes_server: LiveServer, shapes_images: list[Path],
                                              tmp_path: Path) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(shapes_images[0].read_bytes()[:40])  # a JPEG header, then nothing
    missing = tmp_path / "missing.jpg"
    inputs = [shapes_images[0], broken, shapes_images[1], missing, shapes_images[2]]
    result = run_cli("predict", *map(str, inputs), "--url", shapes_server.url)
    assert result.returncode == 5
    got = records(result.stdout)
    assert [r["path"] for r in got] == [str(p) for p in inputs]
    for record in (got[0], got[2], got[4]):
        assert record["error"] is None
        assert record["label"] == true_label(record["path"])
    for record in (got[1], got[3]):
        assert record["label"] is None
        assert record["index"] is None
        assert record["probability"] is None
        assert record["top_k"] == []
        assert record["error"]
    assert "missing.jpg" in got[3]["error"]
    assert "2 of 5 images failed" in result.stderr


def test_unknown_model_message_shown_not_per_image(shapes_server: LiveServer,
                                                   shapes_images: list[Path]) -> None:
    result = run_cli("predict", *map(str, shapes_images[:3]), "--url", shapes_server.url, "--model", "nope")
    assert result.returncode == 1
    assert result.stdout == ""
    assert "Unknown model 'nope'" in result.stderr
    assert "HTTP 404" in result.stderr


def test_v2_protocol_with_card_from_server_and_from_file(shapes_server: LiveServer, shapes_onnx: Path,
                                                         shapes_images: list[Path]) -> None:
    args = [*map(str, shapes_images), "--url", shapes_server.url, "-k", "3"]
    rest = records(run_cli("predict", *args).stdout)
    from_server = run_cli("predict", *args, "--protocol", "v2")
    from_file = run_cli("predict", *args, "--protocol", "v2", "--card", str(shapes_onnx), "--model", "shapes")
    for result in (from_server, from_file):
        assert result.returncode == 0, result.stderr
        got = records(result.stdout)
        assert [r["path"] for r in got] == [r["path"] for r in rest]
        assert [r["label"] for r in got] == [true_label(p) for p in shapes_images]
        assert [[c["index"] for c in r["top_k"]] for r in got] == \
            [[c["index"] for c in r["top_k"]] for r in rest]
        assert np.allclose([r["probability"] for r in got], [r["probability"] for r in rest], atol=1e-4)
        assert {r["model"] for r in got} == {"shapes"}


def test_v2_reports_undecodable_image_per_image(shapes_server: LiveServer, shapes_images: list[Path],
                                                tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"plain text")
    result = run_cli("predict", str(bad), str(shapes_images[0]), "--url", shapes_server.url,
                     "--protocol", "v2")
    assert result.returncode == 5
    got = records(result.stdout)
    assert "not an image" in got[0]["error"]
    assert got[1]["label"] == true_label(shapes_images[0])


def test_missing_name_with_brackets_is_one_failed_image(shapes_onnx: Path, shapes_images: list[Path],
                                                        tmp_path: Path) -> None:
    missing = tmp_path / "odd[2].jpg"  # a name, not a pattern: it must not stop the run as an empty glob
    result = run_cli("predict", str(missing), str(shapes_images[0]), "--model-file", str(shapes_onnx))
    assert result.returncode == 5, result.stderr
    first, second = records(result.stdout)
    assert first["path"] == str(missing)
    assert first["error"] == f"No such file: {str(missing)!r}."
    assert second["label"] == true_label(shapes_images[0])
    pattern = run_cli("predict", str(tmp_path / "[ab]*.jpg"), "--model-file", str(shapes_onnx))
    assert pattern.returncode == 2  # a real pattern that matches nothing is still a usage error
    assert "No image files match" in pattern.stderr


def test_table_shows_a_long_error_in_full(shapes_onnx: Path, shapes_images: list[Path],
                                          tmp_path: Path) -> None:
    missing = tmp_path / ("a-long-folder-name-" * 4) / "missing_zz.jpg"
    result = run_cli("predict", str(missing), str(shapes_images[0]), "--model-file", str(shapes_onnx),
                     "--format", "table", env={"COLUMNS": "70"})
    assert result.returncode == 5, result.stderr
    # The third column of the rows below the header, joined without the line breaks the table adds: the whole
    # message, not "No such file: '/tm…".
    cells = [line.split("\u2502")[2] for line in result.stdout.splitlines()[2:] if "\u2502" in line]
    message = f"No such file: {str(missing)!r}."
    assert "".join(message.split()) in "".join("".join(cells).split())
    assert "\u2026" not in result.stdout


def test_local_mode_gives_the_same_top1_as_the_server(shapes_server: LiveServer, shapes_onnx: Path) -> None:
    folder = REPO / "examples" / "shapes" / "images"
    served = run_cli("predict", str(folder), "--url", shapes_server.url)
    local = run_cli("predict", str(folder), "--model-file", str(shapes_onnx),
                    env={"DEPLOYKIT_URL": shapes_server.url})  # the env URL must not conflict with local mode
    assert served.returncode == 0, served.stderr
    assert local.returncode == 0, local.stderr
    a, b = records(served.stdout), records(local.stdout)
    assert [r["path"] for r in a] == [r["path"] for r in b]
    assert [r["label"] for r in b] == [r["label"] for r in a] == [true_label(r["path"]) for r in a]
    assert np.allclose([r["probability"] for r in a], [r["probability"] for r in b], atol=1e-5)
    assert {r["model"] for r in b} == {"shapes"}


@pytest.fixture(scope="module")
def static_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example model exported with a fixed batch of 2 (`export --static-batch 2`)."""
    from deploykit.export import export_model

    return export_model(SHAPES_FACTORY, static_batch=2,
                        output=tmp_path_factory.mktemp("static") / "static2.onnx").path


def test_static_batch_model_locally_and_over_v2(static_onnx: Path, shapes_images: list[Path],
                                                live_server_factory: Callable[..., LiveServer]) -> None:
    """One image at a time is padded to the model's batch of 2 (V2: Triton's max_batch_size 0 has no
    batching, so the request must carry the full shape)."""
    images = [str(p) for p in shapes_images[:3]]
    server = live_server_factory(str(static_onnx))
    for args in (["--model-file", str(static_onnx)], ["--url", server.url, "--protocol", "v2"]):
        result = run_cli("predict", *images, *args)
        assert result.returncode == 0, result.stderr
        assert [r["label"] for r in records(result.stdout)] == [true_label(p) for p in images]


def test_model_that_outputs_nan_gives_errors_not_predictions(nan_shapes_onnx: Path,
                                                             shapes_images: list[Path]) -> None:
    result = run_cli("predict", str(shapes_images[0]), "--model-file", str(nan_shapes_onnx))
    assert result.returncode == 5, result.stderr
    (record,) = [json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in the output"))
                 for line in result.stdout.splitlines()]
    assert record["label"] is None
    assert record["probability"] is None
    assert record["top_k"] == []
    assert "not a finite number (NaN or infinity)" in record["error"]


def test_api_key_option_and_environment(shapes_onnx: Path, shapes_images: list[Path],
                                        live_server_factory: Callable[..., LiveServer]) -> None:
    server = live_server_factory(str(shapes_onnx), "--api-key", "k3y")
    image = str(shapes_images[0])
    refused = run_cli("predict", image, "--url", server.url, env={"DEPLOYKIT_API_KEY": ""})
    assert refused.returncode == 1
    assert "HTTP 401" in refused.stderr
    assert "--api-key" in refused.stderr
    assert run_cli("predict", image, "--url", server.url, "--api-key", "k3y").returncode == 0
    from_env = run_cli("predict", image, env={"DEPLOYKIT_URL": server.url, "DEPLOYKIT_API_KEY": "k3y"})
    assert from_env.returncode == 0, from_env.stderr
    assert records(from_env.stdout)[0]["label"] == true_label(image)


@pytest.mark.parametrize(("args", "message"), [
    ([], "No images given"),
    (["{img}", "--card", "{onnx}"], "--card is only used with --protocol v2"),
    (["{img}", "--no-binary"], "--no-binary is only used with --protocol v2"),
    (["{img}", "--model-file", "{onnx}", "--url", "http://127.0.0.1:1"], "not both"),
    (["{empty}"], "No image files in directory"),
    (["{empty}/*.jpg"], "No image files match"),
    (["-", "--files-from", "-"], "Standard input can be read only once"),
    (["{img}", "--top-k", "0"], "--top-k"),
    (["{img}", "--protocol", "grpc"], "--protocol"),
    (["{img}", "--url", "ftp://127.0.0.1:5000"], "Invalid --url 'ftp://127.0.0.1:5000'"),
    (["{img}", "--url", "http://127.0.0.1:99999", "--protocol", "v2"], "Invalid --url"),
    (["{img}", "--url", "http://[bad"], "Invalid --url"),
    (["{img}", "--timeout", "nan"], "--timeout"),
    (["{img}", "--timeout", "inf"], "--timeout must be a positive, finite number"),
    (["{img}", "--shrink", "--protocol", "v2"], "--shrink is only used with the REST protocol"),
    (["{img}", "--no-shrink", "--model-file", "{onnx}"], "--no-shrink is only used with the REST protocol"),
    (["{img}", "--shrink", "--exact-decode"], "give one or the other"),
])
def test_usage_errors_exit_2(args: list[str], message: str, shapes_images: list[Path], shapes_onnx: Path,
                             tmp_path: Path) -> None:
    values = {"img": str(shapes_images[0]), "onnx": str(shapes_onnx), "empty": str(tmp_path)}
    result = run_cli("predict", *(a.format(**values) for a in args), input=b"")
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_help_documents_exit_codes() -> None:
    result = run_cli("predict", "--help", env={"COLUMNS": "200"})
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "Exit codes: 0 every image predicted" in text
    assert "4 server unreachable" in text
    assert "5 some images failed" in text


def test_predict_never_imports_torch(shapes_server: LiveServer, shapes_images: list[Path]) -> None:
    """The whole `deploykit predict` process against a server: no torch, onnxruntime or onnx; the REST path
    (the server preprocesses) not even NumPy or Pillow."""
    probe = (
        "import atexit, sys\n"
        "atexit.register(lambda: sys.stderr.write('HEAVY=' + ','.join(sorted(m for m in "
        "('torch', 'torchvision', 'onnxruntime', 'onnx', 'numpy', 'PIL') if m in sys.modules)) + '\\n'))\n"
        "from deploykit.cli import main\n"
        "main(sys.argv[1:])\n"
    )
    for extra, allowed in (([], ""), (["--protocol", "v2"], "PIL,numpy")):
        result = subprocess.run([sys.executable, "-c", probe, "predict", str(shapes_images[0]), "--url",
                                 shapes_server.url, *extra], capture_output=True, text=True, timeout=120,
                                check=False)
        assert result.returncode == 0, result.stderr
        assert f"HEAVY={allowed}\n" in result.stderr, result.stderr
        assert records(result.stdout)[0]["label"] == true_label(shapes_images[0])


# ---- library


def test_predict_images_library_run(shapes_server: LiveServer, shapes_images: list[Path]) -> None:
    seen: list[ImageResult] = []
    run = predict_images([str(p) for p in shapes_images], url=shapes_server.url, top_k=2,
                         on_result=seen.append)
    assert bool(run)
    assert run.total == run.succeeded == len(shapes_images)
    assert run.failed == 0
    assert list(run.results) == seen
    assert [r.best.label for r in run.results if r.best] == [true_label(p) for p in shapes_images]
    data = run.to_dict()
    assert data["mode"] == "rest"
    assert data["total"] == len(shapes_images)
    assert data["results"][0] == run.results[0].to_dict()
    assert "images in" in str(run)


def test_predict_images_unreachable_raises(shapes_images: list[Path]) -> None:
    with pytest.raises(ConnectionFailedError):
        predict_images([str(shapes_images[0])], url=f"127.0.0.1:{free_port()}", retries=0)


def test_predict_images_unknown_model_raises(shapes_server: LiveServer, shapes_images: list[Path]) -> None:
    with pytest.raises(RequestError) as info:
        predict_images([str(p) for p in shapes_images], url=shapes_server.url, model="nope")
    assert info.value.status == 404


def test_local_mode_library(shapes_onnx: Path, shapes_images: list[Path]) -> None:
    run = predict_images([str(p) for p in shapes_images], model_file=shapes_onnx, top_k=1, concurrency=2)
    assert run.mode == "local"
    assert [r.best.label for r in run.results if r.best] == [true_label(p) for p in shapes_images]


def test_expand_inputs_globs_dirs_files_from_and_stdin(shapes_images: list[Path], tmp_path: Path) -> None:
    folder = shapes_images[0].parent
    listing = tmp_path / "list.txt"
    listing.write_text(f"{shapes_images[3]}\n\n{folder}\n")
    sources = expand_inputs([str(folder / "star_*.jpg"), "-", shapes_images[0]], files_from=listing,
                            stdin=io.BytesIO(b"bytes"))
    paths = [s.path for s in sources]
    stars = sorted(str(p) for p in folder.glob("star_*.jpg"))
    assert paths == [*stars, "-", str(shapes_images[0]), str(shapes_images[3]), *map(str, shapes_images)]
    assert sources[len(stars)].data == b"bytes"
    with pytest.raises(UsageError):
        expand_inputs(["-"], files_from="-", stdin=io.BytesIO(b""))
    with pytest.raises(DeployKitError, match="No such file"):
        ImageSource(str(tmp_path / "gone.jpg")).read()


def test_run_ordered_delivers_in_input_order_when_later_items_finish_first() -> None:
    """The first items are the slowest, so completions arrive in reverse; delivery must still be in order."""
    finished: list[int] = []
    lock = threading.Lock()

    def slow_first(source: ImageSource) -> tuple[str, tuple[Prediction, ...]]:
        n = int(source.path)
        time.sleep(0.02 * (8 - n % 8))
        with lock:
            finished.append(n)
        return "m", (Prediction(n, str(n), 1.0),)

    delivered: list[str] = []
    results = run_ordered(slow_first, [ImageSource(str(n)) for n in range(24)], concurrency=8,
                          on_result=lambda r: delivered.append(r.path))
    assert delivered == [str(n) for n in range(24)] == [r.path for r in results]
    assert finished != sorted(finished)  # completions really were out of order


def test_run_ordered_records_image_errors_and_stops_on_fatal_ones() -> None:
    """An image error is recorded and the run goes on; an unreachable server stops it after the earlier
    results were delivered."""

    def flaky(source: ImageSource) -> tuple[str, tuple[Prediction, ...]]:
        n = int(source.path)
        if n == 2:
            raise DeployKitError("not an image")
        if n == 6:
            raise ConnectionFailedError("Cannot reach the server")
        time.sleep(0.01 * (n % 3))
        return "m", (Prediction(0, "a", 1.0),)

    delivered: list[ImageResult] = []
    with pytest.raises(ConnectionFailedError):
        run_ordered(flaky, [ImageSource(str(n)) for n in range(40)], concurrency=4, default_model="m",
                    on_result=delivered.append)
    assert [r.path for r in delivered] == [str(n) for n in range(6)]
    assert delivered[2].error == "not an image"
    assert delivered[2].model == "m"
    assert delivered[2].top_k == ()
    assert all(r.ok for i, r in enumerate(delivered) if i != 2)


def test_reader_closing_the_pipe_early_is_quiet(shapes_server: LiveServer, many_images: list[Path]) -> None:
    """`deploykit predict DIR | head -1`: no BrokenPipeError traceback, no error exit."""
    # Six times the folder: ~180 KB of output, more than a pipe buffers, so writes hit the closed pipe.
    folder = str(many_images[0].parent)
    process = subprocess.Popen([sys.executable, "-m", "deploykit", "predict", *[folder] * 6, "--url",
                                shapes_server.url], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None
    assert process.stderr is not None
    first = process.stdout.readline()
    process.stdout.close()  # as `head -1` does after one line
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=120) == 0, stderr
    assert json.loads(first)["error"] is None
    assert "Traceback" not in stderr
    assert "BrokenPipe" not in stderr


# ---- decoding: fast by default, as the server; --exact-decode as torchvision


def torchvision_probabilities(path: Path, onnx_path: Path) -> np.ndarray:
    """The model's probabilities on the image through torchvision's whole pipeline (a full decode)."""
    from torchvision import transforms

    from deploykit.runtime import Predictor

    predictor = Predictor.open(onnx_path)
    pp = predictor.card.preprocess
    pipeline = transforms.Compose([transforms.Resize(pp.resize), transforms.CenterCrop((pp.height, pp.width)),
                                   transforms.ToTensor(), transforms.Normalize(pp.mean, pp.std)])
    with Image.open(path) as image:
        x = pipeline(image.convert("RGB")).numpy()[None]
    return predictor.probabilities(x)[0]


def by_index(result: ImageResult) -> dict[int, float]:
    return {p.index: p.probability for p in result.top_k}


def test_exact_decode_is_torchvisions_pipeline_locally_and_over_v2(
        shapes_server: LiveServer, shapes_onnx: Path, phone_jpeg_file: Path) -> None:
    from deploykit.images import load_tensor
    from deploykit.runtime import Predictor

    expected = torchvision_probabilities(phone_jpeg_file, shapes_onnx)
    image = [str(phone_jpeg_file)]
    local = predict_images(image, model_file=shapes_onnx, top_k=6, exact_decode=True).results[0]
    v2 = predict_images(image, url=shapes_server.url, protocol="v2", top_k=6, exact_decode=True).results[0]
    for result, atol in ((local, 1e-6), (v2, 1e-5)):  # V2's classification extension: 6 decimals
        got = by_index(result)
        np.testing.assert_allclose([got[i] for i in range(6)], expected, rtol=0, atol=atol)
    # By default the photo is decoded at the size the model needs, as deploykit serve decodes it.
    data = phone_jpeg_file.read_bytes()
    predictor = Predictor.open(shapes_onnx)
    fast = load_tensor(data, predictor.card.preprocess)
    assert not np.array_equal(fast, load_tensor(data, predictor.card.preprocess, exact=True))
    fast_expected = predictor.probabilities(fast[None])[0]
    local_fast = by_index(predict_images(image, model_file=shapes_onnx, top_k=6).results[0])
    assert [local_fast[i] for i in range(6)] == pytest.approx(fast_expected.tolist(), abs=1e-7)
    served = by_index(predict_images(image, url=shapes_server.url, top_k=6, shrink=False).results[0])
    assert [served[i] for i in range(6)] == pytest.approx(fast_expected.tolist(), abs=1e-6)
