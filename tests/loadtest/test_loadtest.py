"""Smoke run of `effnet loadtest`: the real service (tiny fake checkpoints), a real Prometheus, Locust.

One short step per phase (each variant explicitly, then the fashion split, then a short experiment
phase with feedback), so the whole run stays under about 90 s on a quiet 2-core machine. It checks
the report, not the speed: a row per served variant, accuracy under load equal to the offline
evaluation of the same images (answer by answer), Prometheus's request counts equal to Locust's, and
the feedback loop: every acknowledged feedback counted by the server, and the server's online accuracy
equal to the accuracy of the same answers under load and offline.
"""
import json
import os
import shutil
import time

import pytest

from loadtest.run import RunConfig, execute
from loadtest.experiment import WEAK_VARIANT
from tests.support.fake_store import make_fake_checkpoint, make_fake_store

pytestmark = pytest.mark.skipif(not shutil.which("prometheus") and not os.path.exists("/usr/bin/prometheus"),
                                reason="the Debian package prometheus is not installed (make setup installs it)")


@pytest.mark.server
@pytest.mark.slow
def test_smoke_run_reports_every_variant_with_offline_accuracy_and_matching_counts(tmp_path, bentoml_home):
    t = time.monotonic()
    config = make_fake_store(bentoml_home)
    # the experiment's weak variant: one more fake, so nothing is trained
    weak = make_fake_checkpoint(bentoml_home, "weak-fake", "compact", "fashion-mnist", seed=7)
    cfg = RunConfig(config=str(config), store_home=str(bentoml_home), steps=[4], step_s=3, bad_share=0.05,
                    fashion_images=64, stop_timeout_s=5, settle_s=0.3, max_total_s=240, ready_timeout_s=150,
                    weak_model=weak, experiment_s=6, policies=True, budget_ms=1000, cascade_data="fake", experiment_users=4, poll_s=1.0,
                    reports_dir=str(tmp_path / "reports"), name="smoke")
    out = execute(cfg, log=print)
    print(f"smoke run: {time.monotonic() - t:.0f} s")

    report = (out / "report.md").read_text()
    results = json.loads((out / "results.json").read_text())
    assert (out / "tradeoff.png").stat().st_size > 10_000
    assert not results["notes"], results["notes"]  # every step ran inside the time bound
    served = set(results["variants"])
    assert served == {"compact", "mec", "lite0", WEAK_VARIANT}
    for name in served:
        assert f"| **{name}** |" in report  # a row per served variant
        acc = results["summary"]["variants"][name]["accuracy"]
        assert acc["labelled"] > 0, name
        # The service's answers are the offline engine's answers on the same bytes, one by one.
        assert acc["answers_differing_from_offline"] == 0, (name, acc)
        assert acc["under_load"] == acc["offline_same_images"], (name, acc)

    checks = results["summary"]["cross_checks"]
    assert len(checks) == 7  # three variants, two policy routes, one split, the experiment
    for c in checks:
        assert c["locust"] > 0 and c["prometheus"] == c["locust"], c

    # The policy routes: one step each, their answers counted per route, the verdicts stated in the report.
    pol = results["summary"]["policies"]["routes"]
    assert set(pol) == {"fashion-budget", "fashion-cascade"}
    assert set(pol["fashion-budget"]["answered_by"]) <= {"compact", "mec"} and pol["fashion-budget"]["labelled"] > 0
    assert pol["fashion-cascade"]["stages_run"].get("compact") == pol["fashion-cascade"]["answers"] > 0
    assert results["cascade"]["fit"]["stages"] == ["compact", "mec"] and results["cascade"]["curve"]["points"]
    assert "## Policies beside the fixed variants" in report and "Does the cascade beat every single variant" in report
    assert "Did the budget policy keep p99 within 1000 ms" in report

    split = results["summary"]["splits"]["fashion"]
    assert set(split["answers"]) <= {"compact", "mec", WEAK_VARIANT} and split["sticky_violations"] == 0

    # The feedback loop: Locust's feedback rows, the server's counts, and the accuracies on the same answers.
    exp = results["summary"]["experiment"]
    step = next(s for s in results["steps"] if s["kind"] == "experiment")
    assert sum(r["count"] for n, r in step["stats"].items() if n.startswith("feedback ")) > 0
    assert exp["control"] == "compact" and exp["looks"] > 0 and "## Experiment on route fashion" in report
    rows = {(r["variant"], r["role"]): r for r in exp["variants"]}
    assert {("compact", "control"), (WEAK_VARIANT, "treatment"), ("mec", "shadow")} <= set(rows)
    for (name, role), r in rows.items():
        if role == "shadow":  # mirrored answers: some of the served ones' feedback counts for it too
            assert 0 < r["labelled"] <= sum(x["labelled"] for x in rows.values() if x["role"] != "shadow"), r
            continue
        # only this phase sent feedback, into this run's own database: every acknowledged one is counted
        assert r["labelled"] == r["acknowledged"] > 0 and r["correct"] == r["acknowledged_correct"], r
        assert r["accuracy"] == r["offline_same_images"], r  # online = offline on the same answers
    assert exp["distinct_images"] > 1
    # The service's alerting rules ran in the private Prometheus; what they made of the run is reported.
    assert isinstance(results["alerts"], list) and "## Alerts during the run" in report
    assert (out / "prometheus-rules.yml").exists() and "rule_files" in (out / "prometheus.yml").read_text()
    bad = results["summary"]["bad_inputs"]
    assert bad and all(set(counts) == {"4xx"} for counts in bad.values()), bad
    # Everything the run started is gone: no Prometheus left on its port.
    import urllib.request

    with pytest.raises(OSError):
        urllib.request.urlopen(results["prometheus"]["url"] + "/-/ready", timeout=2)
