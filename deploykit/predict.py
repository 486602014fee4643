"""Predict many images against a server (deploykit REST or Open Inference Protocol V2) or in-process.

``predict_images`` expands paths, globs, directories, ``-`` (stdin bytes) and ``files_from`` lists into an
ordered list of images, classifies them concurrently over keep-alive connections, and hands each result to
``on_result`` in input order as soon as it and all earlier ones are done. It never prints and never imports
torch; ONNX Runtime is imported only for local mode (``model_file``).
"""

from __future__ import annotations

import glob
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from deploykit.errors import (
    ConnectionFailedError,
    DeployKitError,
    NonFiniteOutputError,
    RequestError,
    UsageError,
)

if TYPE_CHECKING:
    from deploykit.card import ModelCard, Preprocess
    from deploykit.client import PredictClient, V2Plan
    from deploykit.runtime import Prediction, Predictor

# Four requests in flight: enough to overlap the client's I/O and JSON work with the server's inference and to
# give a batching server something to batch, without queueing deeply on a small (2-4 core) server, which only
# adds latency. benchmarks/bench_predict.py measures 1, 2, 4 and 8.
DEFAULT_CONCURRENCY = 4
PROTOCOLS = ("rest", "v2")
# 4xx answers that concern one image (or, for 429, one request still throttled after the retries); any other
# 4xx (401, 403, 404 unknown model...) would fail every image the same way, so it stops the run instead.
PER_IMAGE_STATUSES = frozenset({400, 413, 415, 422, 429})
_GLOB_CHARS = frozenset("*?[")
#: With --shrink, a file smaller than this goes as it is without being decoded: shrinking it could save a few
#: milliseconds of upload at most, and a run of small images then needs neither NumPy nor Pillow.
SHRINK_MIN_BYTES = 64_000


@dataclass(frozen=True)
class ImageSource:
    """One input image: a file path (read when predicted) or bytes already read (stdin, shown as ``-``)."""

    path: str
    data: bytes | None = None

    def read(self) -> bytes:
        if self.data is not None:
            return self.data
        try:
            return Path(self.path).read_bytes()
        except FileNotFoundError:
            raise DeployKitError(f"No such file: {self.path!r}.") from None
        except OSError as exc:
            raise DeployKitError(f"Cannot read {self.path!r}: {exc.strerror}.") from exc


@dataclass(frozen=True)
class ImageResult:
    """The prediction for one image, or why it failed (``error``); ``top_k`` is highest first."""

    path: str
    model: str | None
    top_k: tuple[Prediction, ...] = ()
    latency_ms: float | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def best(self) -> Prediction | None:
        return self.top_k[0] if self.top_k else None

    def to_dict(self) -> dict[str, Any]:
        """The JSON Lines record: path, model, label, index, probability, top_k, latency_ms, error."""
        best = self.best
        return {
            "path": self.path,
            "model": self.model,
            "label": best.label if best else None,
            "index": best.index if best else None,
            "probability": best.probability if best else None,
            "top_k": [p.to_dict() for p in self.top_k],
            "latency_ms": None if self.latency_ms is None else round(self.latency_ms, 2),
            "error": self.error,
        }

    def __str__(self) -> str:
        if self.error is not None:
            return f"{self.path}: error: {self.error}"
        classes = ", ".join(f"{p.label} {p.probability:.3f}" for p in self.top_k)
        return f"{self.path}: {classes} ({self.latency_ms or 0:.1f} ms)"


@dataclass(frozen=True)
class PredictRun:
    """All results of one run in input order, with counts and wall time. Truthy when every image succeeded."""

    results: tuple[ImageResult, ...]
    mode: str
    target: str
    concurrency: int
    wall_time_s: float

    @property
    def total(self) -> int:
        return len(self.results)

    @property
    def failed(self) -> int:
        return sum(1 for r in self.results if not r.ok)

    @property
    def succeeded(self) -> int:
        return self.total - self.failed

    @property
    def images_per_second(self) -> float:
        return self.total / self.wall_time_s if self.wall_time_s > 0 else 0.0

    def __bool__(self) -> bool:
        return self.failed == 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "target": self.target,
            "concurrency": self.concurrency,
            "total": self.total,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "wall_time_s": round(self.wall_time_s, 4),
            "images_per_second": round(self.images_per_second, 2),
            "results": [r.to_dict() for r in self.results],
        }

    def summary(self) -> str:
        failed = f", {self.failed} failed" if self.failed else ""
        return (f"{self.total} image{'s' if self.total != 1 else ''} in {self.wall_time_s:.2f} s "
                f"({self.images_per_second:.1f}/s){failed}")

    def __str__(self) -> str:
        return "\n".join([*(str(r) for r in self.results), self.summary()])


