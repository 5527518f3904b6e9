"""Training on several machines: two "nodes" on this machine, each its own `effnet train --nnodes 2`
launch (its own torchrun agent, run folder and store), meeting through torchrun's c10d rendezvous on
127.0.0.1, one gloo process each, the tiny fake-data run."""
import os
import subprocess
import sys
import time

import pytest

from loadtest.processes import free_port
from store import list_checkpoints, read_manifest
from tests.training.tiny import ROOT, TINY
from training.distributed import Launch


def test_a_multi_node_launch_meets_at_the_rendezvous_of_node_0(tmp_path):
    node0 = Launch(nproc=1, nnodes=2, node_rank=0, rdzv_endpoint="127.0.0.1:29400")
    node1 = Launch(nproc=1, nnodes=2, node_rank=1, rdzv_endpoint="127.0.0.1:29400")
    cmd0, cmd1 = (n.command(tmp_path / "c.yaml", "compact-fake") for n in (node0, node1))
    for cmd in (cmd0, cmd1):
        assert {"--nnodes=2", "--rdzv_backend=c10d", "--rdzv_endpoint=127.0.0.1:29400", "--rdzv_id=compact-fake"} <= set(cmd)
        assert "--standalone" not in cmd
    assert "--rdzv_conf=is_host=true" in cmd0 and "--rdzv_conf=is_host=false" in cmd1
    assert "--standalone" in Launch(nproc=2).command(tmp_path / "c.yaml", "x") and not Launch().needed


@pytest.mark.parametrize("kw, message", [
    (dict(nnodes=2), "needs --rdzv-endpoint"),
    (dict(nnodes=2, node_rank=2, rdzv_endpoint="127.0.0.1:1"), "--node-rank must be in 0..1"),
    (dict(nnodes=0), "--nnodes must be at least 1"),
])
def test_an_impossible_multi_node_launch_is_refused_by_name(kw, message):
    with pytest.raises(ValueError, match=message):
        Launch(**kw)


@pytest.mark.slow
@pytest.mark.server
def test_two_nodes_through_the_c10d_rendezvous_end_in_sync_with_one_checkpoint(tmp_path):
    port = free_port()
    procs, logs = [], []
    for rank in (0, 1):
        node = tmp_path / f"node{rank}"
        (node / "store").mkdir(parents=True)
        # Each node its own store and run folder, as on two machines; one core each.
        env = {**os.environ, "BENTOML_HOME": str(node / "store"), "OMP_NUM_THREADS": "1"}
        env.pop("RANK", None)
        cmd = [sys.executable, "-m", "cli", "train", "--variant", "compact", "--epochs", "1", *TINY,
               "--batch-size", "8", "--run-dir", str(node / "run"), "--nnodes", "2", "--node-rank", str(rank),
               "--rdzv-endpoint", f"127.0.0.1:{port}"]
        logs.append(open(node / "train.log", "w+"))
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=logs[-1], stderr=subprocess.STDOUT,
                                      start_new_session=True))
        if rank == 0:
            time.sleep(1)  # node 0 hosts the rendezvous store; node 1 retries until it is up anyway
    try:
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.wait(10)
    text = []
    for f in logs:
        f.seek(0)
        text.append(f.read())
        f.close()
    assert codes == [0, 0], "\n---\n".join(t[-3000:] for t in text)
    assert all("--rdzv_backend=c10d" in t for t in text)
    # The rendezvous gives global rank 0 to one of the nodes: that one alone stores the checkpoint.
    rows = [r for rank in (0, 1) for r in list_checkpoints(tmp_path / f"node{rank}" / "store")]
    assert len(rows) == 1, rows
    man, _ = read_manifest(rows[0]["path"])
    assert man.metrics["world_size"] == 2 and man.metrics["ranks_in_sync"] is True
    assert man.training["global_batch"] == 16
    saver = next(t for t in text if "ranks in sync: True" in t)
    assert "saved compact-fake" in saver
