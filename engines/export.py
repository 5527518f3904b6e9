"""Export a stored checkpoint to ONNX, OpenVINO IR and int8 ONNX, cached next to the weights.

Artefacts live in the checkpoint's folder, under
    engines/<first 16 hex of the weights' sha256>/<artefact key>/
where the key names the artefact's format version and the library versions that produced it, so a
restart finds them (no second export) and a new weights file, exporter or runtime never reuses a
stale one. A lock file per artefact folder makes concurrent workers export once: the others wait
and then read the finished file. Files are written under a temporary name and renamed into place,
so a killed export never leaves a half-written artefact that looks finished; each file's size and
sha256 are recorded beside it (`NAME.sha256`, store.durable), so one damaged afterwards (truncated by
a full disk or by hand) is exported again instead of being loaded by every later start.

Where the checkpoint's folder cannot be written (the store mounted read-only), new artefacts go to
the state folder instead (`store.paths.state_dir()/engines/NAME-VERSION/...`), and the ones already
beside the weights (`make engines` before the store was frozen) are still read from there.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import time
import warnings
from pathlib import Path

import torch

from store import Manifest
from store.durable import intact, record, sidecar, writable
from store.paths import state_dir

from .base import ServingGraph
from .calibration import CalibrationSet

log = logging.getLogger(__name__)

ENGINES_DIR = "engines"
OPSET = 18  # the dynamo exporter's default; matches eager to ~1e-6 relative (engines/verify.py checks it)
FORMAT_VERSION = 1  # bump when the graph we export changes (normaliser, input layout, ...)
MAX_BATCH = 1024  # upper bound of the dynamic batch dimension


def _version(module: str) -> str:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return "none"


def onnx_key() -> str:
    return f"onnx-v{FORMAT_VERSION}-opset{OPSET}-torch{torch.__version__.split('+')[0]}"


def openvino_key() -> str:
    return f"{onnx_key()}-openvino{_version('openvino')}"


INT8_RECIPE = "ma"  # MinMax ranges averaged over calibration batches (see quantize_int8); part of every key


def int8_key(calib: CalibrationSet) -> str:
    digest = hashlib.sha256(calib.images.numpy().tobytes()).hexdigest()[:8]
    return f"{onnx_key()}-int8qdq{INT8_RECIPE}-ort{_version('onnxruntime')}-calib{digest}"


def own_cache_dir(folder: Path, manifest: Manifest) -> Path:
    """The engines folder of this checkpoint's weights (keyed by their sha256), beside them."""
    return Path(folder) / ENGINES_DIR / (manifest.sha256[:16] or "unhashed")


def state_cache_dir(folder: Path, manifest: Manifest) -> Path:
    """The same in the state folder, for a store that cannot be written."""
    folder = Path(folder)
    return state_dir() / ENGINES_DIR / f"{folder.parent.name}-{folder.name}" / (manifest.sha256[:16] or "unhashed")


def cache_dir(folder: Path, manifest: Manifest) -> Path:
    """Where this checkpoint's engine artefacts and records are written: beside the weights, else (a
    read-only store) in the state folder."""
    own = own_cache_dir(folder, manifest)
    return own if writable(own) else state_cache_dir(folder, manifest)


def cache_dirs(folder: Path, manifest: Manifest) -> list[Path]:
    """Where they are looked for: beside the weights first, then the state folder."""
    own, state = own_cache_dir(folder, manifest), state_cache_dir(folder, manifest)
    return [own] if own == state else [own, state]


def whole(path: Path) -> bool:
    """The file is there and, where its size and sha256 were recorded, matches them."""
    if not path.is_file():
        return False
    if sidecar(path).exists() and not intact(path):
        log.warning("%s does not match its recorded size and sha256 (truncated or changed): building it again",
                    path)
        return False
    return True


def find_cached(folder: Path, manifest: Manifest, key: str, *names: str) -> Path | None:
    """The first cache folder whose `key` holds every one of `names`, whole."""
    for d in cache_dirs(folder, manifest):
        if all(whole(d / key / n) for n in names):
            return d / key
    return None


