"""The dynamic batcher with a real ONNX Runtime session: grouping, bounded queue, timeouts, static batches."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from deploykit.runtime import Predictor
from deploykit.serve.batching import Batcher, QueueFull, RequestTimeout

#: Seconds a held call waits for its gate: the test opens it long before, unless the test has already failed
#: (a gate that opened by itself after a few seconds would let a busy machine decide the outcome).
HOLD = 60.0


@pytest.fixture(scope="module")
def predictor(shapes_onnx: Path) -> Predictor:
    return Predictor.open(shapes_onnx)


def _inputs(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 64, 64), dtype=np.float32)


def test_concurrent_requests_share_a_call_and_get_their_own_rows(predictor: Predictor) -> None:
    gate = threading.Event()
    first_rows: list[int] = []
    calls: list[int] = []

    def run(batch: np.ndarray) -> list[np.ndarray]:
        if not first_rows:
            first_rows.append(batch.shape[0])
        gate.wait(HOLD)  # hold the first call so that the others queue up behind it
        calls.append(batch.shape[0])
        return predictor.run(batch)

    batcher = Batcher(run, name="shapes", max_batch_size=8, max_delay=0.05, max_queue=64)
    arrays = [_inputs(1, seed) for seed in range(7)]
    with ThreadPoolExecutor(7) as pool:
        futures = [pool.submit(batcher.submit, a, HOLD) for a in arrays]
        # the first call may already have taken more than one request
        deadline = time.monotonic() + 10
        while not first_rows or batcher.queued < 7 - first_rows[0]:
            assert time.monotonic() < deadline, "the other requests should queue behind the held call"
            threading.Event().wait(0.01)
        gate.set()
        results = [f.result() for f in futures]
    batcher.close()
    assert sum(calls) == 7
    assert max(calls) > 1
    for array, result in zip(arrays, results, strict=True):
        np.testing.assert_allclose(result.outputs[0], predictor.run(array)[0], rtol=1e-4, atol=1e-4)
        assert result.batch_rows >= 1


def test_full_queue_raises_at_once(predictor: Predictor) -> None:
    gate = threading.Event()

    taken = threading.Event()

    def run(batch: np.ndarray) -> list[np.ndarray]:
        taken.set()
        gate.wait(HOLD)
        return predictor.run(batch)

    batcher = Batcher(run, name="shapes", max_batch_size=1, max_delay=0, max_queue=1)
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(batcher.submit, _inputs(1), HOLD)
        assert taken.wait(HOLD)  # the batcher took the first one, and holds it
        queued = pool.submit(batcher.submit, _inputs(1), HOLD)
        while not batcher.queued:
            threading.Event().wait(0.01)
        with pytest.raises(QueueFull) as info:
            batcher.submit(_inputs(1), HOLD)
        assert info.value.status == 503
        assert info.value.headers["Retry-After"]
        gate.set()
        assert running.result().outputs[0].shape == (1, 6)
        assert queued.result().outputs[0].shape == (1, 6)
    batcher.close()


def test_timeout(predictor: Predictor) -> None:
    gate = threading.Event()

    def run(batch: np.ndarray) -> list[np.ndarray]:
        gate.wait(HOLD)
        return predictor.run(batch)

    batcher = Batcher(run, name="shapes", max_batch_size=1, max_delay=0, max_queue=4)
    with pytest.raises(RequestTimeout) as info:
        batcher.submit(_inputs(1), 0.05)
    assert info.value.status == 504
    gate.set()
    assert batcher.submit(_inputs(1), HOLD).outputs[0].shape == (1, 6)
    batcher.close()


def test_a_queued_request_times_out(predictor: Predictor) -> None:
    running = threading.Event()
    gate = threading.Event()

    def run(batch: np.ndarray) -> list[np.ndarray]:
        running.set()
        gate.wait(HOLD)
        return predictor.run(batch)

    batcher = Batcher(run, name="shapes", max_batch_size=1, max_delay=0, max_queue=4)
    with ThreadPoolExecutor(3) as pool:
        first = pool.submit(batcher.submit, _inputs(1), HOLD)  # taken at once, held by the gate
        assert running.wait(HOLD)
        # queued behind it; the later one times out first, and leaves a queue that still holds the other
        queued = [pool.submit(batcher.submit, _inputs(1), 0.5)]
        deadline = time.monotonic() + 10
        while batcher.queued < 1:
            assert time.monotonic() < deadline, "the request should queue behind the held call"
            threading.Event().wait(0.01)
        queued.append(pool.submit(batcher.submit, _inputs(1), 0.05))
        for future in queued[::-1]:
            with pytest.raises(RequestTimeout) as info:
                future.result()
            assert info.value.status == 504
        assert batcher.queued == 0  # the abandoned requests left the queue
        gate.set()
        assert first.result().outputs[0].shape == (1, 6)
    assert batcher.submit(_inputs(1), HOLD).outputs[0].shape == (1, 6)
    batcher.close()


def test_static_batch_model_is_split_and_padded(predictor: Predictor) -> None:
    seen: list[int] = []

    def run(batch: np.ndarray) -> list[np.ndarray]:
        seen.append(batch.shape[0])
        return predictor.run(batch)

    batcher = Batcher(run, name="shapes", max_batch_size=8, max_delay=0, max_queue=4, static_batch=2)
    array = _inputs(3)
    result = batcher.submit(array, HOLD)
    batcher.close()
    assert seen == [2, 2]
    np.testing.assert_allclose(result.outputs[0], predictor.run(array)[0], rtol=1e-4, atol=1e-4)


def test_inference_error_reaches_the_caller(predictor: Predictor) -> None:
    batcher = Batcher(predictor.run, name="shapes", max_batch_size=4, max_delay=0, max_queue=4)
    with pytest.raises(Exception, match="input"):
        batcher.submit(np.zeros((1, 3, 5, 5), dtype=np.float32), HOLD)
    assert batcher.submit(_inputs(1), HOLD).outputs[0].shape == (1, 6)
    batcher.close()


def test_instances_run_side_by_side_and_batch_once_all_are_busy(predictor: Predictor) -> None:
    both_running = threading.Barrier(2, timeout=HOLD)  # passes only if two calls are in flight at once
    gate = threading.Event()
    calls: list[int] = []
    in_flight = [0, 0]  # now, most
    lock = threading.Lock()

    def run(batch: np.ndarray) -> list[np.ndarray]:
        with lock:
            calls.append(batch.shape[0])
            first_two = len(calls) <= 2
            in_flight[0] += 1
            in_flight[1] = max(in_flight)
        if first_two:
            both_running.wait()
            gate.wait(HOLD)  # keep both instances busy while the next requests queue up
        outputs = predictor.run(batch)
        with lock:
            in_flight[0] -= 1
        return outputs

    batcher = Batcher(run, name="shapes", max_batch_size=8, max_delay=0.05, max_queue=64, instances=2)
    arrays = [_inputs(1, seed) for seed in range(8)]
    with ThreadPoolExecutor(8) as pool:
        first = [pool.submit(batcher.submit, a, HOLD) for a in arrays[:2]]
        while len(calls) < 2:
            threading.Event().wait(0.01)
        rest = [pool.submit(batcher.submit, a, HOLD) for a in arrays[2:]]
        while batcher.queued < 6:
            threading.Event().wait(0.01)
        gate.set()
        results = [f.result() for f in first + rest]
    batcher.close()
    assert calls[:2] == [1, 1]
    assert sum(calls) == 8
    assert in_flight[1] == 2  # never more calls at once than instances
    assert max(calls[2:]) > 1, f"queued requests should be batched once both instances were busy: {calls}"
    for array, result in zip(arrays, results, strict=True):
        np.testing.assert_allclose(result.outputs[0], predictor.run(array)[0], rtol=1e-4, atol=1e-4)


def test_one_instance_never_runs_two_calls_at_once(predictor: Predictor) -> None:
    in_flight = [0]
    most = [0]
    lock = threading.Lock()

    def run(batch: np.ndarray) -> list[np.ndarray]:
        with lock:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
        threading.Event().wait(0.02)
        with lock:
            in_flight[0] -= 1
        return predictor.run(batch)

    batcher = Batcher(run, name="shapes", max_batch_size=1, max_delay=0, max_queue=64)
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda seed: batcher.submit(_inputs(1, seed), HOLD), range(6)))
    batcher.close()
    assert len(results) == 6
    assert most[0] == 1


def test_a_lone_call_runs_solo_and_calls_side_by_side_share(predictor: Predictor) -> None:
    used: list[str] = []
    first_running = threading.Event()
    release = threading.Event()

    def session(kind: str):  # type: ignore[no-untyped-def]
        def run(batch: np.ndarray) -> list[np.ndarray]:
            used.append(kind)
            if len(used) == 1:
                first_running.set()
                release.wait(HOLD)  # hold the first call while the second request arrives
            return predictor.run(batch)

        return run

    seen: list[bool] = []
    batcher = Batcher(
        session("shared"),
        solo_run=session("solo"),
        name="shapes",
        max_batch_size=1,
        max_delay=0,
        max_queue=8,
        instances=2,
        on_batch=lambda _rows, _seconds, solo: seen.append(solo),
    )
    arrays = [_inputs(1, seed) for seed in range(4)]
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(batcher.submit, arrays[0], HOLD)
        assert first_running.wait(HOLD)
        # answered while the first call is still held: it ran on the other instance, with the shared session
        second = batcher.submit(arrays[1], HOLD)
        release.set()
        results = [first.result(timeout=20), second]
    results.append(batcher.submit(arrays[2], HOLD))  # alone again
    with batcher.incoming():  # another request is being decoded: this call must leave it a core
        results.append(batcher.submit(arrays[3], HOLD))
    batcher.close()
    assert used == ["solo", "shared", "solo", "shared"]
    assert sorted(seen) == [False, False, True, True]  # what the metrics count
    for array, result in zip(arrays, results, strict=True):
        np.testing.assert_allclose(result.outputs[0], predictor.run(array)[0], rtol=1e-4, atol=1e-4)


def test_without_a_solo_session_every_call_uses_run(predictor: Predictor) -> None:
    seen: list[bool] = []
    batcher = Batcher(
        predictor.run,
        name="shapes",
        max_batch_size=4,
        max_delay=0,
        max_queue=8,
        on_batch=lambda _rows, _seconds, solo: seen.append(solo),
    )
    batcher.submit(_inputs(1), HOLD)
    batcher.close()
    assert seen == [False]
