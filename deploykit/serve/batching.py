"""Dynamic batching: one thread per model groups concurrent requests into one ONNX Runtime call.

Request threads (the HTTP server's handler threads) preprocess their images, then :meth:`Batcher.submit` the
arrays and wait. The batcher thread takes the oldest request, adds queued ones while they fit in
``max_batch_size`` rows, and waits up to ``max_delay`` for more only while other requests are known to be on
their way (``incoming``), so a lone client never pays the batching delay. With ``instances`` > 1 (Triton's
instance count) that many batcher threads take batches from the same queue and run them at the same time on
the one ONNX Runtime session (``run`` is thread-safe): requests run side by side while an instance is free,
and are batched once every instance is busy. With a ``solo_run`` (on CPU, a session with more threads), a
call that starts while nothing else is running, queued or on its way takes it: a lone request gets every
core, requests side by side get an instance each. The queue is bounded: a full queue raises
:class:`QueueFull` at once (503 + Retry-After) instead of growing without limit.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from deploykit.runtime import pad_batch
from deploykit.serve.answers import QueueFull, RequestTimeout

log = logging.getLogger("deploykit.serve")

RunFn = Callable[[np.ndarray], list[np.ndarray]]
BatchHook = Callable[[int, float, bool], None]


@dataclass(eq=False)  # identity: a timed-out request is found in (and removed from) the queue by itself
class _Item:
    array: np.ndarray
    rows: int
    enqueued: float
    deadline: float
    event: threading.Event
    outputs: list[np.ndarray] | None = None
    error: BaseException | None = None
    picked: float = 0.0
    inference_s: float = 0.0
    batch_rows: int = 0
    abandoned: bool = False


@dataclass
class Ticket:
    """A request announced with :meth:`Batcher.incoming`."""

    submitted: bool = False


@dataclass(frozen=True)
class BatchResult:
    """Outputs for one submitted array, with where its time went."""

    outputs: list[np.ndarray]
    queue_s: float
    inference_s: float
    batch_rows: int


class Batcher:
    """A bounded request queue and the thread that runs batches of it through ``run``.

    Args:
        run: input batch -> list of outputs (first axis = batch).
        max_batch_size: most rows per ONNX Runtime call; a larger request runs alone.
        max_delay: seconds to wait for more requests while others are being preprocessed and no other
            instance is free.
        max_queue: most requests waiting; more raise ``QueueFull``.
        static_batch: the model's fixed batch size, or None when the batch axis is dynamic. A static-batch
            model runs one request at a time, split into chunks of that size and padded.
        instances: ONNX Runtime calls in flight at once (one batcher thread each).
        on_batch: called with (rows, inference seconds, whether ``solo_run`` ran it) after each call, for
            metrics.
        solo_run: used instead of ``run`` for a call that starts while no other call runs and no other
            request is queued or on its way (on CPU: a session with all the cores, where ``run`` has a share).
    """

    def __init__(
        self,
        run: RunFn,
        *,
        name: str,
        max_batch_size: int = 8,
        max_delay: float = 0.005,
        max_queue: int = 64,
        static_batch: int | None = None,
        on_batch: BatchHook | None = None,
        instances: int = 1,
        solo_run: RunFn | None = None,
    ) -> None:
        self.run_fn = run
        self.solo_run_fn = solo_run
        self.name = name
        self.max_batch_size = max_batch_size
        self.max_delay = max_delay
        self.max_queue = max_queue
        self.static_batch = static_batch
        self.on_batch = on_batch
        self._pending: deque[_Item] = deque()
        self._cond = threading.Condition()
        self._incoming = 0
        self._running = 0
        self._closed = False
        self._threads = [
            threading.Thread(target=self._loop, name=f"batcher-{name}-{i + 1}", daemon=True)
            for i in range(max(1, instances))
        ]
        for thread in self._threads:
            thread.start()

    @property
    def queued(self) -> int:
        return len(self._pending)

    @contextmanager
    def incoming(self) -> Iterator[Ticket]:
        """Mark a request as on its way (being decoded), so that a forming batch waits for it.

        Call :meth:`submit` with the ticket inside the block: the request then stops counting as incoming
        in the same step as it joins the queue, so the batcher never sees it as neither.
        """
        ticket = Ticket()
        with self._cond:
            self._incoming += 1
        try:
            yield ticket
        finally:
            if not ticket.submitted:
                with self._cond:
                    self._incoming -= 1
                    self._cond.notify_all()

    def submit(self, array: np.ndarray, timeout: float, ticket: Ticket | None = None) -> BatchResult:
        """Queue ``array`` (batch axis first), wait for its outputs at most ``timeout`` seconds.

        Raises ``QueueFull`` when the queue is full or the batcher is stopping, ``RequestTimeout`` when the
        outputs are not ready in time; re-raises an inference error.
        """
        now = time.monotonic()
        item = _Item(array, int(array.shape[0]), now, now + timeout, threading.Event())
        with self._cond:
            if ticket is not None and not ticket.submitted:
                ticket.submitted = True
                self._incoming -= 1
            if self._closed:
                raise QueueFull(f"Model {self.name!r} is shutting down.", retry_after=5)
            if len(self._pending) >= self.max_queue:
                raise QueueFull(
                    f"Model {self.name!r} is overloaded ({self.max_queue} requests queued); retry later."
                )
            self._pending.append(item)
            # One waiter is enough: either idle instances wait (any one may take it), or the one instance
            # that is forming a batch does (the last free one), never both.
            self._cond.notify()
        if not item.event.wait(timeout):
            with self._cond:
                if item.event.is_set():
                    pass  # finished between the timeout and the lock
                else:
                    item.abandoned = True
                    if item in self._pending:
                        self._pending.remove(item)
                    raise RequestTimeout(
                        f"The request waited more than {timeout:g} s for model {self.name!r}."
                    )
        if item.error is not None:
            raise item.error
        assert item.outputs is not None
        return BatchResult(item.outputs, item.picked - item.enqueued, item.inference_s, item.batch_rows)

    def close(self, timeout: float = 5.0) -> None:
        """Finish the queued requests, then stop the threads (waiting at most ``timeout`` seconds in all)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _take_batch(self) -> tuple[list[_Item], bool] | None:
        """The next batch, and whether it runs solo; it counts as running until :meth:`_done`."""
        with self._cond:
            while not self._pending:
                if self._closed:
                    return None
                self._cond.wait()
            batch = [self._pending.popleft()]
            rows = batch[0].rows
            deadline = time.monotonic() + self.max_delay
            # while another instance is free, the next request runs there, side by side with this one
            another_free = self._running + 1 < len(self._threads)
            while rows < self.max_batch_size and self.static_batch is None and not another_free:
                if self._pending:
                    if rows + self._pending[0].rows > self.max_batch_size:
                        break
                    item = self._pending.popleft()
                    batch.append(item)
                    rows += item.rows
                    continue
                remaining = deadline - time.monotonic()
                if self._incoming <= 0 or remaining <= 0 or self._closed:
                    break
                self._cond.wait(remaining)
            alone = self._running == 0 and not self._pending and self._incoming <= 0
            self._running += 1
            return batch, alone and self.solo_run_fn is not None

    def _done(self) -> None:
        with self._cond:
            self._running -= 1

    def _loop(self) -> None:
        while True:
            taken = self._take_batch()
            if taken is None:
                return
            batch, solo = taken
            now = time.monotonic()
            live = []
            for item in batch:
                item.picked = now
                if item.abandoned:
                    continue
                if now > item.deadline:
                    item.error = RequestTimeout(
                        f"The request waited too long in the queue of model {self.name!r}."
                    )
                    item.event.set()
                    continue
                live.append(item)
            if live:
                self._run(live, solo)
            else:
                self._done()

    def _run(self, batch: list[_Item], solo: bool) -> None:
        """Run ``batch`` and answer its requests. The call stops counting as running before they wake, so
        that a client's next request (closed loop) finds the batcher idle."""
        run = self.solo_run_fn if solo and self.solo_run_fn is not None else self.run_fn
        try:
            start = time.perf_counter()
            if self.static_batch is not None:
                outputs = self._run_static(batch[0].array, run)
            elif len(batch) == 1:
                outputs = run(batch[0].array)
            else:
                outputs = run(np.concatenate([item.array for item in batch]))
            elapsed = time.perf_counter() - start
        except Exception as exc:  # handed to every waiting request thread, which logs it once as a 500
            self._done()
            for item in batch:
                item.error = exc
                item.event.set()
            return
        self._done()
        rows = sum(item.rows for item in batch)
        offset = 0
        for item in batch:
            item.outputs = (
                [out[offset : offset + item.rows] for out in outputs] if len(batch) > 1 else outputs
            )
            item.inference_s = elapsed
            item.batch_rows = rows
            offset += item.rows
            item.event.set()
        if self.on_batch is not None:
            try:
                self.on_batch(rows, elapsed, solo)
            except Exception:  # metrics must never break inference
                log.exception("batch metrics hook failed")

    def _run_static(self, array: np.ndarray, run: RunFn) -> list[np.ndarray]:
        size = self.static_batch or 1
        rows = array.shape[0]
        if rows == size:
            return run(array)
        chunks: list[list[np.ndarray]] = []
        for start in range(0, rows, size):
            chunk = array[start : start + size]
            n = chunk.shape[0]
            chunks.append([out[:n] for out in run(pad_batch(chunk, size))])
        return [np.concatenate(parts) for parts in zip(*chunks, strict=True)]
