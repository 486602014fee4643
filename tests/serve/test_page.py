"""The web page at ``GET /``, driven in a real headless Chromium over the DevTools protocol.

A tiny DevTools client (``websocket-client``) is used instead of Selenium: it needs no driver binary and gives
direct access to ``DOM.setFileInputFiles`` and screenshots.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import requests

if TYPE_CHECKING:
    from conftest import LiveServer

pytestmark = pytest.mark.browser

CHROMIUM_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--window-size=1000,900", "--remote-debugging-port=0",
)
TIMEOUT = 30.0


class DevToolsError(RuntimeError):
    """A DevTools command failed, a wait timed out, or the page threw an exception."""


class Browser:
    """A headless Chromium process and one DevTools websocket to it."""

    def __init__(self, executable: str, profile: Path) -> None:
        import websocket

        self.profile = profile
        self.log_path = profile.parent / "chromium.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - kept open for the process's lifetime
        cmd = [executable, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"]
        self.process = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)
        # Chromium writes the port it picked and the browser target's path into this file once it listens.
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + TIMEOUT
        while not (port_file.is_file() and len(port_file.read_text().split()) >= 2):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise DevToolsError(f"Chromium did not start:\n{self.log_path.read_text(errors='replace')}")
            time.sleep(0.05)
        port, path = port_file.read_text().split()[:2]
        # Chromium refuses websocket clients that send an Origin header it was not told to allow.
        self.ws = websocket.create_connection(f"ws://127.0.0.1:{port}{path}", timeout=TIMEOUT,
                                              suppress_origin=True)
        self._ids = itertools.count(1)
        self.events: list[dict[str, Any]] = []

    def send(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        """Send one command and wait for its answer; events that arrive meanwhile are kept in ``events``."""
        message_id = next(self._ids)
        message: dict[str, Any] = {"id": message_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        self.ws.send(json.dumps(message))
        while True:
            answer = json.loads(self.ws.recv())
            if answer.get("id") == message_id:
                if "error" in answer:
                    raise DevToolsError(f"{method}: {answer['error']}")
                return dict(answer.get("result", {}))
            if answer.get("method") in ("Inspector.targetCrashed", "Target.targetCrashed"):
                raise DevToolsError(f"the browser tab crashed during {method}; see {self.log_path}")
            if "method" in answer:
                self.events.append(answer)

    def new_page(self) -> Page:
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        page = Page(self, target, session)
        page.send("Page.enable")
        page.send("Runtime.enable")
        return page

    def close(self) -> None:
        if getattr(self, "ws", None) is not None:
            self.ws.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


class Page:
    """One browser tab, attached with a flat DevTools session."""

    def __init__(self, browser: Browser, target: str, session: str) -> None:
        self.browser = browser
        self.target = target
        self.session = session

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        return self.browser.send(method, self.session, **params)

    def evaluate(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise DevToolsError(f"{expression}: {details.get('exception', {}).get('description') or details}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = TIMEOUT) -> Any:
        """Poll a JavaScript expression until it is truthy; return its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise DevToolsError(f"timed out after {timeout}s waiting for {expression}; page text:\n"
                                    f"{self.evaluate('document.body && document.body.innerText')}")
            time.sleep(0.05)

    def open(self, url: str) -> None:
        self.send("Page.navigate", url=url)
        self.wait_for(f"location.href === {json.dumps(url)} && document.readyState === 'complete'")

    def set_files(self, selector: str, *paths: Path) -> None:
        """Choose files in an ``<input type=file>``, as a person picking them in the file dialog."""
        root = self.send("DOM.getDocument")["root"]["nodeId"]
        node = self.send("DOM.querySelector", nodeId=root, selector=selector)["nodeId"]
        self.send("DOM.setFileInputFiles", nodeId=node, files=[str(p.resolve()) for p in paths])

    def screenshot(self, path: Path) -> bytes:
        shot = self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        data = base64.b64decode(shot["data"])
        path.write_bytes(data)
        return data

    def exceptions(self) -> list[str]:
        """Uncaught JavaScript exceptions this page has thrown so far."""
        return [
            str(e["params"]["exceptionDetails"].get("exception", {}).get("description")
                or e["params"]["exceptionDetails"].get("text"))
            for e in self.browser.events
            if e.get("method") == "Runtime.exceptionThrown" and e.get("sessionId") == self.session
        ]

    def close(self) -> None:
        self.browser.send("Target.closeTarget", targetId=self.target)