@contextlib.contextmanager
def _locked(path: Path):
    path.mkdir(parents=True, exist_ok=True)
    with open(path / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
        yield


def _publish(tmp: Path, final: Path) -> None:
    os.replace(tmp, final)
    record(final)


def export_onnx(model: torch.nn.Module, manifest: Manifest, out: Path) -> Path:
    """The network with its `InputNormalizer`, uint8 NCHW input `images`, dynamic batch -> `out`.

    PyTorch's dynamo-based exporter (`torch.onnx.export(dynamo=True)`), weights inlined in the file
    (the models here are at most ~21 MB, under protobuf's 2 GB limit).
    """
    graph = ServingGraph(model, manifest).eval()
    r = manifest.resolution
    example = torch.randint(0, 256, (2, 3, r, r), dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    t0 = time.perf_counter()
    quiet = logging.getLogger("onnx_ir")  # logs every deduplicated initializer at INFO
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph, (example,), str(tmp), input_names=["images"], output_names=["logits"],
            dynamic_shapes=({0: batch},), opset_version=OPSET, dynamo=True, external_data=False,
            verbose=False,
        )
    quiet.setLevel(level)
    _publish(tmp, out)
    log.info("exported %s to ONNX in %.1f s: %s", manifest.variant, time.perf_counter() - t0, out)
    return out


def onnx_path(model_fn, manifest: Manifest, folder: Path) -> Path:
    """The cached ONNX file of this checkpoint, exported on first use. `model_fn()` builds the model."""
    found = find_cached(folder, manifest, onnx_key(), "model.onnx")
    if found is not None:
        return found / "model.onnx"
    d = cache_dir(folder, manifest) / onnx_key()
    out = d / "model.onnx"
    with _locked(d):
        if not whole(out):  # another worker may have finished it while we waited
            export_onnx(model_fn(), manifest, out)
    return out


def openvino_path(onnx_file: Path, manifest: Manifest, folder: Path) -> Path:
    """The cached OpenVINO IR (`model.xml` + `model.bin`, fp32 weights) converted from the ONNX file."""
    import openvino as ov

    found = find_cached(folder, manifest, openvino_key(), "model.xml", "model.bin")
    if found is not None:
        return found / "model.xml"
    d = cache_dir(folder, manifest) / openvino_key()
    out = d / "model.xml"
    with _locked(d):
        if not (whole(out) and whole(out.with_suffix(".bin"))):
            t0 = time.perf_counter()
            tmp = d / f"tmp{os.getpid()}"
            tmp.mkdir(exist_ok=True)
            # fp32 weights in the IR: precision is chosen at compile time (INFERENCE_PRECISION_HINT).
            ov.save_model(ov.convert_model(str(onnx_file)), str(tmp / "model.xml"), compress_to_fp16=False)
            _publish(tmp / "model.bin", out.with_suffix(".bin"))  # the .xml last: it marks completion
            _publish(tmp / "model.xml", out)
            shutil.rmtree(tmp, ignore_errors=True)
            log.info("converted %s to OpenVINO IR in %.1f s", manifest.variant, time.perf_counter() - t0)
    return out


def cpu_has_vnni() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


class _Reader:
    """ONNX Runtime's calibration reader over the calibration images, in batches of 16."""

    def __init__(self, images: torch.Tensor) -> None:
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        self.batches = iter([{"images": images[i:i + 16].contiguous().numpy()} for i in range(0, len(images), 16)])

    def get_next(self):
        return next(self.batches, None)


def quantize_int8(onnx_file: Path, calib: CalibrationSet, out: Path) -> Path:
    """Static post-training quantisation, QDQ format, calibrated on the calibration images.

    Weights int8 per channel, activations uint8, MinMax ranges averaged over the calibration batches.
    QDQ runs on ONNX Runtime and is read by OpenVINO as int8 (FakeQuantize), so both int8 engines share
    this one file.
    # NOTE: on CPUs without VNNI, u8s8 kernels can saturate (ONNX Runtime's quantisation guide);
    # there weights use 7 bits (`reduce_range`).
    # Per-batch ranges averaged (CalibMovingAverage), not plain MinMax: two outlier images leave
    # ordinary ones three int8 levels (b0 9.8% top-1 agreement, averaged 98.8%; Percentile 22-28%,
    # Entropy 9.8%; benchmarks/engines.md, "Accuracy of the int8 engines").
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    t0 = time.perf_counter()
    tmp_pre = out.with_name(f"pre{os.getpid()}.onnx")
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quant_pre_process(str(onnx_file), str(tmp_pre), skip_symbolic_shape=True)
        quantize_static(
            str(tmp_pre), str(tmp), _Reader(calib.images), quant_format=QuantFormat.QDQ, per_channel=True,
            reduce_range=not cpu_has_vnni(), activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax, extra_options={"CalibMovingAverage": True},
        )
    tmp_pre.unlink(missing_ok=True)
    _publish(tmp, out)
    log.info("quantised to int8 (static, QDQ, %d calibration images) in %.1f s",
             len(calib.images), time.perf_counter() - t0)
    return out


def int8_path(onnx_file: Path, calib: CalibrationSet, manifest: Manifest, folder: Path) -> Path:
    found = find_cached(folder, manifest, int8_key(calib), "model.int8.onnx")
    if found is not None:
        return found / "model.int8.onnx"
    d = cache_dir(folder, manifest) / int8_key(calib)
    out = d / "model.int8.onnx"
    with _locked(d):
        if not whole(out):
            quantize_int8(onnx_file, calib, out)
    return out


def int8_cached(ctx) -> bool:
    """The int8 QDQ file and the fp32 export it came from are stored whole (`Engine.cached`)."""
    if ctx.calibration is None or find_cached(ctx.folder, ctx.manifest, onnx_key(), "model.onnx") is None:
        return False
    return find_cached(ctx.folder, ctx.manifest, int8_key(ctx.calibration), "model.int8.onnx") is not None


def sha256_of(*files: Path) -> str:
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
    return h.hexdigest()