# ---- input expansion


def _read_stdin(stdin: BinaryIO | None, used: list[str], what: str) -> bytes:
    if used:
        raise UsageError(f"Standard input can be read only once, but both {used[0]} and {what} ask for it.")
    used.append(what)
    if stdin is None:
        import sys

        stdin = sys.stdin.buffer
    return stdin.read()


def _is_pattern(item: str) -> bool:
    """Whether a path that does not exist is a glob: it has ``*`` or ``?``, or brackets that match files.

    Brackets alone are more often part of a name (``photo[2].jpg``) than a pattern; such a missing name
    gets its own "No such file" result, like any plain path, instead of stopping the run.
    """
    if not _GLOB_CHARS & set(item):
        return False
    return bool(set("*?") & set(item)) or bool(glob.glob(item, recursive=True))


def _expand_one(item: str, *, allow_glob: bool) -> list[ImageSource]:
    path = Path(item)
    if path.is_dir():
        from deploykit.images import iter_image_files

        files = iter_image_files(path)
        if not files:
            raise UsageError(f"No image files in directory {item!r}.",
                             hint="Images need a suffix such as .jpg, .png or .webp.")
        return [ImageSource(str(f)) for f in files]
    if allow_glob and not path.exists() and _is_pattern(item):
        from deploykit.images import is_image_path, iter_image_files

        sources: list[ImageSource] = []
        for match in sorted(glob.glob(item, recursive=True)):
            if Path(match).is_dir():
                sources += [ImageSource(str(f)) for f in iter_image_files(match)]
            elif is_image_path(match):
                sources.append(ImageSource(match))
        if not sources:
            raise UsageError(f"No image files match {item!r}.")
        return sources
    # A plain path is kept even when it is missing or has an unusual suffix: the user named it, so it gets
    # its own result (an error if it cannot be read), like `cat` reporting one missing file among many.
    return [ImageSource(item)]


def expand_inputs(inputs: Iterable[str | Path | ImageSource], *, files_from: str | Path | None = None,
                  stdin: BinaryIO | None = None) -> list[ImageSource]:
    """Turn paths, globs, directories (recursively, image files only), ``-`` and a ``files_from`` list into
    images, in the order given (``files_from`` entries after ``inputs``).

    Raises:
        UsageError: nothing to predict, stdin asked for twice, an empty directory, or a glob matching nothing.
    """
    used_stdin: list[str] = []
    sources: list[ImageSource] = []
    for item in inputs:
        if isinstance(item, ImageSource):
            sources.append(item)
        elif str(item) == "-":
            sources.append(ImageSource("-", _read_stdin(stdin, used_stdin, "the image '-'")))
        else:
            sources += _expand_one(str(item), allow_glob=True)
    if files_from is not None:
        if str(files_from) == "-":
            text = _read_stdin(stdin, used_stdin, "--files-from -").decode("utf-8", "surrogateescape")
        else:
            try:
                text = Path(files_from).read_text("utf-8", "surrogateescape")
            except OSError as exc:
                raise UsageError(f"Cannot read the --files-from list {str(files_from)!r}: "
                                 f"{exc.strerror}.") from exc
        for line in text.splitlines():
            # Names come from tools like `find`: taken literally (no globbing), only the line ending removed.
            if line.strip():
                sources += _expand_one(line, allow_glob=False)
    if not sources:
        raise UsageError("No images given.",
                         hint="Pass image files, directories or globs, '-' for stdin, or --files-from FILE.")
    return sources


# ---- predictors: one callable per mode, ImageSource -> (model, top_k)

Predict = Callable[[ImageSource], "tuple[str, tuple[Prediction, ...]]"]


