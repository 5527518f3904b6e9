"""Stand-ins shared by the service tests: a configuration, images, workers that drop or delay calls."""
import asyncio
import io
import random
import types

import numpy as np
from PIL import Image

from service.config import parse_config
from service.results import InferenceResult

CFG = {
    "default_route": "fashion",
    "variants": {"b0": {"model": "b0:latest"}, "mec": {"model": "mec:latest"}, "compact": {"model": "c:latest"},
                 "lite0": {"model": "l:latest"}},
    "routes": {"fashion": {"split": {"b0": 0.5, "mec": 0.25, "compact": 0.25}, "shadow": {"variant": "mec", "fraction": 1.0}},
               "imagenet": {"split": {"lite0": 1}}},
}


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


RGB = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8))


def photos(side: int = 224) -> list[bytes]:
    """Real photos (scikit-image's samples), centre-cropped to squares of `side` and encoded as JPEGs."""
    from skimage import data

    out = []
    for name in ("chelsea", "coffee", "rocket", "astronaut", "hubble_deep_field", "immunohistochemistry"):
        img = Image.fromarray(getattr(data, name)()).convert("RGB")
        s = min(img.size)
        img = img.crop(((img.width - s) // 2, (img.height - s) // 2, (img.width + s) // 2, (img.height + s) // 2))
        out.append(encode(img.resize((side, side), Image.BILINEAR), "JPEG", quality=90))
    return out


def huge_png(w=12000, h=12000) -> bytes:
    """A small file whose header declares w x h pixels (the data is a valid IDAT-less stub)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


def dropped(kind="aiohttp"):
    """What a dropped gateway -> worker connection raises. bentoml 1.4.30's client between services is
    aiohttp, which raises ClientOSError("Can not write request body ...") when a stalled worker has
    closed pooled connections. The httpx one is what its httpx-based client raises."""
    import aiohttp
    import httpx

    return {
        "aiohttp": aiohttp.ClientOSError(None, "Can not write request body for http://127.0.0.1:3000/predict"),
        "aiohttp-disconnected": aiohttp.ServerDisconnectedError(),
        "aiohttp-reset": aiohttp.ClientConnectionResetError("Cannot write to closing transport"),
        "httpx": httpx.RemoteProtocolError("Server disconnected without sending a response."),
    }[kind]


class FlakyWorker:
    """Drops the first `drops` calls (as a stalled worker's closed keep-alive connections do), or always
    raises `error`; else answers as a worker does, one record per image, every image class 1."""

    def __init__(self, drops, error=None, drop="aiohttp"):
        self.drops, self.calls, self.error, self.drop = drops, 0, error, drop
        self.to_async = self

    async def predict(self, batch):
        self.calls += 1
        if self.error is not None:
            raise self.error
        if self.calls <= self.drops:
            raise dropped(self.drop)
        scores = np.zeros((len(batch), 3), np.float32)
        scores[:, 1] = 1.0
        return InferenceResult(scores, 0.001, engine="fake").to_records()

    async def predict_shared(self, refs):
        """As the worker's: the batch that the references name in the gateway's shared memory."""
        from service.shm import ArenaReader

        images, verify = ArenaReader("b0").gather(refs)
        self.shared = getattr(self, "shared", 0) + 1
        out = await self.predict(images)
        verify()
        return out


def dispatcher_with(*workers, cfg=None):
    """A dispatcher whose variant b0 has these worker processes (replicas)."""
    from service.dispatch import Dispatcher

    return Dispatcher(cfg or parse_config(CFG), lambda variant: list(workers), {}, {"b0": len(workers)})


class TimedWorker(FlakyWorker):
    """Answers after `seconds`, and remembers the most calls it had at once."""

    def __init__(self, seconds):
        super().__init__(0)
        self.seconds, self.now, self.most = seconds, 0, 0

    async def predict(self, batch):
        self.now += 1
        self.most = max(self.most, self.now)
        try:
            await asyncio.sleep(self.seconds)
            return await super().predict(batch)
        finally:
            self.now -= 1


def gateway(cfg, manifests, problems=None):
    """A gateway assembled without a server: no workers, no checkpoints, only the manifests given."""
    from service.gateway import GatewayService

    gw = object.__new__(GatewayService)
    gw.cfg, gw.worker_attrs, gw.remote_services = cfg, {}, {}
    gw.assemble(manifests, dict(problems or {}), {})
    gw.router.rng = random.Random(0)
    return gw


def gateway_for_routes(problems=None, cfg=None):
    fashion = [f"f{i}" for i in range(10)]
    manifests = {v: types.SimpleNamespace(classes=fashion, num_classes=10) for v in ("b0", "mec", "compact")}
    manifests["lite0"] = types.SimpleNamespace(classes=[f"i{i}" for i in range(1000)], num_classes=1000)
    # a configuration that is no file: changes stay in memory
    return gateway(cfg or parse_config(CFG), manifests, problems)


def gateway_on_file(path, problems=None):
    """A gateway whose configuration comes from a file, as `effnet serve` starts it (route changes saved)."""
    from service.config import load_config

    return gateway_for_routes(problems, load_config(path))


async def reading_app(scope, receive, send):
    """An ASGI app that reads the whole body, then answers 200 `{}` (behind service.http_limits)."""
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})
