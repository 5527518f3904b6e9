"""torchrun plumbing: the launch command (one node or several), process group from the environment,
rank-0 helpers, a cross-rank weight check."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

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


@dataclass(frozen=True)
class Launch:
    """How `effnet train` starts torchrun: `nproc` processes on this node, of `nnodes` nodes in all.

    Several nodes meet at `rdzv_endpoint` (HOST:PORT of node 0) through torchrun's c10d rendezvous,
    whose store node 0 hosts. The rendezvous, not `node_rank`, hands out the global ranks, so the
    node whose process gets rank 0 (the one that evaluates and saves) is any of them.
    """

    nproc: int = 1
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str = ""

    def __post_init__(self) -> None:
        if self.nproc < 1:
            raise ValueError(f"--nproc must be at least 1, got {self.nproc}")
        if self.nnodes < 1:
            raise ValueError(f"--nnodes must be at least 1, got {self.nnodes}")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"--node-rank must be in 0..{self.nnodes - 1} for --nnodes {self.nnodes}, "
                             f"got {self.node_rank}")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError("--nnodes above 1 needs --rdzv-endpoint HOST:PORT (node 0's address, the same on "
                             "every node)")

    @property
    def needed(self) -> bool:
        """Whether this command must start torchrun instead of training in this process."""
        return self.nproc > 1 or self.nnodes > 1

    def command(self, cfg_file: Path, run_id: str, resume: str | None = None, progress: bool = True) -> list[str]:
        """The torchrun command line; `run_id` names the rendezvous, so nodes of another run never join it."""
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={self.nproc}"]
        if self.nnodes == 1:
            cmd.insert(3, "--standalone")
        else:
            cmd += [f"--nnodes={self.nnodes}", f"--node_rank={self.node_rank}", "--rdzv_backend=c10d",
                    f"--rdzv_endpoint={self.rdzv_endpoint}", f"--rdzv_id={run_id}",
                    # node 0 hosts the rendezvous store; the others only connect to it
                    f"--rdzv_conf=is_host={str(self.node_rank == 0).lower()}"]
        cmd += ["-m", "training", "-c", str(cfg_file)]
        if resume:
            cmd += ["--resume", resume]
        if not progress:
            cmd += ["--no-progress"]
        return cmd


def launch_torchrun(launch: Launch, cfg_dict: dict, run_dir: Path, run_id: str, resume: str | None,
                    progress: bool) -> int:
    """Start torchrun with the resolved config written to `run_dir` (it travels whole); its exit status."""
    import subprocess

    import yaml

    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_file = run_dir / "launch_config.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg_dict, sort_keys=False))
    cmd = launch.command(cfg_file, run_id, resume, progress)
    env = dict(os.environ)
    if not torch.cuda.is_available():
        # gloo on CPU: split this node's cores between its processes instead of oversubscribing them.
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // launch.nproc)))
    print("launching:", " ".join(cmd), flush=True)
    return subprocess.call(cmd, env=env)
