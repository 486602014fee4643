"""Imported at start-up by the server processes of the serve tests that put this folder on PYTHONPATH.

With DEPLOYKIT_TEST_GATE set to a Unix socket path, every ONNX Runtime call made while something listens
there connects to it and waits until that connection is closed: the test (``tests.serve.gate.InferenceGate``)
decides when inference ends, instead of the host's speed. Calls made while nothing listens there (the
self-test at start-up) run as usual.
"""

from __future__ import annotations

import os
import socket
from typing import Any

GATE = os.environ.get("DEPLOYKIT_TEST_GATE")

if GATE:
    import onnxruntime

    _run = onnxruntime.InferenceSession.run

    def _held_run(self: Any, *args: Any, **kwargs: Any) -> Any:
        if os.path.exists(GATE):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as gate:
                gate.connect(GATE)
                gate.recv(1)  # returns when the test closes the connection: the gate is open
        return _run(self, *args, **kwargs)

    onnxruntime.InferenceSession.run = _held_run  # type: ignore[method-assign]
