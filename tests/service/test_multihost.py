"""Workers on other hosts, through real TCP: network namespaces stand for the hosts (tests/support/netns.py).

Host `wa` runs two workers of b0 (`effnet worker`'s server), host `wb` one of compact, host `gw` the
gateway, whose configuration lists them in `workers_at`. The test, in its own namespace, reaches them
over the namespaces' bridge, at the addresses it gave them and nowhere else. It shows: answers through
the gateway, the load spread over both b0 workers, the batches sent in the body (no shared memory
across hosts), a call without the worker token refused, and, with host wa's workers killed, b0 answered
503 at once while compact, on the other host, keeps answering.
Every wait is bounded in count and time; the namespaces go when the module ends.
"""
import concurrent.futures
import io
import os
import re
import signal
import subprocess
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.support.netns import Hosts, cannot_make_namespaces
from tests.support.serving import FASHION_CLASSES, make_checkpoint, write_config

pytestmark = pytest.mark.server

TOKEN = "multihost-test-token"
B0_PORTS, COMPACT_PORT, GATEWAY_PORT = (3101, 3102), 3103, 3000


def start(hosts, host, cmd, env, log):
    return subprocess.Popen(hosts.command(host, cmd), env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def stop(proc, sig=signal.SIGTERM, wait_s=30):
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = cannot_make_namespaces()
    if why:
        pytest.skip(why)
    from cli.serve import serve_command, server_env
    from cli.worker import worker_command
    from service.config import CONFIG_ENV
    from service.worker_app import TOKEN_ENV, VARIANT_ENV

    root = tmp_path_factory.mktemp("multihost")
    home = root / "bentoml"
    make_checkpoint(home, "b0-fashion-mnist", "b0", FASHION_CLASSES, 32, grayscale=True, seed=3)
    make_checkpoint(home, "compact-fashion-mnist", "compact", FASHION_CLASSES, 32, grayscale=True, seed=1)
    with Hosts(["gw", "wa", "wb"]) as hosts:
        wa, wb = hosts.address["wa"], hosts.address["wb"]
        cfg = write_config(root / "serve.yaml", {
            "server": {"cpu_threads": 1, "health_interval_s": 0.5},
            "variants": {
                "b0": {"model": "b0-fashion-mnist:latest", "engine": "torch",
                       "workers_at": [f"http://{wa}:{p}" for p in B0_PORTS]},
                "compact": {"model": "compact-fashion-mnist:latest", "engine": "torch",
                            "workers_at": [f"http://{wb}:{COMPACT_PORT}"]}},
            "routes": {"fashion": {"split": {"b0": 1, "compact": 1}}},
        })
        procs = {}
        try:
            for name, host, variant, port in (("b0-1", "wa", "b0", B0_PORTS[0]), ("b0-2", "wa", "b0", B0_PORTS[1]),
                                              ("compact", "wb", "compact", COMPACT_PORT)):
                env = {**server_env(home, port), CONFIG_ENV: str(cfg), VARIANT_ENV: variant, TOKEN_ENV: TOKEN}
                procs[name] = start(hosts, host, worker_command("0.0.0.0", port), env, root / f"{name}.log")
            env = {**server_env(home, GATEWAY_PORT), CONFIG_ENV: str(cfg), TOKEN_ENV: TOKEN}
            procs["gateway"] = start(hosts, "gw", serve_command(hosts.address["gw"], GATEWAY_PORT), env,
                                     root / "gateway.log")
            url = f"http://{hosts.address['gw']}:{GATEWAY_PORT}"
            client = httpx.Client(base_url=url, timeout=30)
            deadline = time.monotonic() + 240
            while True:
                for name, p in procs.items():
                    assert p.poll() is None, f"{name} exited: {(root / f'{name}.log').read_text()[-3000:]}"
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, (root / "gateway.log").read_text()[-4000:]
                time.sleep(0.5)
            yield {"hosts": hosts, "client": client, "procs": procs, "root": root}
            client.close()
        finally:
            for p in procs.values():
                stop(p)


def png(seed):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (28, 28), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def classify(client, variant, seed=0):
    return client.post("/classify", files={"image": ("x.png", png(seed), "image/png")}, data={"variant": variant})


def batches_run(url):
    """Batches a worker ran, from its own /metrics."""
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(float(m.group(1)) for m in re.finditer(r"^effnet_inference_duration_seconds_count\{.*\} (\S+)$",
                                                         text, re.M))


def test_answers_cross_hosts_over_tcp_spread_over_both_workers_without_shared_memory(cluster):
    client, wa = cluster["client"], cluster["hosts"].address["wa"]
    before = [batches_run(f"http://{wa}:{p}") for p in B0_PORTS]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:  # concurrent: the least busy replica differs
        answers = list(pool.map(lambda i: classify(client, "b0", i), range(48)))
    assert [r.status_code for r in answers] == [200] * 48, answers[0].text
    assert {r.json()["variant"] for r in answers} == {"b0"}
    ran = [batches_run(f"http://{wa}:{p}") - b for p, b in zip(B0_PORTS, before)]
    assert all(n > 0 for n in ran), f"batches per b0 worker: {ran}"

    replicas = client.get("/readyz/b0").json()["replicas"]
    assert [r["address"] for r in replicas] == [f"http://{wa}:{p}" for p in B0_PORTS]
    assert all(r["state"] == "up" and r["same_host"] is False for r in replicas), replicas
    metrics = client.get("/metrics").text
    assert re.search(r'^effnet_worker_calls_total\{.*transport="http".*variant="b0".*\} [1-9]', metrics, re.M) or \
        re.search(r'^effnet_worker_calls_total\{.*variant="b0".*transport="http".*\} [1-9]', metrics, re.M)
    assert not re.search(r'^effnet_worker_calls_total\{[^}]*shared_memory[^}]*\} [1-9]', metrics, re.M)
    row = next(v for v in client.get("/variants").json()["variants"] if v["variant"] == "b0")
    assert row["worker_transport"] == "http" and row["workers_at"]["addresses"] == [r["address"] for r in replicas]


def test_a_worker_refuses_a_call_without_the_token(cluster):
    wa = cluster["hosts"].address["wa"]
    r = httpx.post(f"http://{wa}:{B0_PORTS[0]}/predict_wire", json={"shape": [1, 1, 32, 32], "pixels": ""}, timeout=10)
    assert r.status_code == 401 and "token" in r.text
    assert httpx.get(f"http://{wa}:{B0_PORTS[0]}/readyz", timeout=10).status_code == 200  # probes stay open


def test_a_host_whose_workers_die_costs_only_its_variant(cluster):
    client, procs = cluster["client"], cluster["procs"]
    assert classify(client, "compact").status_code == 200
    for name in ("b0-1", "b0-2"):  # every worker of host wa
        stop(procs[name], signal.SIGKILL)
    deadline, last = time.monotonic() + 30, None
    while time.monotonic() < deadline:  # the failed calls and checks mark both replicas down
        last = classify(client, "b0")
        if last.status_code == 503 and client.get("/readyz/b0").json()["ready"] is False:
            break
        time.sleep(0.2)
    assert last.status_code == 503 and "Retry-After" in last.headers, last.text
    for i in range(10):
        r = classify(client, "compact", i)
        assert r.status_code == 200 and r.json()["variant"] == "compact", r.text
    routed = [classify(client, None if False else "compact", i).status_code for i in range(3)]
    assert routed == [200] * 3