class _Shrinker:
    """Reduces large images to the size a deploykit server's model needs, before they are sent (``--shrink``).

    The model's preprocessing comes from the server's card (``GET /models``), read once, when the first image
    large enough to shrink comes; a server that gives no card gets every image as it is. See
    ``images.shrink_image`` for what is sent and why the server's answer stays the same.
    """

    def __init__(self, client: PredictClient, model: str | None) -> None:
        self._client = client
        self._model = model
        self._lock = threading.Lock()
        self._read = False
        self._preprocess: Preprocess | None = None

    def preprocess(self) -> Preprocess | None:
        """The model's preprocessing from the server, or None when it gives no card.

        Raises:
            ConnectionFailedError: the server cannot be reached or answers 5xx (which would stop the run).
        """
        with self._lock:
            if not self._read:
                try:
                    self._preprocess = self._client.model_card(self._model).preprocess
                except ConnectionFailedError:
                    raise
                except (DeployKitError, KeyError, TypeError, ValueError):
                    # No card (not a deploykit server, an unknown model, a missing key): the upload of the
                    # image itself then gets the server's own answer, as without --shrink.
                    self._preprocess = None
                self._read = True
            return self._preprocess

    def shrink(self, data: bytes) -> bytes:
        """``data`` re-encoded at the size the model resizes it to, or ``data`` itself when that would not
        make it smaller (a small image) or it cannot be decoded (the server then says why)."""
        if len(data) < SHRINK_MIN_BYTES:
            return data
        pp = self.preprocess()
        if pp is None:
            return data
        from deploykit.images import InvalidImageError, shrink_image

        try:
            smaller = shrink_image(data, pp)
        except InvalidImageError:
            return data
        return data if smaller is None or len(smaller) >= len(data) else smaller


def _rest_predictor(client: PredictClient, model: str | None, top_k: int, *, shrink: bool) -> Predict:
    shrinker = _Shrinker(client, model) if shrink else None

    def run(source: ImageSource) -> tuple[str, tuple[Prediction, ...]]:
        data = source.read()
        if shrinker is not None:
            data = shrinker.shrink(data)
        answer = client.predict_bytes(data, Path(source.path).name if source.data is None else None,
                                      model=model, top_k=top_k)
        return answer.model, answer.top_k

    return run


def _v2_predictor(client: PredictClient, card: ModelCard, plan: V2Plan, top_k: int, *, exact: bool
                  ) -> Predict:
    def run(source: ImageSource) -> tuple[str, tuple[Prediction, ...]]:
        return plan.model, client.predict_image_v2(source.read(), card=card, plan=plan, top_k=top_k,
                                                   exact=exact)

    return run


def _local_predictor(predictor: Predictor, top_k: int, *, exact: bool) -> Predict:
    import numpy as np

    from deploykit.images import load_tensor
    from deploykit.runtime import pad_batch
    from deploykit.runtime import top_k as best_classes

    def run(source: ImageSource) -> tuple[str, tuple[Prediction, ...]]:
        tensor = load_tensor(source.read(), predictor.card.preprocess, exact=exact)[None]
        # A static-batch model takes exactly its batch size: pad with zeros and keep the first row.
        probabilities = predictor.probabilities(pad_batch(tensor, predictor.card.fixed_batch))[:1]
        if not np.isfinite(probabilities).all():
            raise NonFiniteOutputError
        return predictor.name, tuple(best_classes(probabilities, top_k, predictor.card.labels)[0])

    return run


def _v2_card(client: PredictClient, model: str | None, card_file: str | Path | None
             ) -> tuple[str, ModelCard]:
    """The model's name on the server and its card."""
    if card_file is not None:
        from deploykit.card import read_card

        card = read_card(card_file)
        return model or card.name, card
    try:
        if model is None:
            return client.default_model()
        return model, client.model_card(model)
    except RequestError as exc:
        if exc.status not in (404, 405):
            raise
        if model is not None and _is_deploykit(client):
            raise  # a deploykit server that does not serve this model: its message says which it does
        raise UsageError(f"{client.url} gives no model card (GET /models: HTTP {exc.status})"
                         f"{_missing(client, model)}.",
                         hint="With --protocol v2 on a server other than deploykit, pass the model's ONNX "
                         "file with --card MODEL.onnx (and --model NAME).") from exc


def _missing(client: PredictClient, model: str | None) -> str:
    """What the server's V2 metadata cannot stand in for when there is no card (for the error message)."""
    if model is None:
        return ", and no --model names the model to ask the V2 metadata about"
    metadata = client.v2_model_metadata(model)  # RequestError for an unknown model: that is the message then
    if metadata.get("inputs") and metadata.get("outputs"):
        return (f"; the V2 metadata of {model!r} names its tensors, but the preprocessing and labels are "
                "only in the card")
    return f", and the V2 metadata of {model!r} lists no input or output names, shapes or datatypes"


def _is_deploykit(client: PredictClient) -> bool:
    try:
        client.models()
    except (DeployKitError, KeyError, TypeError):
        return False
    return True


