"""Untrusted bytes -> a uint8 RGB array, or an ImageError that the gateway answers with a 4xx.

We decode ourselves rather than take BentoML's `PIL.Image` parameter, which answers 500 to garbage,
trusts the declared content type and decodes any size. The decoder itself (allowed formats
sniffed from the bytes, the pixel limit checked on the header, EXIF orientation, first GIF frame,
every mode to 8-bit RGB) is `store/images.py`, shared with the trainer so an ImageFolder is decoded
as a request is; its names are re-exported here for the gateway, the tests and the load test. This
module adds what only the service needs: `DecodeBudget`.
"""
from __future__ import annotations

import asyncio
import contextlib

# Re-exported: the gateway, the tests and the load test import them from here.
from store.images import ImageError, decode_bytes, decode_image, open_image, to_rgb_array  # noqa: F401

from . import metrics


# `server.max_decoding_pixels` counts pixels as PIL holds an RGB image decoded: 4 bytes each.
BYTES_PER_BUDGET_PIXEL = 4


class DecodeBudget:
    """At most `capacity` bytes of decoding at once, across all requests; the rest wait for room.

    Each image takes what decoding it costs by its mode and size (`store.images.decode_bytes`: a
    16-bit or RGBA image more than a palette one of the same pixels), read from its header. The pixel
    limit bounds one image, not how many are decoded side by side: the gateway accepts `max_inflight`
    requests of up to `max_batch_images` each. An image above the whole budget is decoded alone rather
    than refused (the per-image limit decides refusals).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self.waiting = 0
        self._cond: asyncio.Condition | None = None  # made inside the event loop that uses it

    @contextlib.asynccontextmanager
    async def take(self, amount: int):
        if self._cond is None:
            self._cond = asyncio.Condition()
        need = min(amount, self.capacity)
        async with self._cond:
            if self.used + need > self.capacity:
                self.waiting += 1
                metrics.IN_GATEWAY.labels("decode_waiting").inc()
                try:
                    await self._cond.wait_for(lambda: self.used + need <= self.capacity)
                finally:
                    self.waiting -= 1
                    metrics.IN_GATEWAY.labels("decode_waiting").dec()
            self.used += need
        try:
            yield
        finally:
            async with self._cond:
                self.used -= need
                self._cond.notify_all()
