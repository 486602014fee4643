"""The decode budget: how much memory the images being decoded at once may take (``--decode-budget-mb``).

A decoded image is far larger than its file (a 13 MB PNG of 38 megapixels is 154 MB of pixels), so what
clients send, not the server's options, would decide its peak memory. Each image's cost is known from its
header before a pixel is decoded (:func:`decode_cost`); a request takes that much of the budget for the
decode and gives it back once the image is a tensor. A request that does not fit waits, first come first
served, for at most ``--request-timeout`` (504); with ``--max-queue`` requests already waiting it is refused
at once (503); an image that needs more than the whole budget is refused (413).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

from deploykit.card import Preprocess
from deploykit.images import ImageHeader
from deploykit.serve.answers import QueueFull, RequestTimeout, ServeError

MB = 1024 * 1024
#: Bytes per decoded pixel: Pillow holds RGB in 4 bytes per pixel, and a conversion to RGB (from RGBA,
#: palette, CMYK, 16-bit...) holds the source and the result at once.
RGB_BYTES = 4
CONVERTED_BYTES = 8


def decode_cost(header: ImageHeader, pp: Preprocess, *, exact: bool) -> int:
    """The bytes that decoding the image of ``header`` for ``pp`` holds at its peak (an estimate from the
    header: the decoded pixels, at 4 bytes each, or 8 when the image must be converted to RGB)."""
    per_pixel = RGB_BYTES if header.mode == "RGB" else CONVERTED_BYTES
    return header.decoded_pixels(pp, exact=exact) * per_pixel


class DecodeBudget:
    """A byte budget shared by the request threads, granted in arrival order.

    Args:
        limit: bytes that may be reserved at once.
        max_waiting: reservations that may wait at once; one more is refused with 503.
    """

    def __init__(self, limit: int, *, max_waiting: int) -> None:
        self.limit = limit
        self.max_waiting = max_waiting
        self.used = 0
        self._waiting: deque[object] = deque()  # a ticket per reservation waiting, oldest first
        self._cond = threading.Condition()

    @contextmanager
    def reserve(self, cost: int, timeout: float, what: str) -> Iterator[None]:
        """Hold ``cost`` bytes of the budget for the block; ``what`` names the image in errors."""
        if cost > self.limit:
            raise ServeError(
                f"{what} needs about {cost / MB:.0f} MB to decode, more than the server's decode budget of "
                f"{self.limit / MB:.0f} MB (--decode-budget-mb). Send a smaller image.",
                status=413,
            )
        deadline = time.monotonic() + timeout
        ticket = object()
        with self._cond:
            if self._waiting or self.used + cost > self.limit:
                if len(self._waiting) >= self.max_waiting:
                    raise QueueFull(
                        f"The server is decoding as many images as its memory allows and {self.max_waiting} "
                        "more are waiting; retry later."
                    )
                self._waiting.append(ticket)
                try:
                    while self._waiting[0] is not ticket or self.used + cost > self.limit:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            raise RequestTimeout(
                                f"The request waited more than {timeout:g} s for memory to decode {what}."
                            )
                        self._cond.wait(remaining)
                finally:
                    self._waiting.remove(ticket)
                    self._cond.notify_all()
            self.used += cost
        try:
            yield
        finally:
            with self._cond:
                self.used -= cost
                self._cond.notify_all()