def check_options(*, protocol: str = "rest", url: str | None = None, model: str | None = None,
                  model_file: str | Path | None = None, card_file: str | Path | None = None, top_k: int = 5,
                  concurrency: int = DEFAULT_CONCURRENCY, retries: int = 3, timeout: float = 30.0,
                  binary: bool | None = None, exact_decode: bool = False, shrink: bool | None = None) -> None:
    """Raise ``UsageError`` for contradictory or out-of-range options of :func:`predict_images`."""
    if protocol not in PROTOCOLS:
        raise UsageError(f"Unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}.")
    if model_file is not None and url is not None:
        raise UsageError("Give either --url (a server) or --model-file (local mode), not both.")
    if model_file is not None and (model is not None or card_file is not None or protocol != "rest"):
        raise UsageError("--model, --card and --protocol choose a model on a server; with --model-file the "
                         "model and its card come from the file.")
    if card_file is not None and protocol != "v2":
        raise UsageError("--card is only used with --protocol v2 (the REST API preprocesses on the server).")
    if binary is not None and protocol != "v2":
        raise UsageError(f"--{'' if binary else 'no-'}binary is only used with --protocol v2 (how tensors "
                         "are sent to an Open Inference Protocol server).")
    if shrink is not None and (model_file is not None or protocol != "rest"):
        raise UsageError(f"--{'' if shrink else 'no-'}shrink is only used with the REST protocol (what is "
                         "uploaded to a deploykit server); --protocol v2 and --model-file decode the images "
                         "here and send no image.")
    if shrink and exact_decode:
        raise UsageError("--shrink sends large images reduced (decoded at the size the model needs), "
                         "--exact-decode asks for the full decoding: give one or the other.")
    if top_k < 1:
        raise UsageError(f"--top-k must be at least 1, got {top_k}.")
    if concurrency < 1:
        raise UsageError(f"--concurrency must be at least 1, got {concurrency}.")
    if retries < 0:
        raise UsageError(f"--retries must be 0 or more, got {retries}.")
    if not 0 < timeout < math.inf:  # NaN fails the comparison too
        raise UsageError(f"--timeout must be a positive, finite number of seconds, got {timeout}.")
    if url is not None:
        from deploykit.client import normalize_url

        normalize_url(url)  # UsageError for a URL that no request could use


def _is_fatal(exc: BaseException) -> bool:
    """Errors that would fail every remaining image the same way stop the run instead of being recorded.

    A 5xx answer (for 503, after the retries) stops the run too: the server is failing, not the image, and
    the documented exit code for that is 4. An answer that cannot be parsed (a ServerError with a 2xx status)
    concerns one image.
    """
    from deploykit.client import ServerError

    if isinstance(exc, ServerError):
        return exc.status >= 500
    if isinstance(exc, ConnectionFailedError):
        return True
    return isinstance(exc, RequestError) and exc.status not in PER_IMAGE_STATUSES


def _one(predict: Predict, source: ImageSource, default_model: str | None, stop: threading.Event
         ) -> ImageResult | None:
    if stop.is_set():
        return None
    start = time.perf_counter()
    try:
        model, classes = predict(source)
        if not all(math.isfinite(p.probability) for p in classes):  # a server passing on a broken model's NaN
            raise NonFiniteOutputError
    except DeployKitError as exc:
        if _is_fatal(exc):
            stop.set()
            raise
        return ImageResult(source.path, default_model, error=str(exc))
    return ImageResult(source.path, model, classes, (time.perf_counter() - start) * 1000.0)


def run_ordered(predict: Predict, sources: Sequence[ImageSource], *, concurrency: int,
                default_model: str | None = None,
                on_result: Callable[[ImageResult], None] | None = None) -> list[ImageResult]:
    """Predict ``sources`` on a thread pool; call ``on_result`` in input order as results become available.

    At most ``2 * concurrency`` images are queued at a time, so memory stays flat for long lists; finished
    results that overtake an earlier, slower one wait in their futures until it is done. A fatal error (the
    server is unreachable, the model unknown, the key refused) stops the run and is re-raised after the
    results before it were delivered.
    """
    stop = threading.Event()
    results: list[ImageResult] = []
    pending: deque[Future[ImageResult | None]] = deque()
    upcoming = iter(sources)
    executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="deploykit-predict")
    try:
        for source in upcoming:
            pending.append(executor.submit(_one, predict, source, default_model, stop))
            if len(pending) >= 2 * concurrency:
                break
        while pending:
            result = pending.popleft().result()
            if not stop.is_set():
                following = next(upcoming, None)
                if following is not None:
                    pending.append(executor.submit(_one, predict, following, default_model, stop))
            if result is None:  # skipped after a fatal error; the future that raised comes first
                continue
            results.append(result)
            if on_result is not None:
                on_result(result)
    except BaseException:
        stop.set()
        for future in pending:
            future.cancel()
        raise
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
    return results


