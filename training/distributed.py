"""torchrun plumbing: process group from the environment, rank-0 helpers, a cross-rank weight check."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_distributed(backend: str = "auto") -> tuple[int, int, int]:
    """(rank, world_size, local_rank); starts the process group when launched by torchrun."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, 0
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if world > 1 and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
    return rank, world, local


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def agree(value: float, op: str, device) -> float:
    """The max or min of `value` over all ranks (every rank gets the same answer); `value` alone otherwise."""
    if not is_distributed():
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.MIN)
    return float(t)


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()


@torch.no_grad()
def weight_digests(model: torch.nn.Module) -> list[list[float]]:
    """Every rank's (sum, sum of squares) of all parameters: equal when the ranks are in sync.

    Parameters only: BN running statistics are broadcast from rank 0 at each forward and then updated
    with each rank's own batch, so they legitimately differ after the last step (rank 0's are exported).
    """
    vals = [(float(p.double().sum()), float(p.double().square().sum())) for p in model.parameters()]
    mine = torch.tensor([sum(a for a, _ in vals), sum(b for _, b in vals)], dtype=torch.float64)
    if not is_distributed():
        return [mine.tolist()]
    out = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(out, mine)
    return [t.tolist() for t in out]
