"""Image bytes -> the uint8 (1, 3, R, R) batch a variant takes, without stalling the event loop."""
from __future__ import annotations

from typing import Any

import anyio.to_thread
import numpy as np

from .images import BYTES_PER_BUDGET_PIXEL, DecodeBudget, decode_bytes, open_image, to_rgb_array
from .priority import lower_thread_priority

# A small image decodes faster (a 28x28 PNG: ~0.1 ms) than a thread hand-off, whose GIL hand-offs stall
# the loop (benchmarks/serving.md); 224x224, the ImageNet input, is ~1 ms as a JPEG. Larger: a thread.
INLINE_DECODE_PIXELS = 256 * 256


def resize_for(batch: np.ndarray, manifest: Any) -> np.ndarray:
    """A decoded batch resized and cropped to another variant's input (a shadow's)."""
    import torch

    from store import resize_crop

    return resize_crop(torch.from_numpy(batch), manifest).numpy()


class Decoder:
    """Decodes uploads at each variant's resolution, under the pixel limits of `server`.

    The header is read on the event loop (cheap, and it enforces `max_pixels`). Images of at most
    INLINE_DECODE_PIXELS are decoded there too; larger ones in a thread, so a big photo never stalls
    the loop, and only while the decoding budget (`max_decoding_pixels`, as bytes of RGB pixels) has
    room for what their decoding takes by mode and size, so that many large images at once cannot
    exhaust the memory. The decoding threads run `nice` steps below the event loop: a burst of big
    uploads then waits for the CPU behind every other route's requests instead of ahead of them.
    """

    def __init__(self, manifests: dict[str, Any], max_pixels: int, max_decoding_pixels: int, nice: int = 0) -> None:
        self.manifests = manifests  # variant -> its checkpoint manifest (resolution, resize, mean/std)
        self.max_pixels = max_pixels
        self.budget = DecodeBudget(max_decoding_pixels * BYTES_PER_BUDGET_PIXEL)
        self.nice = nice

    async def prepare(self, data: bytes, variant: str) -> np.ndarray:
        """Bytes -> uint8 (1, 3, R, R) at the variant's resolution; raises ImageError (4xx)."""
        img = open_image(data, max_pixels=self.max_pixels)
        w, h = img.size
        if w * h <= INLINE_DECODE_PIXELS:
            return self._pixels(img, variant, data)
        m = self.manifests[variant]
        async with self.budget.take(decode_bytes(img, m.resize or m.resolution)):
            return await anyio.to_thread.run_sync(self._pixels_nicer, img, variant, data)

    def _pixels_nicer(self, img: Any, variant: str, data: bytes | None = None) -> np.ndarray:
        lower_thread_priority(self.nice)
        return self._pixels(img, variant, data)

    def _pixels(self, img: Any, variant: str, data: bytes | None = None) -> np.ndarray:
        import torch

        from store import resize_crop

        m = self.manifests[variant]
        rgb = to_rgb_array(img, min_side=m.resize or m.resolution, data=data)
        return resize_crop(torch.from_numpy(rgb), m).numpy()
