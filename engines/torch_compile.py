"""torch.compile (inductor) with frozen weights, channels_last, one static shape per batch size.

Compilation costs 41-46 s per input shape with an empty cache on a 2-core CPU and 2-4 s warm
(benchmarks/engines.md), so the engine compiles only the worker's batch sizes, at warm-up, and pads the rest.
"""
from __future__ import annotations

import torch

from .base import BuildContext, Engine, ServingGraph, run_in_buckets


class TorchCompileEngine(Engine):
    name = "torch-compile"
    runtime = "torch-compile"
    precision = "fp32"

    def __init__(self, model: torch.nn.Module, manifest, device: str = "cpu", batch_sizes=(1, 8)) -> None:
        import torch._inductor.config as inductor_config

        # Freezing folds the weights into constants (conv+bn fusion, prepacked kernels); valid
        # because serving never changes them.
        inductor_config.freezing = True
        self.device = torch.device(device)
        graph = ServingGraph(model, manifest).eval().to(self.device).to(memory_format=torch.channels_last)
        # On a GPU, CUDA graphs (mode reduce-overhead): one launch per batch instead of hundreds of
        # small kernels, which is what bounds a small model at batch 1 there. Static shapes only,
        # which the buckets guarantee. On the CPU there is no launch cost to save.
        mode = "reduce-overhead" if self.device.type == "cuda" else None
        self.fn = torch.compile(graph, dynamic=False, mode=mode)
        self.buckets = tuple(sorted(set(batch_sizes)))
        self.resolution = manifest.resolution
        self.reason = (f"torch.compile (inductor, frozen, channels_last{', CUDA graphs' if mode else ''}), "
                       f"static batch {list(self.buckets)}")

    @classmethod
    def build(cls, ctx: BuildContext) -> "TorchCompileEngine":
        return cls(ctx.model_fn(), ctx.manifest, ctx.device, ctx.batch_sizes)

    def _run(self, x: torch.Tensor, b: int) -> torch.Tensor:
        with torch.inference_mode():
            x = x.to(self.device).contiguous(memory_format=torch.channels_last)
            return self.fn(x).float().cpu()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return run_in_buckets(images, self.buckets, self._run)