def find_chromium() -> str:
    """$DEPLOYKIT_CHROMIUM, else the first Chrome or Chromium on PATH (`make test` installs one)."""
    configured = os.environ.get("DEPLOYKIT_CHROMIUM")
    if configured:
        return configured
    for name in CHROMIUM_CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    pytest.fail("Chromium is not installed, and the web page tests need a real browser. `make test` installs "
                "it where apt-get exists; or set DEPLOYKIT_CHROMIUM to a Chrome or Chromium binary.",
                pytrace=False)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    try:
        import websocket  # noqa: F401
    except ImportError:
        pytest.fail("The web page tests need the websocket-client package: pip install -e '.[test]'.",
                    pytrace=False)
    instance = Browser(find_chromium(), tmp_path_factory.mktemp("chromium") / "profile")
    yield instance
    instance.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    tab = browser.new_page()
    yield tab
    errors = tab.exceptions()
    tab.close()
    assert not errors, f"the page threw JavaScript exceptions: {errors}"


BARS_SHOWN = ("!document.getElementById('results').hidden && "
              "document.querySelectorAll('#bars li').length")
ERROR_SHOWN = "!document.getElementById('error').hidden && document.getElementById('error').textContent"


def true_label(image: Path) -> str:
    """Example images are named <label>_<n>.jpg."""
    return image.stem.rsplit("_", 1)[0]


MODELS_LOADED = "!document.getElementById('model').disabled && document.getElementById('model').value"


def load_page(page: Page, server: LiveServer, path: str = "/") -> None:
    page.open(server.url + path)
    page.wait_for(MODELS_LOADED)


def test_page_predicts_an_example_image(page: Page, shapes_server: LiveServer, shapes_images: list[Path],
                                        tmp_path: Path) -> None:
    load_page(page, shapes_server)
    assert page.evaluate("document.getElementById('model').value") == "shapes"
    assert page.evaluate("document.querySelector('label[for=model]').textContent") == "Model"

    image = shapes_images[0]
    page.set_files("#file", image)
    assert page.wait_for(BARS_SHOWN) == 5
    labels = page.evaluate("[...document.querySelectorAll('#bars li .name')].map(e => e.textContent)")
    percents = page.evaluate("[...document.querySelectorAll('#bars li .value')].map(e => e.textContent)")
    assert labels[0] == true_label(image), (image.name, labels, percents)
    assert all(p.endswith("%") for p in percents), percents
    values = [float(p.rstrip("%")) for p in percents]
    assert values == sorted(values, reverse=True), percents
    assert "ms" in page.evaluate("document.getElementById('latency').textContent")
    assert page.evaluate("document.getElementById('preview').naturalWidth") > 0
    assert page.evaluate("document.getElementById('error').hidden") is True

    # The bars agree with what the API itself answers for the same file.
    with image.open("rb") as f:
        api = requests.post(f"{shapes_server.url}/models/shapes/predict?top_k=5", files={"file": f},
                            timeout=30)
    assert labels == [entry["label"] for entry in api.json()["predictions"][0]["top_k"]]

    png = page.screenshot(tmp_path / "page.png")
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(png) > 5000


def test_page_predicts_each_image_chosen_after_another(page: Page, shapes_server: LiveServer,
                                                      shapes_images: list[Path]) -> None:
    load_page(page, shapes_server)
    by_label = {true_label(p): p for p in shapes_images}
    assert len(by_label) >= 2, by_label
    for label, image in list(by_label.items())[:3]:
        page.set_files("#file", image)
        page.wait_for(f"{BARS_SHOWN} === 5 && document.getElementById('drop-text').textContent"
                      f".startsWith({json.dumps(image.name)}) && "
                      "document.getElementById('status').textContent.startsWith('Top prediction')")
        assert page.evaluate("document.querySelector('#bars li .name').textContent") == label


def test_page_predicts_an_image_dropped_on_the_drop_target(page: Page, shapes_server: LiveServer,
                                                          shapes_images: list[Path]) -> None:
    """A file dragged from the desktop onto the drop target: highlighted while over it, then predicted."""
    load_page(page, shapes_server)
    image = shapes_images[1]
    x, y = page.evaluate("(() => { const r = document.getElementById('drop').getBoundingClientRect(); "
                         "return [r.x + r.width / 2, r.y + r.height / 2]; })()")
    data = {"items": [], "files": [str(image.resolve())], "dragOperationsMask": 1}
    for kind in ("dragEnter", "dragOver"):
        page.send("Input.dispatchDragEvent", type=kind, x=x, y=y, data=data)
    assert page.evaluate("document.getElementById('drop').classList.contains('over')") is True
    page.send("Input.dispatchDragEvent", type="drop", x=x, y=y, data=data)
    assert page.wait_for(f"{BARS_SHOWN} === 5 && document.getElementById('drop-text').textContent")
    assert page.evaluate("document.getElementById('drop-text').textContent") == (
        f"{image.name} — choose or drop another image"
    )
    assert page.evaluate("document.querySelector('#bars li .name').textContent") == true_label(image)
    assert page.evaluate("document.getElementById('drop').classList.contains('over')") is False
    assert page.evaluate("document.getElementById('preview').alt") == f"Preview of {image.name}"
    assert page.evaluate("location.href") == shapes_server.url + "/"


