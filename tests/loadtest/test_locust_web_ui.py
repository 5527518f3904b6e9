"""Locust's web UI, as people run it (`locust -f loadtest/locustfile.py`): accuracy is a tab of its own."""
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_web_ui_has_an_accuracy_tab_fed_from_the_stats_it_polls(tmp_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "locust", "-f", str(ROOT / "loadtest" / "locustfile.py"),
                             "--web-host", "127.0.0.1", "--web-port", str(port), "--host", "http://127.0.0.1:9"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                page = httpx.get(f"http://127.0.0.1:{port}/", timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline and proc.poll() is None, "Locust's web UI did not start"
                time.sleep(0.2)
        assert '"extended_tabs": [{"key": "effnet-accuracy", "title": "Accuracy"}]' in page.text
        assert "Online accuracy (server-committed feedback), 95% interval" in page.text
        stats = httpx.get(f"http://127.0.0.1:{port}/stats/requests", timeout=5).json()
        assert stats["extended_stats"] == [{"key": "effnet-accuracy", "data": []}]  # no answers yet: no rows
        assert "stats" in stats  # Locust's own table is still there
        assert httpx.get(f"http://127.0.0.1:{port}/effnet-accuracy", timeout=5).status_code == 404  # the old JSON page
    finally:
        proc.terminate()
        proc.wait(10)
