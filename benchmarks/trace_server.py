"""``deploykit serve`` with a timestamp at each stage of every request, for ``bench_trace.py``.

    python benchmarks/trace_server.py OUT.json MODEL --port N [deploykit serve options]

It wraps (never changes) the functions a request passes through and records ``time.perf_counter_ns()``
(CLOCK_MONOTONIC on Linux: one clock for every process of the machine, so the client's marks line up with
the server's). On SIGTERM each worker writes its marks to OUT.json (with ``--workers`` > 1, the last one
wins: trace one worker). Stages, in the order one request passes them:

- ``parsed``: gunicorn has read the request line and headers (the handler thread is running);
- ``read``: the body is read and its images taken out (multipart, JSON or raw);
- ``submit``: the images are decoded and preprocessed, the batch goes to the batcher;
- ``run`` / ``ran``: the ONNX Runtime call starts and returns (in whichever thread runs it);
- ``result``: the request's thread has its outputs back;
- ``answer``: the JSON answer is built;
- ``sent``: gunicorn's last write of the answer to the socket returned;
- ``done``: gunicorn is done with the request (logging, keep-alive bookkeeping).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

MARKS: list[tuple[str, int]] = []


def mark(stage: str) -> None:
    MARKS.append((stage, time.perf_counter_ns()))  # list.append is atomic under the GIL


def around(owner: Any, name: str, before: str | None, after: str | None) -> None:
    """Replace ``owner.name`` by a wrapper that marks ``before`` on entry and ``after`` on return."""
    original = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if before:
            mark(before)
        result = original(*args, **kwargs)
        if after:
            mark(after)
        return result

    setattr(owner, name, wrapper)


def timed_run(run: Callable[..., Any] | None) -> Callable[..., Any] | None:
    if run is None:
        return None

    def wrapper(batch: Any) -> Any:
        mark("run")
        outputs = run(batch)
        mark("ran")
        return outputs

    return wrapper


def install(out: Path) -> None:
    import gunicorn.http.wsgi as gunicorn_wsgi
    import gunicorn.workers.gthread as gthread

    import deploykit.serve.batching as batching
    import deploykit.serve.routes as routes
    import deploykit.serve.runner as runner

    around(gthread.ThreadWorker, "handle_request", "parsed", "done")
    around(gunicorn_wsgi.util, "write", None, "sent")  # gunicorn's Response writes through util.write
    around(routes, "read_images", None, "read")
    # the JSON answer: json_bytes since the predict routes run in front of Flask, json_response before
    around(routes, "json_bytes" if hasattr(routes, "json_bytes") else "json_response", None, "answer")
    around(batching.Batcher, "submit", "submit", "result")

    batcher_init = batching.Batcher.__init__

    def init(self: Any, run: Any, **kwargs: Any) -> None:
        kwargs["solo_run"] = timed_run(kwargs.get("solo_run"))
        batcher_init(self, timed_run(run), **kwargs)

    batching.Batcher.__init__ = init  # type: ignore[method-assign]

    worker_class = runner.worker_class

    def traced_worker_class(*args: Any, **kwargs: Any) -> type:
        cls = worker_class(*args, **kwargs)
        handle_exit = cls.handle_exit

        def on_exit(self: Any, sig: int, frame: Any) -> None:
            out.write_text(json.dumps(MARKS))
            handle_exit(self, sig, frame)

        cls.handle_exit = on_exit
        return cls

    runner.worker_class = traced_worker_class


def main() -> None:
    out = Path(sys.argv[1])
    install(out)
    from deploykit.cli import app

    sys.argv = ["deploykit", "serve", *sys.argv[2:]]
    app()


if __name__ == "__main__":
    main()