def test_page_model_selector_predicts_with_the_chosen_model(
        page: Page, shapes_onnx: Path, resnet18_onnx: Path, shapes_images: list[Path],
        live_server_factory: Callable[..., LiveServer]) -> None:
    """The selector lists every model with its class count, starts on the default one, and choosing another
    predicts the chosen image again with it."""
    server = live_server_factory(str(shapes_onnx), str(resnet18_onnx))
    load_page(page, server)
    options = page.evaluate("[...document.querySelectorAll('#model option')]"
                            ".map(o => [o.value, o.textContent])")
    assert options == [["shapes", "shapes · 6 classes"], ["resnet18", "resnet18 · 1000 classes"]]
    assert page.evaluate("document.getElementById('model').value") == "shapes"
    image = shapes_images[0]
    page.set_files("#file", image)
    page.wait_for(f"{BARS_SHOWN} === 5 && "
                  "document.getElementById('latency').textContent.endsWith('model shapes')")
    assert page.evaluate("document.querySelector('#bars li .name').textContent") == true_label(image)

    # choose resnet18 with the keyboard, as a person would: focus the selector, arrow down
    page.evaluate("document.getElementById('model').focus()")
    for kind in ("rawKeyDown", "keyUp"):
        page.send("Input.dispatchKeyEvent", type=kind, key="ArrowDown", code="ArrowDown",
                  windowsVirtualKeyCode=40)
    assert page.evaluate("document.getElementById('model').value") == "resnet18"
    page.wait_for(f"{BARS_SHOWN} === 5 && "
                  "document.getElementById('latency').textContent.endsWith('model resnet18')")
    labels = page.evaluate("[...document.querySelectorAll('#bars li .name')].map(e => e.textContent)")
    resnet18_labels = set(requests.get(server.url + "/models/resnet18", timeout=30).json()["card"]["labels"])
    assert set(labels) <= resnet18_labels, labels
    # one prediction each, by the route that names the model
    predictions = {}
    for line in requests.get(server.url + "/metrics", timeout=30).text.splitlines():
        if line.startswith("deploykit_requests_total{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
            if labels["route"] == "/models/<name>/predict":
                predictions[labels["model"], labels["status"]] = float(line.rsplit(" ", 1)[1])
    assert predictions == {("shapes", "200"): 1.0, ("resnet18", "200"): 1.0}


def test_page_shows_the_server_error_for_a_non_image(page: Page, shapes_server: LiveServer,
                                                     tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("this is not an image\n")
    expected = requests.post(shapes_server.url + "/models/shapes/predict",
                             files={"file": ("notes.txt", notes.read_bytes())}, timeout=30)
    assert expected.status_code == 415  # serving.md: not an image
    message = expected.json()["error"]

    load_page(page, shapes_server)
    page.set_files("#file", notes)
    shown = page.wait_for(ERROR_SHOWN)
    assert message in shown
    assert f"HTTP {expected.status_code}" in shown
    assert page.evaluate("document.getElementById('results').hidden") is True
    assert page.evaluate("document.getElementById('error').getAttribute('role')") == "alert"


def test_page_asks_for_the_api_key_only_when_the_server_wants_one(
        page: Page, shapes_server: LiveServer, shapes_onnx: Path, shapes_images: list[Path],
        live_server_factory: Callable[..., LiveServer]) -> None:
    load_page(page, shapes_server)
    assert page.evaluate("document.getElementById('key-field').hidden") is True

    server = live_server_factory(str(shapes_onnx), env={"DEPLOYKIT_API_KEY": "open-sesame"})
    page.open(server.url + "/")
    page.wait_for("!document.getElementById('key-field').hidden")
    assert page.evaluate("document.activeElement.id") == "api-key"
    assert page.evaluate("document.querySelector('label[for=\"api-key\"]').textContent") == "API key"

    # A wrong key is refused with the server's message and the field stays.
    page.send("Input.insertText", text="wrong")
    page.send("Input.dispatchKeyEvent", type="keyDown", key="Enter", code="Enter", windowsVirtualKeyCode=13)
    page.send("Input.dispatchKeyEvent", type="keyUp", key="Enter", code="Enter", windowsVirtualKeyCode=13)
    refused = page.wait_for("document.getElementById('error').textContent.includes('not accepted') && "
                            "document.getElementById('error').textContent")
    assert "HTTP 401" in refused
    assert page.evaluate("document.getElementById('key-field').hidden") is False

    page.evaluate("document.getElementById('api-key').value = 'open-sesame'")
    page.evaluate("document.getElementById('key-apply').click()")
    assert page.wait_for(MODELS_LOADED) == "shapes"
    assert page.evaluate("document.getElementById('error').hidden") is True

    image = shapes_images[0]
    page.set_files("#file", image)
    assert page.wait_for(BARS_SHOWN) == 5
    assert page.evaluate("document.querySelector('#bars li .name').textContent") == true_label(image)


def test_page_uses_relative_urls_only(shapes_server: LiveServer) -> None:
    """No absolute or external URL, so the page works offline and under a sub-path."""
    html = requests.get(shapes_server.url + "/", timeout=30)
    assert html.status_code == 200
    assert "text/html" in html.headers["Content-Type"]
    for asset in ("static/app.js", "static/style.css"):
        assert f'"{asset}"' in html.text
        answer = requests.get(f"{shapes_server.url}/{asset}", timeout=30)
        assert answer.status_code == 200, asset
        assert not re.search(r"https?://|//cdn", answer.text), asset
    assert not re.search(r"https?://", html.text)


def test_page_works_when_the_app_is_mounted_under_a_sub_path(page: Page, shapes_onnx: Path,
                                                             shapes_images: list[Path]) -> None:
    """Behind a reverse proxy at /tools/deploykit/, every URL the page uses must stay under that prefix."""
    from werkzeug.exceptions import NotFound
    from werkzeug.middleware.dispatcher import DispatcherMiddleware
    from werkzeug.serving import make_server

    from deploykit.serve.app import create_app
    from deploykit.serve.config import ModelSpec, ServeConfig
    from deploykit.serve.registry import registry_of

    app = create_app(ServeConfig(models=(ModelSpec("shapes", shapes_onnx),)))
    mounted = DispatcherMiddleware(NotFound(), {"/tools/deploykit": app})
    server = make_server("127.0.0.1", 0, mounted, threaded=True)  # port 0: the OS picks a free one
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_port}/tools/deploykit/"
        assert requests.get(base + "models", timeout=30).status_code == 200
        assert requests.get(f"http://127.0.0.1:{server.server_port}/models", timeout=30).status_code == 404
        page.open(base)
        assert page.wait_for(MODELS_LOADED) == "shapes"
        image = shapes_images[-1]
        page.set_files("#file", image)
        assert page.wait_for(BARS_SHOWN) == 5
        assert page.evaluate("document.querySelector('#bars li .name').textContent") == true_label(image)
    finally:
        server.shutdown()
        thread.join(timeout=10)
        registry_of(app).close()


def test_page_is_usable_with_the_keyboard(page: Page, shapes_server: LiveServer) -> None:
    load_page(page, shapes_server)
    order = []
    for _ in range(2):
        page.send("Input.dispatchKeyEvent", type="rawKeyDown", key="Tab", code="Tab", windowsVirtualKeyCode=9)
        page.send("Input.dispatchKeyEvent", type="keyUp", key="Tab", code="Tab", windowsVirtualKeyCode=9)
        order.append(page.evaluate("document.activeElement.id"))
    assert order == ["model", "file"]
    # Every control has an accessible name (a <label for> or aria-labelledby), as screen readers need.
    unnamed = page.evaluate("""[...document.querySelectorAll('input, select, button')].filter(e =>
        !(e.labels && e.labels.length) && !e.getAttribute('aria-labelledby') && !e.textContent.trim()
    ).map(e => e.id)""")
    assert unnamed == []
    root = page.send("DOM.getDocument")["root"]["nodeId"]
    node = page.send("DOM.querySelector", nodeId=root, selector="#file")["nodeId"]
    ax = page.send("Accessibility.getPartialAXTree", nodeId=node, fetchRelatives=False)["nodes"][0]
    assert ax["name"]["value"] == "Image Choose an image or drop it here"
