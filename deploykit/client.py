"""HTTP client for deploykit's REST API and for any Open Inference Protocol (KServe V2) server.

One ``requests.Session`` with keep-alive connections, a pool sized to the caller's concurrency, and retries
with exponential backoff and jitter on connection errors, 503 and 429 (honouring ``Retry-After``). Other 4xx
answers are never retried: they raise :class:`~deploykit.errors.RequestError` with the server's message.
The client raises, never prints, and never imports torch; NumPy and Pillow are imported only for V2.
"""

from __future__ import annotations

import json
import math
import random
import struct
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

import requests
from requests.adapters import HTTPAdapter

from deploykit import __version__
from deploykit.card import ModelCard
from deploykit.datatypes import NUMPY_BY_V2, V2_BY_NUMPY
from deploykit.errors import ConnectionFailedError, NonFiniteOutputError, RequestError, UsageError

if TYPE_CHECKING:
    import numpy as np

    from deploykit.runtime import Prediction

DEFAULT_URL = "http://127.0.0.1:5000"
RETRY_STATUSES = frozenset({429, 503})
HEADER_LENGTH = "Inference-Header-Content-Length"


class ServerError(ConnectionFailedError):
    """The server answered with a 5xx status (for 503, after the retries ran out)."""

    def __init__(self, message: str, *, status: int, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.status = status


@dataclass(frozen=True)
class RestPrediction:
    """deploykit's answer for one image: top-k classes (highest first) and the server's timings."""

    model: str
    top_k: tuple[Prediction, ...]
    filename: str | None = None
    timings_ms: Mapping[str, float] = field(default_factory=dict)


def normalize_url(url: str) -> str:
    """``localhost:5000/`` -> ``http://localhost:5000``.

    Raises:
        UsageError: not an http(s) URL with a host, or a port that is not a number from 1 to 65535.
    """
    given = url
    url = url.strip().rstrip("/")
    url = url if "://" in url else f"http://{url}"
    try:
        parts = urlsplit(url)
        port = parts.port  # ValueError when it is not a number or out of range
    except ValueError as exc:
        raise _invalid_url(given, str(exc)) from exc
    if parts.scheme.lower() not in ("http", "https"):
        raise _invalid_url(given, f"the scheme {parts.scheme!r} is not http or https")
    if not parts.hostname:
        raise _invalid_url(given, "it names no host")
    if port == 0:
        raise _invalid_url(given, "port 0 cannot be connected to")
    return url


def _invalid_url(url: str, reason: str) -> UsageError:
    return UsageError(f"Invalid --url {url!r}: {reason}.",
                      hint="Give a server URL such as http://127.0.0.1:5000 (DEPLOYKIT_URL).")


def _reason(exc: BaseException) -> str:
    """A short human reason for a requests connection error, from the innermost cause."""
    text = str(exc)
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return "connection timed out"
    if "Connection refused" in text or "Errno 111" in text:
        return "connection refused"
    if "Name or service not known" in text or "nodename nor servname" in text or "NameResolution" in text:
        return "host name not found"
    if "RemoteDisconnected" in text or "Connection aborted" in text:
        return "the server closed the connection"
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _error_message(response: requests.Response) -> str:
    """The server's ``{"error": ...}`` message, else the first line of the body, else the HTTP reason."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return str(body["error"])
    text = response.text.strip().splitlines()[0][:200] if response.text.strip() else ""
    return text or response.reason or f"HTTP {response.status_code}"


class PredictClient:
    """Talk to one server. Thread-safe for concurrent predictions; use as a context manager to close it.

    Args:
        url: base URL of the server (``http://host:port``).
        api_key: sent as ``Authorization: Bearer <key>``.
        timeout: seconds to wait for an answer (connecting waits at most 10 s of it).
        retries: extra attempts after a connection error, 503 or 429.
        pool_size: keep-alive connections kept open; set it to the number of concurrent callers.
        backoff: first retry delay in seconds; it doubles per attempt (with jitter) up to ``max_backoff``.
        max_retry_after: cap on a server's ``Retry-After``, so a misconfigured server cannot stall the client.
    """

    def __init__(self, url: str = DEFAULT_URL, *, api_key: str | None = None, timeout: float = 30.0,
                 retries: int = 3, pool_size: int = 4, backoff: float = 0.1, max_backoff: float = 5.0,
                 max_retry_after: float = 30.0) -> None:
        self.url = normalize_url(url)
        self.timeout = timeout
        self.retries = max(0, retries)
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.max_retry_after = max_retry_after
        self._v2_classification = True
        self._session = requests.Session()
        # Retries are ours (they honour Retry-After and cover 503/429), so urllib3's are off.
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=max(1, pool_size), max_retries=0,
                              pool_block=True)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        self._session.headers["User-Agent"] = f"deploykit/{__version__}"
        if api_key:
            self._session.headers["Authorization"] = f"Bearer {api_key}"

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> PredictClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- transport

    def _delay(self, attempt: int, response: requests.Response | None) -> float:
        """Seconds before retry ``attempt + 1``: Retry-After if the server sent it, else jittered backoff."""
        if response is not None:
            retry_after = _parse_retry_after(response.headers.get("Retry-After"))
            if retry_after is not None:
                # A little jitter on top so that many clients told "0" do not stampede in lockstep.
                return min(retry_after, self.max_retry_after) + random.uniform(0, self.backoff / 2)
        ceiling = min(self.max_backoff, self.backoff * 2**attempt)
        return ceiling / 2 + random.uniform(0, ceiling / 2)

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """Send one request with retries; return a 2xx/3xx response or raise.

        Raises:
            ConnectionFailedError: the server cannot be reached, or did not answer within the timeout.
            ServerError: a 5xx answer (503 only after the retries ran out).
            RequestError: any other 4xx answer (429 only after the retries ran out); not retried.
        """
        url = self.url + path
        timeout = (min(self.timeout, 10.0), self.timeout)
        attempt = 0
        while True:
            response: requests.Response | None = None
            try:
                response = self._session.request(method, url, timeout=timeout, **kwargs)
            except requests.exceptions.ConnectionError as exc:  # refused, reset, DNS, connect timeout
                if attempt >= self.retries:
                    raise ConnectionFailedError(
                        f"Cannot reach the server at {self.url}: {_reason(exc)} "
                        f"({attempt + 1} attempt{'s' if attempt else ''}).",
                        hint="Start it with `deploykit serve MODEL.onnx`, or point --url (DEPLOYKIT_URL) "
                        "at a running server.",
                    ) from exc
            except (requests.exceptions.InvalidURL, requests.exceptions.InvalidSchema,
                    requests.exceptions.MissingSchema) as exc:  # what normalize_url could not see
                raise _invalid_url(self.url, _reason(exc)) from exc
            except requests.exceptions.Timeout as exc:
                # A read timeout: the request may be running on the server; do not pile on more work.
                raise ConnectionFailedError(
                    f"The server at {self.url} did not answer within {self.timeout:g} s.",
                    hint="Raise --timeout, or check the server's load and logs.",
                ) from exc
            else:
                status = response.status_code
                if status < 400:
                    return response
                if status not in RETRY_STATUSES or attempt >= self.retries:
                    raise self._error(response)
                response.close()
            time.sleep(self._delay(attempt, response))
            attempt += 1

    def _error(self, response: requests.Response) -> RequestError | ServerError:
        status = response.status_code
        message = _error_message(response)
        if status >= 500:
            return ServerError(f"The server answered HTTP {status}: {message.rstrip('.')}.", status=status,
                               hint="Check the server's logs." if status != 503 else "The server is busy or "
                               "not ready; try again later or raise --retries.")
        error = RequestError(f"{message} (HTTP {status})", status=status)
        if status == 401:
            error.hint = "Pass the server's key with --api-key or DEPLOYKIT_API_KEY."
        return error

    def get_json(self, path: str) -> Any:
        response = self.request("GET", path)
        try:
            return response.json()
        except ValueError as exc:
            raise ServerError(f"{self.url}{path} did not answer with JSON.", status=response.status_code,
                              hint="Is --url a deploykit server?") from exc

    # ---- deploykit REST API

    def models(self) -> list[dict[str, Any]]:
        """``GET /models``: the served models, each with ``name``, ``default``, ``ready`` and ``card``."""
        return list(self.get_json("/models")["models"])

    def model_info(self, name: str) -> dict[str, Any]:
        """``GET /models/<name>``."""
        return dict(self.get_json(f"/models/{quote(name, safe='')}"))

    def model_card(self, name: str | None = None) -> ModelCard:
        """The model card of ``name`` (default: the server's default model)."""
        if name is not None:
            return ModelCard.from_dict(self.model_info(name)["card"])
        return self.default_model()[1]

    def default_model(self) -> tuple[str, ModelCard]:
        """The server's default model: the name it is served under (which need not be the card's name, e.g.
        a file's stem) and its card."""
        models = self.models()
        if not models:
            raise RequestError(f"The server at {self.url} serves no models.", status=404)
        chosen = next((m for m in models if m.get("default")), models[0])
        return str(chosen["name"]), ModelCard.from_dict(chosen["card"])

    def predict_bytes(self, data: bytes, filename: str | None = None, *, model: str | None = None,
                      top_k: int = 5) -> RestPrediction:
        """Classify one encoded image (JPEG, PNG...) with ``POST /predict`` or ``/models/<model>/predict``."""
        from deploykit.runtime import Prediction

        path = f"/models/{quote(model, safe='')}/predict" if model else "/predict"
        files = {"file": (filename or "image", data, "application/octet-stream")}
        response = self.request("POST", path, params={"top_k": top_k}, files=files)
        try:
            body = response.json()
            first = body["predictions"][0]
            # deploykit serve writes a probability that is not a finite number as null (strict JSON)
            predictions = tuple(Prediction(int(p["index"]), str(p["label"]),
                                           math.nan if p["probability"] is None else float(p["probability"]))
                                for p in first["top_k"])
            return RestPrediction(model=str(body.get("model", model or "")), top_k=predictions,
                                  filename=first.get("filename"),
                                  timings_ms=dict(body.get("timings_ms") or {}))
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise ServerError(f"The server at {self.url} sent an answer that is not a deploykit prediction "
                              f"({type(exc).__name__}: {exc}).", status=response.status_code,
                              hint="Is --url a deploykit server? For other servers use --protocol v2.",
                              ) from exc

    # ---- Open Inference Protocol (V2)

    def v2_ready(self, model: str | None = None) -> bool:
        """``GET /v2/health/ready`` (or the model's ready endpoint); False on any non-2xx answer."""
        path = f"/v2/models/{quote(model, safe='')}/ready" if model else "/v2/health/ready"
        try:
            self.request("GET", path)
        except (RequestError, ServerError):
            return False
        return True

    def v2_model_metadata(self, model: str) -> dict[str, Any]:
        """``GET /v2/models/<model>``: inputs and outputs with names, shapes and datatypes."""
        return dict(self.get_json(f"/v2/models/{quote(model, safe='')}"))

    def predict_tensor_v2(self, tensor: np.ndarray, *, card: ModelCard, model: str | None = None,
                          top_k: int = 5, binary: bool = True) -> list[tuple[Prediction, ...]]:
        """Run one input batch on a V2 server and return top-k classes per row.

        The tensor goes as binary data (``Inference-Header-Content-Length``) unless ``binary`` is False. The
        classification extension is asked for all classes, so that probabilities can be computed exactly from
        the model's output values; servers without it get a plain request and top-k is computed here.
        """
        import numpy as np

        name = model or card.name
        path = f"/v2/models/{quote(name, safe='')}/infer"
        array = np.ascontiguousarray(tensor)
        datatype = V2_BY_NUMPY.get(array.dtype.name)
        if datatype is None:
            raise RequestError(f"Cannot send a {array.dtype.name} tensor over V2.", status=400)
        want_classes = self._v2_classification
        body, headers = _v2_request(array, datatype, card, top_k=card.num_classes or top_k,
                                    classification=want_classes, binary=binary)
        try:
            response = self.request("POST", path, data=body, headers=headers)
        except RequestError as exc:
            if not (want_classes and exc.status == 400 and "classification" in exc.message.lower()):
                raise
            # The server lacks the extension: ask for the raw output from now on.
            self._v2_classification = False
            body, headers = _v2_request(array, datatype, card, top_k=top_k, classification=False,
                                        binary=binary)
            response = self.request("POST", path, data=body, headers=headers)
        try:
            values, labels = _v2_output(response, card.output.name, card.num_classes)
        except (ValueError, KeyError, IndexError, TypeError, struct.error) as exc:
            raise ServerError(f"The V2 server at {self.url} sent an answer that cannot be parsed "
                              f"({type(exc).__name__}: {exc}).", status=response.status_code) from exc
        names = [(labels[i] if labels and i < len(labels) else "") or card.label(i)
                 for i in range(values.shape[1])]
        return _top_k_rows(values, names, card.output_kind, top_k)

    def predict_image_v2(self, data: bytes, *, card: ModelCard, model: str | None = None,
                         top_k: int = 5) -> tuple[Prediction, ...]:
        """Decode and preprocess one encoded image as the card says, then classify it on a V2 server.

        Raises ``InvalidImageError`` when the bytes are not a readable image.
        """
        from deploykit.images import decode_image, preprocess
        from deploykit.runtime import pad_batch

        # A static-batch model (Triton's max_batch_size 0) takes exactly its batch: pad it, keep row 0.
        tensor = pad_batch(preprocess(decode_image(data), card.preprocess)[None], card.fixed_batch)
        return self.predict_tensor_v2(tensor, card=card, model=model, top_k=top_k)[0]


def _parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date); None when absent or invalid."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _v2_request(array: np.ndarray, datatype: str, card: ModelCard, *, top_k: int, classification: bool,
                binary: bool) -> tuple[bytes, dict[str, str]]:
    """The body and headers of a V2 inference request with one input and one requested output."""
    entry: dict[str, Any] = {"name": card.input.name, "shape": list(array.shape), "datatype": datatype}
    output: dict[str, Any] = {"name": card.output.name}
    if classification:
        output["parameters"] = {"classification": int(top_k)}
    elif binary:
        output["parameters"] = {"binary_data": True}
    if not binary:
        entry["data"] = array.reshape(-1).tolist()
        body = json.dumps({"inputs": [entry], "outputs": [output]}).encode()
        return body, {"Content-Type": "application/json"}
    raw = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
    entry["parameters"] = {"binary_data_size": len(raw)}
    header = json.dumps({"inputs": [entry], "outputs": [output]}).encode()
    return header + raw, {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(header))}