def predict_images(
    inputs: Iterable[str | Path | ImageSource],
    *,
    url: str | None = None,
    model: str | None = None,
    model_file: str | Path | None = None,
    protocol: str = "rest",
    card_file: str | Path | None = None,
    files_from: str | Path | None = None,
    stdin: BinaryIO | None = None,
    top_k: int = 5,
    concurrency: int = DEFAULT_CONCURRENCY,
    retries: int = 3,
    timeout: float = 30.0,
    api_key: str | None = None,
    binary: bool | None = None,
    exact_decode: bool = False,
    shrink: bool | None = None,
    on_result: Callable[[ImageResult], None] | None = None,
) -> PredictRun:
    """Classify images on a server or locally; results are in input order.

    Args:
        inputs: image paths, globs, directories (recursive, image files only), ``-`` (one image on stdin).
        url: server base URL (default ``http://127.0.0.1:5000``); not together with ``model_file``.
        model: model name on a multi-model server (default: the server's default model).
        model_file: an ONNX file with a deploykit card: run in-process with ONNX Runtime instead of a server.
        protocol: ``rest`` (deploykit's API, the server preprocesses) or ``v2`` (Open Inference Protocol; the
            client preprocesses following the card from the server or from ``card_file``).
        files_from: a file (or ``-`` for stdin) with one image path per line, predicted after ``inputs``.
        binary: with ``v2``, send tensors as binary data (True) or JSON (False); None: binary when the
            server lists the ``binary_tensor_data`` extension in ``GET /v2``, which is read once per run.
        exact_decode: decode every image at full size, bit-identical to torchvision (``load_tensor(exact=
            True)``), where this client decodes (local mode, ``v2``); with ``rest``, send every image as it
            is. Default: a large photo is decoded at the size the model needs, as ``deploykit serve`` does.
        shrink: with ``rest``, send a file of ``SHRINK_MIN_BYTES`` or more whose shorter side is at least
            twice the model's resize size re-encoded at that size (``images.shrink_image``, with the
            preprocessing from the server's card), when that makes it smaller. None: on, unless
            ``exact_decode``.
        top_k: classes per image. concurrency: requests in flight. retries/timeout/api_key: see PredictClient.
        on_result: called with each ``ImageResult`` in input order as soon as it is known (for streaming).

    Raises:
        UsageError: bad options or no images. ConnectionFailedError: the server is unreachable (results
        before that point were already delivered to ``on_result``). RequestError: the server refused the run
        (unknown model, missing API key). ModelFileError: an unreadable ``model_file`` or ``card_file``.
        A failure of a single image (unreadable, not an image, rejected) is recorded in its result instead.
    """
    check_options(protocol=protocol, url=url, model=model, model_file=model_file, card_file=card_file,
                  top_k=top_k, concurrency=concurrency, retries=retries, timeout=timeout, binary=binary,
                  exact_decode=exact_decode, shrink=shrink)
    sources = expand_inputs(inputs, files_from=files_from, stdin=stdin)
    concurrency = min(concurrency, len(sources))
    start = time.perf_counter()
    if model_file is not None:
        from deploykit.runtime import Predictor

        predictor = Predictor.open(model_file)
        results = run_ordered(_local_predictor(predictor, top_k, exact=exact_decode), sources,
                              concurrency=concurrency,
                              default_model=predictor.name, on_result=on_result)
        return PredictRun(tuple(results), "local", str(model_file), concurrency, time.perf_counter() - start)

    from deploykit.client import DEFAULT_URL, PredictClient

    with PredictClient(url or DEFAULT_URL, api_key=api_key, timeout=timeout, retries=retries,
                       pool_size=concurrency) as client:
        name: str | None = model
        if protocol == "v2":
            name, card = _v2_card(client, model, card_file)
            predict = _v2_predictor(client, card, client.v2_plan(name, card, binary=binary), top_k,
                                    exact=exact_decode)
        else:
            predict = _rest_predictor(client, model, top_k,
                                      shrink=not exact_decode if shrink is None else shrink)
        results = run_ordered(predict, sources, concurrency=concurrency, default_model=name,
                              on_result=on_result)
        return PredictRun(tuple(results), protocol, client.url, concurrency, time.perf_counter() - start)
