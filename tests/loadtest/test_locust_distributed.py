"""`effnet loadtest --locust-workers N`: a Locust master and N worker processes per step.

The merge of the workers' tallies is checked alone; then the smoke configuration of test_loadtest.py
(fake store, real `effnet serve`, real Prometheus) runs distributed with two workers, one short step
on one variant and one on the split (each distributed step costs a few seconds of process start-up,
so not every variant), and must give what a single process gives: the report's sections and rows,
Locust's counts equal to Prometheus', and accuracy under load (from the merged tallies) equal to the
offline evaluation.
"""
import json
import os
import shutil
import time

import pytest

from loadtest.locust_procs import locust_commands
from loadtest.run import RunConfig, execute
from loadtest.tallies import merge_tallies
from tests.support.fake_store import make_fake_store


def _tally(correct: int, wrong: int, image: str, top1: int, client_count: int) -> dict:
    return {"variants": {"b0": {"responses": correct + wrong, "labelled": correct + wrong, "correct": correct,
                                "by_image": {image: {str(top1): correct + wrong}}, "assignment": {"explicit": correct + wrong},
                                "route": "fashion", "model": "b0:1", "feedback": 0, "feedback_correct": 0,
                                "feedback_by_image": {}}},
            "errors": {"classify b0": {"HTTP 503": 1}}, "bad_inputs": {"garbage": {"4xx": 2}},
            "split": {"fashion": {"b0": correct + wrong}}, "clients": client_count, "sticky_violations": 0}


def test_the_workers_tallies_merge_into_what_one_process_would_have_counted():
    merged = merge_tallies([_tally(3, 1, "fashion-mnist/0", 9, 8), _tally(5, 0, "fashion-mnist/0", 9, 8),
                            _tally(1, 1, "fashion-mnist/1", 2, 16)])
    b0 = merged["variants"]["b0"]
    assert (b0["responses"], b0["labelled"], b0["correct"]) == (11, 11, 9)
    assert b0["by_image"] == {"fashion-mnist/0": {"9": 9}, "fashion-mnist/1": {"2": 2}}
    assert b0["assignment"] == {"explicit": 11} and (b0["route"], b0["model"]) == ("fashion", "b0:1")
    assert merged["errors"] == {"classify b0": {"HTTP 503": 3}} and merged["bad_inputs"] == {"garbage": {"4xx": 6}}
    assert merged["split"] == {"fashion": {"b0": 11}} and merged["clients"] == 32 and merged["workers"] == 3
    assert merge_tallies([])["variants"] == {} and merge_tallies([])["workers"] == 0


def test_a_distributed_step_is_a_master_and_its_workers_on_loopback(tmp_path):
    cfg = RunConfig(locust_workers=3, stop_timeout_s=5)
    master, *workers = locust_commands(cfg, "http://127.0.0.1:3000", "VariantUser", 8, tmp_path / "s", ["--variant", "b0"],
                                       run_s=10, master_port=5557)
    assert len(workers) == 3
    assert {"--master", "--headless", "--expect-workers", "3", "--master-bind-host", "127.0.0.1"} <= set(master)
    # the master ends the step with --run-seconds (gracefully); Locust's -t is only a later backstop
    assert master[master.index("--run-seconds") + 1] == "10" and master[master.index("-t") + 1] == "75s"
    for w in workers:
        assert {"--worker", "--master-host", "127.0.0.1", "5557", "--variant", "b0"} <= set(w)
        assert "--headless" not in w and "--results-json" not in w
    single = locust_commands(RunConfig(), "http://127.0.0.1:3000", "VariantUser", 8, tmp_path / "s", [], run_s=10)
    assert len(single) == 1 and "--master" not in single[0] and "10s" in single[0]


@pytest.mark.server
@pytest.mark.slow
@pytest.mark.long  # a whole distributed run: `make test-long`; make test covers the merge and the commands
@pytest.mark.skipif(not shutil.which("prometheus") and not os.path.exists("/usr/bin/prometheus"),
                    reason="the Debian package prometheus is not installed (make setup installs it)")
def test_a_distributed_smoke_run_counts_what_prometheus_counts_with_offline_accuracy(tmp_path, bentoml_home):
    t = time.monotonic()
    config = make_fake_store(bentoml_home)
    cfg = RunConfig(config=str(config), store_home=str(bentoml_home), steps=[4], step_s=3, bad_share=0.05,
                    fashion_images=64, stop_timeout_s=5, settle_s=0.3, max_total_s=240, ready_timeout_s=150,
                    variants=["compact"], experiment=False, locust_workers=2,
                    reports_dir=str(tmp_path / "reports"), name="dist")
    out = execute(cfg, log=print)
    print(f"distributed smoke run: {time.monotonic() - t:.0f} s")

    report = (out / "report.md").read_text()
    results = json.loads((out / "results.json").read_text())
    assert not results["notes"], results["notes"]
    assert results["config"]["locust_workers"] == 2
    for section in ("## Variants", "## Per step"):
        assert section in report
    for step in results["steps"]:
        # a master and two workers, and the tallies of both workers merged
        assert step["locust_processes"] == 3 and step["tally"]["workers"] == 2, step["phase"]
    for name in ("compact", "mec"):  # the split answers with mec too
        assert f"| **{name}** |" in report
        acc = results["summary"]["variants"][name]["accuracy"]
        assert acc["labelled"] > 0 and acc["answers_differing_from_offline"] == 0, (name, acc)
        assert acc["under_load"] == acc["offline_same_images"], (name, acc)
    checks = results["summary"]["cross_checks"]
    assert [s["phase"] for s in results["steps"]] == ["compact", "split:fashion"] and len(checks) == 2
    for c in checks:
        assert c["locust"] > 0 and c["prometheus"] == c["locust"], c
    split = results["summary"]["splits"]["fashion"]
    # each worker's users play their own clients, and every client stays on its variant
    assert split["sticky_violations"] == 0 and split["clients"] > 0
