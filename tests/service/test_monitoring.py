"""service/prometheus-rules.yml: valid for Prometheus, unit-tested with promtool, about series the
service really exports, and evaluated by a real Prometheus as the load test runs it."""
import http.server
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
RULES = ROOT / "service" / "prometheus-rules.yml"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"

needs_prometheus = pytest.mark.skipif(not Path(PROMTOOL).exists() or not Path("/usr/bin/prometheus").exists(),
                                      reason="the Debian package prometheus is not installed (make setup installs it)")


@needs_prometheus
def test_the_rules_are_valid_and_pass_their_promtool_unit_tests():
    check = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0 and "SUCCESS" in check.stdout, check.stdout + check.stderr
    # tests/service/prometheus-rules-test.yml: each alert fires on the series it is for, and not on the others
    unit = subprocess.run([PROMTOOL, "test", "rules", "prometheus-rules-test.yml"], cwd=HERE,
                          capture_output=True, text=True, timeout=120)
    assert unit.returncode == 0 and "SUCCESS" in unit.stdout, unit.stdout + unit.stderr
    tested = set(re.findall(r"alertname: (\w+)", (HERE / "prometheus-rules-test.yml").read_text()))
    assert tested == set(re.findall(r"- alert: (\w+)", RULES.read_text()))  # every alert has a case


def test_the_rules_only_name_series_the_service_exports():
    from prometheus_client import REGISTRY

    import service.metrics  # noqa: F401  (registers the effnet_* series)

    exported = set()
    for family in REGISTRY.collect():
        exported.add(family.name)  # a labelled gauge has no sample before its first set
        for sample in family.samples:
            exported.add(sample.name)
        if family.type == "counter":
            exported.add(family.name + "_total")
        if family.type == "histogram":
            exported |= {family.name + s for s in ("_bucket", "_sum", "_count")}
    used = set(re.findall(r"\b(effnet_[a-z0-9_]+)", RULES.read_text()))
    assert used and used <= exported, sorted(used - exported)  # a renamed metric breaks its alert silently


class _Exporter(http.server.BaseHTTPRequestHandler):
    body = (b'# TYPE effnet_variant_ready gauge\neffnet_variant_ready{variant="b0"} 0\n'
            b'effnet_variant_ready{variant="mec"} 1\n')

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


@needs_prometheus
@pytest.mark.server
def test_a_real_prometheus_evaluates_the_rules_and_the_load_test_reads_the_alerts(tmp_path):
    from loadtest.prometheus import PrometheusServer

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Exporter)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        start = time.time()
        with PrometheusServer({"effnet": f"127.0.0.1:{server.server_address[1]}"}, interval_s=0.2,
                              keep_dir=tmp_path, rule_files=[RULES]) as prom:
            deadline = time.monotonic() + 20
            while not prom.query("ALERTS") and time.monotonic() < deadline:
                time.sleep(0.2)
            alerts = prom.alerts_during(start, time.time())
    finally:
        server.shutdown()
    # b0 is not ready: pending (the rule waits 2 minutes before firing); mec is ready: nothing
    assert [(a["alertname"], a["variant"], a["state"]) for a in alerts] == [("EffnetVariantNotReady", "b0", "pending")]
    assert (tmp_path / "prometheus-rules.yml").read_text() == RULES.read_text()  # kept with the report