def _v2_output(response: requests.Response, name: str, num_classes: int
               ) -> tuple[np.ndarray, list[str] | None]:
    """Parse a V2 answer into (N, C) output values; labels too when the answer is a classification.

    Handles JSON and binary (``Inference-Header-Content-Length``) answers, numeric tensors and the
    classification extension's ``"value:index[:label]"`` strings. Classes a classification answer leaves out
    get ``-inf`` (probability 0).
    """
    import numpy as np

    content = response.content
    header_length = response.headers.get(HEADER_LENGTH)
    split = int(header_length) if header_length is not None else len(content)
    body = json.loads(content[:split])
    binary = memoryview(content)[split:]
    outputs = body["outputs"]
    offset = 0
    chosen, chosen_bytes = None, b""
    for output in outputs:
        size = int((output.get("parameters") or {}).get("binary_data_size", 0))
        if output["name"] == name or chosen is None:
            chosen, chosen_bytes = output, bytes(binary[offset:offset + size])
        offset += size
    if chosen is None:
        raise ValueError("the answer has no outputs")
    shape = [int(d) for d in chosen["shape"]]
    datatype = str(chosen["datatype"]).upper()
    if datatype == "BYTES":
        strings = _bytes_elements(chosen_bytes) if chosen_bytes else [str(s) for s in chosen["data"]]
        rows = shape[0] if len(shape) > 1 else 1
        per_row = len(strings) // max(rows, 1)
        values = np.full((rows, num_classes), -np.inf, dtype=np.float64)
        labels = [""] * num_classes
        for r in range(rows):
            for item in strings[r * per_row:(r + 1) * per_row]:
                parts = item.split(":", 2)
                index = int(parts[1])
                if index >= values.shape[1]:  # more classes than the card knows: grow instead of failing
                    grow = index + 1 - values.shape[1]
                    values = np.pad(values, ((0, 0), (0, grow)), constant_values=-np.inf)
                    labels += [""] * (index + 1 - len(labels))
                values[r, index] = float(parts[0])
                if len(parts) == 3:
                    labels[index] = parts[2]
        return values, labels if any(labels) else None
    dtype = np.dtype(NUMPY_BY_V2[datatype]).newbyteorder("<")
    if chosen_bytes:
        flat = np.frombuffer(chosen_bytes, dtype=dtype)
    else:
        flat = np.asarray(chosen["data"], dtype=dtype).reshape(-1)
    if flat.size != math.prod(shape) or flat.size == 0:
        raise ValueError(f"output {chosen['name']!r} has {flat.size} values for shape {shape}")
    return flat.astype(np.float64).reshape(shape[0] if len(shape) > 1 else 1, -1), None


def _bytes_elements(data: bytes) -> list[str]:
    """Decode a binary BYTES tensor: each element is a 4-byte little-endian length, then the bytes."""
    items, offset = [], 0
    while offset < len(data):
        (length,) = struct.unpack_from("<I", data, offset)
        offset += 4
        items.append(data[offset:offset + length].decode("utf-8", "replace"))
        offset += length
    return items


def _top_k_rows(values: np.ndarray, labels: Sequence[str], output_kind: str, k: int
                ) -> list[tuple[Prediction, ...]]:
    import numpy as np

    from deploykit.runtime import softmax, top_k

    if np.isnan(values).any() or np.isposinf(values).any():
        raise NonFiniteOutputError
    # Classification answers may leave classes out (-inf): for logits that is probability 0 after softmax.
    probabilities = softmax(values) if output_kind == "logits" else np.where(np.isneginf(values), 0.0, values)
    return [tuple(row) for row in top_k(probabilities, k, labels)]
