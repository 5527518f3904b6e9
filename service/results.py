"""What a worker (or an in-process variant) answers for a batch: `InferenceResult`.

Between processes the answer travels as a NumPy record array, one record per image (`to_records`,
`from_records`): BentoML's batcher splits a batchable API's answer along its first axis among the
calls it merged, and pickles an array with its buffer out of band, so a record array crosses the
call as cheaply as a plain score array and keeps every field with its own name and type.
A worker elsewhere (`effnet worker`) takes no pickle from the network (BentoML refuses it on a server's
entry service): it answers JSON instead (`to_wire`, `from_wire`).
"""
from __future__ import annotations

import base64
from dataclasses import dataclass, replace

import numpy as np

ENGINE_CHARS = 32  # an engine name in a record: "openvino", "onnxruntime", "torch-compile", ...


def record_dtype(classes: int) -> np.dtype:
    """One image's answer as a record: its K softmax scores, the seconds its batch took, the engine."""
    return np.dtype([("scores", np.float32, (classes,)), ("seconds", np.float32), ("engine", f"U{ENGINE_CHARS}")])


@dataclass(frozen=True)
class InferenceResult:
    scores: np.ndarray  # float32 (N, K): softmax scores, one row per image
    seconds: float  # the inference time of the batch these images ran in
    engine: str = ""  # the engine that ran it (engines.Engine.name)
    replica: str = ""  # who answered: "worker 1", "worker 2", ... or "in_process"
    # seconds the images waited before their inference started (gateway queue, transport, the
    # worker's queue): set by the gateway's coalescer (service.coalesce)
    waited: float = 0.0
    version: str = ""  # the store tag of the version that answered, where the variant has several (service/versions.py)

    def to_records(self) -> np.ndarray:
        """The worker's answer over HTTP: one record per image (see the module docstring)."""
        out = np.empty(len(self.scores), record_dtype(self.scores.shape[1]))
        out["scores"], out["seconds"], out["engine"] = self.scores, self.seconds, self.engine[:ENGINE_CHARS]
        return out

    @classmethod
    def from_records(cls, records: np.ndarray, replica: str = "") -> "InferenceResult":
        """The result of one call from the records it was answered; the batcher may have merged the call
        with others, whose batch time every record carries alike."""
        records = np.asarray(records)
        return cls(scores=records["scores"], seconds=float(records["seconds"].max(initial=0.0)),
                   engine=str(records["engine"][0]) if len(records) else "", replica=replica)

    def to_wire(self) -> dict:
        """The answer as JSON for a gateway across the network (service/worker_app.py): the scores as
        base64 float32, so that 1000 classes cost 5.3 bytes a score, not a decimal number each."""
        scores = np.ascontiguousarray(self.scores, dtype=np.float32)
        return {"scores": base64.b64encode(scores.tobytes()).decode(), "shape": list(scores.shape),
                "seconds": self.seconds, "engine": self.engine}

    @classmethod
    def from_wire(cls, answer: dict, replica: str = "") -> "InferenceResult":
        """`to_wire`'s answer back; ValueError when it is not one."""
        try:
            n, k = (int(x) for x in answer["shape"])
            scores = np.frombuffer(base64.b64decode(answer["scores"]), np.float32).reshape(n, k)
            return cls(scores=scores, seconds=float(answer["seconds"]), engine=str(answer.get("engine", "")),
                       replica=replica)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"not a worker's answer: {e}") from None

    def rows(self, start: int, stop: int, waited: float) -> "InferenceResult":
        """The answer for images start..stop of the batch, which waited `waited` seconds."""
        return replace(self, scores=self.scores[start:stop], waited=waited)
