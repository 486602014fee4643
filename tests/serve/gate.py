"""A gate that the test holds ONNX Runtime calls of a live server at, so that what a test sees (a full queue,
calls side by side, requests in flight at a SIGTERM) depends on the order of events the test controls, not on
how fast the host runs a model.

A server started with :attr:`InferenceGate.env` loads ``gate_site/sitecustomize.py``: once the gate is
closed, each ONNX Runtime call connects to the gate's Unix socket and waits there until the gate opens.
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

SITE = Path(__file__).resolve().parent / "gate_site"


class InferenceGate:
    """Holds a server's ONNX Runtime calls while closed; counts the calls that reached it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.reached = 0
        self._held: list[socket.socket] = []
        self._open = True
        self._stopping = False
        self._cond = threading.Condition()
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None

    @property
    def env(self) -> dict[str, str]:
        """Environment variables for the server process (start it before closing the gate: the self-test
        at start-up runs ONNX Runtime too)."""
        path = os.pathsep.join(p for p in (str(SITE), os.environ.get("PYTHONPATH", "")) if p)
        return {"PYTHONPATH": path, "DEPLOYKIT_TEST_GATE": str(self.path)}

    def close(self) -> None:
        """Hold every ONNX Runtime call from now on, until :meth:`open`."""
        with self._cond:
            self._open = False
        if self._listener is None:
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(str(self.path))
            listener.listen(128)
            self._listener = listener
            self._thread = threading.Thread(target=self._accept, name="inference-gate", daemon=True)
            self._thread.start()

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            call, _ = self._listener.accept()
            with self._cond:
                if self._stopping:
                    call.close()
                    return
                self.reached += 1
                if self._open:
                    call.close()
                else:
                    self._held.append(call)
                self._cond.notify_all()

    def wait_reached(self, calls: int, timeout: float = 60) -> None:
        """Wait until ``calls`` ONNX Runtime calls in all have reached the gate."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.reached >= calls, timeout):
                raise AssertionError(f"{self.reached} ONNX Runtime calls reached the gate, expected {calls}")

    def open(self) -> None:
        """Let the held calls and all later ones run."""
        with self._cond:
            self._open = True
            for call in self._held:
                call.close()
            self._held.clear()

    def shut(self) -> None:
        """Open the gate and stop listening (at the end of the test, once the server is stopped)."""
        self.open()
        if self._listener is not None:
            with self._cond:
                self._stopping = True
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as wake:  # ends the accept() under way
                wake.connect(str(self.path))
            assert self._thread is not None
            self._thread.join(timeout=10)
            self._listener.close()
        self.path.unlink(missing_ok=True)
