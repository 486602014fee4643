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
import threading
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
MESSAGE_LIMIT = 200  # characters of a server's error message shown
TRACEBACK = "Traceback (most recent call last):"
# Open Inference Protocol extensions a server lists in GET /v2 and the client uses when it does.
BINARY_EXTENSION = "binary_tensor_data"
CLASSIFICATION_EXTENSION = "classification"


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


@dataclass(frozen=True)
class V2Plan:
    """How a run talks to one model on an Open Inference Protocol server, settled once by
    :meth:`PredictClient.v2_plan` from the server's metadata and the model card.

    The input and output tensors (name, V2 datatype, shape with -1 for a free dimension) come from the model
    metadata where it lists them, else from the card: ``tensors_from`` says which. ``binary`` sends the
    input and asks for the output as binary tensor data; ``classification`` asks the server for the top
    classes. ``extensions`` is what ``GET /v2`` listed, None when it answered no list.
    """

    model: str
    input_name: str
    input_datatype: str
    input_shape: tuple[int, ...]
    output_name: str
    binary: bool
    classification: bool
    extensions: tuple[str, ...] | None
    tensors_from: str

    @property
    def fixed_batch(self) -> int | None:
        """The batch size a static-batch model takes; None when the batch dimension is free."""
        return self.input_shape[0] if self.input_shape and self.input_shape[0] > 0 else None

    def lists(self, extension: str) -> bool:
        return extension in (self.extensions or ())


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
    """A short human reason for a requests connection error, from the innermost cause; else its one line."""
    from deploykit.errors import one_line

    text = str(exc)
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return "connection timed out"
    if "Connection refused" in text or "Errno 111" in text:
        return "connection refused"
    if "Name or service not known" in text or "nodename nor servname" in text or "NameResolution" in text:
        return "host name not found"
    if "RemoteDisconnected" in text or "Connection aborted" in text:
        return "the server closed the connection"
    return one_line(exc)


def _error_message(response: requests.Response) -> str:
    """The server's message on one line, at most ``MESSAGE_LIMIT`` characters.

    In order: ``{"error": ...}`` (deploykit, Triton, KServe, MLServer), FastAPI's ``{"detail": ...}`` (a
    validation error's fields and messages), the exception line that ends a Python traceback (a server in
    debug mode answers a crash with one), the first line of the body unless it is HTML, the HTTP reason.
    """
    try:
        body = response.json()
    except ValueError:
        body = None
    message = ""
    if isinstance(body, dict):
        message = _detail_text(body.get("error")) or _detail_text(body.get("detail"))
    if not message:
        lines = [line for line in response.text.strip().splitlines() if line.strip()]
        message = (lines[-1] if TRACEBACK in response.text else lines[0]) if lines else ""
        if message.startswith("<"):  # an HTML page (a proxy's): its first line says nothing
            message = ""
    message = " ".join(message.split())
    if len(message) > MESSAGE_LIMIT:
        message = message[:MESSAGE_LIMIT - 3].rstrip() + "..."
    return message or response.reason or f"HTTP {response.status_code}"


def _detail_text(value: Any) -> str:
    """An error field as text: a string as it is, FastAPI's list of ``{"loc": [...], "msg": ...}`` as
    ``loc: msg; ...``; anything else as nothing."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        items = [f"{'.'.join(map(str, item.get('loc') or ()))}: {item['msg']}".lstrip(": ")
                 for item in value if isinstance(item, dict) and isinstance(item.get("msg"), str)]
        return "; ".join(items)
    return ""


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
        self._v2_server: dict[str, Any] | None = None  # GET /v2, read once
        self._v2_plans: dict[tuple[str, str, str, bool | None], V2Plan] = {}
        self._v2_lock = threading.Lock()
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
            text = message if message.endswith("...") else message.rstrip(".") + "."  # a cut one keeps "..."
            return ServerError(f"The server answered HTTP {status}: {text}", status=status,
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
        """``GET /v2/models/<model>``: inputs and outputs with names, shapes and datatypes (which some
        servers, such as MLServer, leave empty)."""
        return dict(self.get_json(f"/v2/models/{quote(model, safe='')}"))

    def v2_server_metadata(self) -> dict[str, Any]:
        """``GET /v2``: the server's name, version and the protocol extensions it supports, read once per
        client; ``{}`` when the server refuses the request (4xx) or answers something other than JSON.

        Raises:
            ConnectionFailedError: the server cannot be reached. ServerError: a 5xx answer.
        """
        with self._v2_lock:
            if self._v2_server is None:
                try:
                    body = self.request("GET", "/v2").json()
                except (RequestError, ValueError):  # no such route, or not JSON: no extensions known
                    body = {}
                self._v2_server = dict(body) if isinstance(body, dict) else {}
            return self._v2_server

    def v2_plan(self, model: str, card: ModelCard, *, binary: bool | None = None) -> V2Plan:
        """Settle how to talk to ``model``: its tensors from ``GET /v2/models/<model>`` where it lists them,
        else from ``card``; the extensions from ``GET /v2``.

        Args:
            model: the model's name on the server.
            card: the model card, for the tensors the server's metadata does not list.
            binary: send binary tensor data (True) or JSON (False); None: binary only when the server lists
                ``binary_tensor_data``. Classification is asked for only when the server lists it.

        Raises:
            RequestError: the server refused the model metadata request (an unknown model).
            UsageError: the server's input shape does not fit the card's preprocessing (the wrong card).
        """
        metadata = self.v2_model_metadata(model)
        extensions = self.v2_server_metadata().get("extensions")
        listed = tuple(str(e) for e in extensions) if isinstance(extensions, list) else None
        given = _tensor_entry(metadata.get("inputs"), card.input.name)
        wanted = _tensor_entry(metadata.get("outputs"), card.output.name)
        input_name, datatype, shape = given or (card.input.name, "", ())
        datatype = datatype or V2_BY_NUMPY.get(card.input.dtype) or V2_BY_NUMPY[card.preprocess.dtype]
        shape = shape or tuple(d if isinstance(d, int) else -1 for d in card.input.shape)
        tensors_from = {(True, True): "server", (False, False): "card"}.get(
            (given is not None, wanted is not None), "server and card")
        plan = V2Plan(model=model, input_name=input_name, input_datatype=datatype, input_shape=shape,
                      output_name=wanted[0] if wanted is not None else card.output.name,
                      binary=(BINARY_EXTENSION in (listed or ())) if binary is None else binary,
                      classification=CLASSIFICATION_EXTENSION in (listed or ()), extensions=listed,
                      tensors_from=tensors_from)
        expected = card.preprocess.input_shape(1)[1:]
        served = plan.input_shape[1:]
        if given is not None and len(served) == len(expected) and any(
                s > 0 and s != e for s, e in zip(served, expected, strict=True)):
            raise UsageError(
                f"Model {model!r} at {self.url} takes {input_name!r} of shape {list(plan.input_shape)}, but "
                f"the card's preprocessing makes {[-1, *expected]}.",
                hint="Pass the ONNX file that the server serves with --card.")
        return plan

    def _plan_for(self, model: str, card: ModelCard, binary: bool | None) -> V2Plan:
        key = (model, card.input.name, card.output.name, binary)
        plan = self._v2_plans.get(key)
        if plan is None:
            plan = self._v2_plans.setdefault(key, self.v2_plan(model, card, binary=binary))
        return plan

    def _v2_infer(self, plan: V2Plan, array: np.ndarray, datatype: str, classes: int) -> requests.Response:
        body, headers = _v2_request(array, datatype, plan, classes=classes)
        try:
            return self.request("POST", f"/v2/models/{quote(plan.model, safe='')}/infer", data=body,
                                headers=headers)
        except (RequestError, ServerError) as exc:
            if plan.binary and not plan.lists(BINARY_EXTENSION) and exc.status in (400, 415, 422, 500):
                listed = ", ".join(plan.extensions) if plan.extensions else "none"
                exc.hint = (f"The tensor went as binary data (--binary), an extension that this server does "
                            f"not list in GET /v2 (it lists: {listed}); pass --no-binary to send JSON.")
            raise

    def predict_tensor_v2(self, tensor: np.ndarray, *, card: ModelCard, model: str | None = None,
                          top_k: int = 5, binary: bool | None = None, plan: V2Plan | None = None
                          ) -> list[tuple[Prediction, ...]]:
        """Run one input batch on a V2 server and return top-k classes per row.

        ``plan`` (from :meth:`v2_plan`) names the tensors and says whether to send binary data and ask for
        classification; without one, the plan for ``model`` (default: the card's name) and ``binary`` is
        settled on first use and kept. The classification extension is asked for all classes, so that
        probabilities are computed exactly from the model's output values; otherwise top-k is computed here,
        with the card's labels. A server that lists classification but refuses it gets plain requests from
        then on.
        """
        import numpy as np

        plan = plan or self._plan_for(model or card.name, card, binary)
        array = np.ascontiguousarray(tensor)
        if plan.input_datatype in NUMPY_BY_V2 and V2_BY_NUMPY.get(array.dtype.name) != plan.input_datatype:
            array = array.astype(NUMPY_BY_V2[plan.input_datatype])  # what the server says the model takes
        datatype = V2_BY_NUMPY.get(array.dtype.name)
        if datatype is None:
            raise RequestError(f"Cannot send a {array.dtype.name} tensor over V2.", status=400)
        want_classes = plan.classification and self._v2_classification
        try:
            response = self._v2_infer(plan, array, datatype, card.num_classes or top_k if want_classes else 0)
        except RequestError as exc:
            if not (want_classes and exc.status == 400 and "classification" in exc.message.lower()):
                raise
            # The server refuses the extension after all: ask for the raw output from now on.
            self._v2_classification = False
            response = self._v2_infer(plan, array, datatype, 0)
        try:
            values, labels = _v2_output(response, plan.output_name, card.num_classes)
        except (ValueError, KeyError, IndexError, TypeError, struct.error) as exc:
            raise ServerError(f"The V2 server at {self.url} sent an answer that cannot be parsed "
                              f"({type(exc).__name__}: {exc}).", status=response.status_code) from exc
        names = [(labels[i] if labels and i < len(labels) else "") or card.label(i)
                 for i in range(values.shape[1])]
        return _top_k_rows(values, names, card.output_kind, top_k)

    def predict_image_v2(self, data: bytes, *, card: ModelCard, model: str | None = None, top_k: int = 5,
                         binary: bool | None = None, plan: V2Plan | None = None,
                         exact: bool = False) -> tuple[Prediction, ...]:
        """Decode and preprocess one encoded image as the card says, then classify it on a V2 server
        (see :meth:`predict_tensor_v2`).

        A large photo is decoded at the size the model needs, as ``deploykit serve`` decodes uploads by
        default; ``exact`` decodes it whole, bit-identical to torchvision (see ``images.load_tensor``).
        Raises ``InvalidImageError`` when the bytes are not a readable image.
        """
        from deploykit.images import load_tensor
        from deploykit.runtime import pad_batch

        plan = plan or self._plan_for(model or card.name, card, binary)
        # A static-batch model (Triton's max_batch_size 0) takes exactly its batch: pad it, keep row 0.
        tensor = pad_batch(load_tensor(data, card.preprocess, exact=exact)[None], plan.fixed_batch)
        return self.predict_tensor_v2(tensor, card=card, top_k=top_k, plan=plan)[0]


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


def _tensor_entry(entries: Any, preferred: str) -> tuple[str, str, tuple[int, ...]] | None:
    """(name, datatype, shape) of the metadata entry named ``preferred``, else of the first one; None when the
    metadata lists none. A datatype NumPy cannot hold is returned as ``""``, a shape that is not a list of
    integers as ``()``."""
    if not isinstance(entries, list):
        return None
    named = [e for e in entries if isinstance(e, dict) and isinstance(e.get("name"), str) and e["name"]]
    if not named:
        return None
    entry = next((e for e in named if e["name"] == preferred), named[0])
    datatype = str(entry.get("datatype", "")).upper()
    shape = entry.get("shape")
    valid = isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
    return (str(entry["name"]), datatype if datatype in NUMPY_BY_V2 else "",
            tuple(shape) if valid and isinstance(shape, list) else ())


def _v2_request(array: np.ndarray, datatype: str, plan: V2Plan, *, classes: int
                ) -> tuple[bytes, dict[str, str]]:
    """The body and headers of a V2 inference request with one input and one requested output; ``classes``
    > 0 asks for that many classes with the classification extension."""
    entry: dict[str, Any] = {"name": plan.input_name, "shape": list(array.shape), "datatype": datatype}
    output: dict[str, Any] = {"name": plan.output_name}
    binary = plan.binary
    if classes > 0:
        output["parameters"] = {"classification": int(classes)}
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
