"""Locust users that send real, labelled images to the effnet service and check every answer.

People:   locust -f loadtest/locustfile.py --host http://127.0.0.1:3000      (web UI on :8089)
Machines: effnet loadtest (runs this file headless, one step at a time, see loadtest/run.py)

- `VariantUser` asks for one variant explicitly (`--variant b0`; empty: each user picks one of the
  served variants at random) and sends the images of that variant's label space: Fashion-MNIST test
  PNGs to Fashion-MNIST variants, real photos to ImageNet ones.
- `SplitUser` names only the route (`--route`, empty: the default route) and an `X-Client-Id`, so the
  service's split decides; each user plays `--clients-per-user` clients in turn, and every client
  must always land on the same variant (sticky assignment).

Each answer is checked with `catch_response`: HTTP status, the answer's schema, the variant and
assignment it reports; whether its top-1 is the image's true label is counted per variant (accuracy
under load). A share `--bad-share` of requests are broken uploads (garbage bytes, a truncated file):
a 4xx is their success, anything else a failure. Locust's statistics name requests per variant
(`classify b0`, `split fashion:mec`, `bad garbage`) so the CSV is per variant too.
`--feedback-share F` closes the experiment loop: for that share of labelled answers the user sends
`POST /feedback` with the answer's `request_id` and the true label (and `$EFFNET_ADMIN_TOKEN` as a
bearer token when it is set: a server whose feedback moves traffic asks for it), counted in Locust's
statistics as `feedback <variant>`; the server's verdict is checked against the user's own.
`--results-json FILE` writes the tallies (per variant, per image, per client) when the test stops.
Distributed (`--master` and `--worker`s; `effnet loadtest --locust-workers N`): each worker sends its
tally to the master when it stops, and the master writes their merge. `--run-seconds S` on the master
replaces Locust's `-t`, which quits the workers without letting their in-flight requests finish: the
master stops them gracefully after S seconds (or once `--stop-file` appears), waits for every worker's
tally, then quits.
In the web UI, the "Accuracy" tab shows each variant's accuracy under load and its online accuracy
(the feedback the server committed), each with its 95% Wilson interval.
"""
from __future__ import annotations

import json
import os
import random
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

from locust import HttpUser, events, task
from locust.runners import MasterRunner, WorkerRunner

try:
    from loadtest.checks import check_answer
    from loadtest.images import BAD_KINDS, bad_input, dataset_for, image_set
    from loadtest.tallies import merge_tallies
except ImportError:  # run by path from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from loadtest.checks import check_answer
    from loadtest.images import BAD_KINDS, bad_input, dataset_for, image_set
    from loadtest.tallies import merge_tallies
from service.audit import ADMIN_TOKEN_ENV
from service.experiments.stats import wilson


@events.init_command_line_parser.add_listener
def _options(parser):
    # include_in_web_ui: the same knobs appear in the web UI's start form.
    parser.add_argument("--variant", default="", help="VariantUser: the variant to ask for (empty: random per user)")
    parser.add_argument("--route", default="", help="SplitUser: the route to send to (empty: the default route)")
    parser.add_argument("--bad-share", type=float, default=0.02, help="share of broken uploads that must get 4xx")
    parser.add_argument("--top-k", type=int, default=5, help="top_k asked for")
    parser.add_argument("--fashion-images", type=int, default=200, help="Fashion-MNIST test images to send")
    parser.add_argument("--clients-per-user", type=int, default=8, help="SplitUser: client ids each user plays")
    parser.add_argument("--think-time", type=float, default=0.0, help="seconds between a user's requests")
    parser.add_argument("--seed", type=int, default=0, help="seed of image order, bad inputs and client ids")
    parser.add_argument("--feedback-share", type=float, default=0.0,
                        help="share of labelled answers whose true label is sent back (POST /feedback)")
    parser.add_argument("--budget-ms", type=float, default=0.0, help="PolicyUser: X-Latency-Budget-Ms sent (0: none)")
    parser.add_argument("--results-json", default="", include_in_web_ui=False,
                        help="write the per-variant tallies here when the test stops")
    parser.add_argument("--run-seconds", type=float, default=0.0, include_in_web_ui=False,
                        help="headless master: stop the workers gracefully after this many seconds, then quit")
    parser.add_argument("--stop-file", default="", include_in_web_ui=False,
                        help="headless master: stop as --run-seconds does once this file exists")


class Catalog:
    """What the service serves (GET /variants, /routes) and which images go to which variant."""

    def __init__(self) -> None:
        self.variants: dict[str, dict] = {}
        self.routes: dict[str, dict] = {}
        self.default_route = ""
        self.images: dict[str, tuple] = {}  # variant -> its labelled images
        self.route_images: dict[str, tuple] = {}
        # A worker connects before its init event loads the catalog, so its first users can start while
        # the catalog loads: they wait here for it (gevent makes this lock cooperative).
        self.lock = threading.Lock()

    def load(self, host: str, n_fashion: int) -> None:
        """Once per process; `variants` is set last, so a catalog that has variants has their images."""
        from loadtest.service_api import catalog

        with self.lock:
            if self.variants:
                return
            # Plain urllib, outside Locust's statistics: the catalog is set-up, not load.
            variants, self.routes, self.default_route = catalog(host)
            for name, v in variants.items():
                ds = v.get("image_set") or dataset_for(v.get("dataset"), v.get("num_classes"), v.get("route"))
                self.images[name] = image_set(ds, n_fashion)
                self.route_images.setdefault(v.get("route", ""), self.images[name])
            self.variants = variants


class Tally:
    """Counts kept while users run; thread-safe enough for gevent (one OS thread) and the web UI."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.by_variant: dict[str, dict] = defaultdict(lambda: {
            "responses": 0, "labelled": 0, "correct": 0, "by_image": defaultdict(Counter),
            "assignment": Counter(), "route": "", "model": "",
            # feedback the server acknowledged: how many, how many it judged right, and the answers it judged
            "feedback": 0, "feedback_correct": 0, "feedback_by_image": defaultdict(Counter),
        })
        self.errors: dict[str, Counter] = defaultdict(Counter)  # request name -> error kind -> count
        self.bad: dict[str, Counter] = defaultdict(Counter)  # kind -> "4xx"/status -> count
        self.split: dict[str, Counter] = defaultdict(Counter)  # route -> variant -> answers
        # policy route -> answers, labelled, correct, budget_missed, answered_by {variant: n}, stages_run {variant: n}
        self.policy: dict[str, dict] = defaultdict(lambda: {"answers": 0, "labelled": 0, "correct": 0,
                                                            "budget_missed": 0, "answered_by": Counter(),
                                                            "stages_run": Counter()})
        self.client_variant: dict[str, str] = {}
        self.sticky_violations = 0

    def answer(self, image, body: dict) -> None:
        with self.lock:
            v = self.by_variant[body["variant"]]
            v["responses"] += 1
            v["assignment"][body["assignment"]] += 1
            v["route"], v["model"] = body["route"], body["model"]
            top1 = int(body["predictions"][0]["index"])
            v["by_image"][image.id][top1] += 1
            if image.labelled:
                v["labelled"] += 1
                v["correct"] += top1 in image.labels

    def policy_answer(self, image, body: dict) -> None:
        with self.lock:
            p = self.policy[body["route"]]
            p["answers"] += 1
            p["answered_by"][body["variant"]] += 1
            p["budget_missed"] += bool(body.get("budget_missed"))
            p["stages_run"].update(s["variant"] for s in body.get("cascade") or [])
            if image.labelled:
                p["labelled"] += 1
                p["correct"] += int(body["predictions"][0]["index"]) in image.labels

    def feedback(self, image, top1: int, verdict: dict) -> None:
        """The server's answer to POST /feedback for `image`, answered `top1` by `verdict["variant"]`."""
        with self.lock:
            v = self.by_variant[verdict["variant"]]
            v["feedback"] += 1
            v["feedback_correct"] += bool(verdict["correct"])
            v["feedback_by_image"][image.id][top1] += 1

    def accuracy_rows(self) -> list[dict]:
        """Per variant: accuracy under load and online accuracy, each with its 95% Wilson interval."""
        def cell(correct: int, n: int) -> str:
            if not n:
                return "-"
            lo, hi = wilson(correct, n)
            return f"{100 * correct / n:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] of {n}"

        with self.lock:
            rows = [{"variant": name, "answers": v["responses"], "load": cell(v["correct"], v["labelled"]),
                     "online": cell(v["feedback_correct"], v["feedback"])} for name, v in self.by_variant.items()]
        return sorted(rows, key=lambda r: r["variant"])

    def to_json(self) -> dict:
        return {
            "variants": {k: {**v, "by_image": {i: dict(c) for i, c in v["by_image"].items()},
                             "feedback_by_image": {i: dict(c) for i, c in v["feedback_by_image"].items()},
                             "assignment": dict(v["assignment"])} for k, v in self.by_variant.items()},
            "errors": {k: dict(c) for k, c in self.errors.items()},
            "bad_inputs": {k: dict(c) for k, c in self.bad.items()},
            "split": {k: dict(c) for k, c in self.split.items()},
            "policy": {k: {**p, "answered_by": dict(p["answered_by"]), "stages_run": dict(p["stages_run"])}
                       for k, p in self.policy.items()},
            "clients": len(self.client_variant),
            "sticky_violations": self.sticky_violations,
        }


CATALOG = Catalog()
TALLY = Tally()


@events.init.add_listener
def _on_init(environment, **_):
    # Headless runs and workers know the host now: load the catalog and encode the images before the
    # clock starts, so a short step measures requests, not start-up. (The web UI loads it on first use;
    # a master sends no requests.)
    opts = environment.parsed_options
    if opts and ((opts.headless and not opts.master) or opts.worker) and environment.host:
        CATALOG.load(environment.host, opts.fashion_images)


ACCURACY_TAB = "effnet-accuracy"


@events.init.add_listener
def _web_ui_accuracy(environment, **_):
    # An "Accuracy" tab beside Locust's own: the web UI draws a table from `extended_tables`, filled from
    # the `extended_stats` that /stats/requests carries (Locust's extend_web_ui hooks).
    web_ui = getattr(environment, "web_ui", None)
    if not web_ui:
        return
    from locust.web import request  # Flask's request, through Locust (its web UI is Flask)

    web_ui.template_args["extended_tabs"] = [{"title": "Accuracy", "key": ACCURACY_TAB}]
    web_ui.template_args["extended_tables"] = [{"key": ACCURACY_TAB, "structure": [
        {"key": "variant", "title": "Variant"}, {"key": "answers", "title": "Answers"},
        {"key": "load", "title": "Accuracy under load, 95% interval, labelled answers"},
        {"key": "online", "title": "Online accuracy (server-committed feedback), 95% interval"}]}]

    @web_ui.app.after_request
    def _with_accuracy(response):
        if request.path != "/stats/requests" or not response.is_json:
            return response
        body = response.get_json()
        body["extended_stats"] = [{"key": ACCURACY_TAB, "data": TALLY.accuracy_rows()}]
        response.set_data(json.dumps(body))
        return response


@events.test_start.add_listener
def _on_test_start(environment, **_):
    TALLY.reset()


WORKER_TALLIES: dict[str, dict] = {}  # master: worker id -> the tally it sent when it stopped
TALLY_MESSAGE = "effnet_tally"


@events.init.add_listener
def _distributed(environment, runner=None, **_):
    if isinstance(runner, MasterRunner):
        runner.register_message(TALLY_MESSAGE, lambda msg, **kw: WORKER_TALLIES.__setitem__(msg.node_id, msg.data))


@events.test_stop.add_listener
def _send_tally(environment, **_):
    runner = environment.runner
    if isinstance(runner, WorkerRunner):
        # The final statistics first, then the tally on the same connection: a master holding every
        # worker's tally holds every request's statistics too.
        getattr(runner, "_send_stats", lambda: None)()
        runner.send_message(TALLY_MESSAGE, TALLY.to_json())


@events.test_start.add_listener
def _stop_gracefully_later(environment, **_):
    opts, runner = environment.parsed_options, environment.runner
    if isinstance(runner, MasterRunner) and opts and opts.run_seconds > 0:
        WORKER_TALLIES.clear()
        # Locust patches threading and time.sleep for gevent: this thread is a greenlet that sleeps cooperatively.
        threading.Thread(target=_stop_workers_then_quit, args=(runner, opts), daemon=True).start()


def _stop_workers_then_quit(runner, opts) -> None:
    """After --run-seconds (or --stop-file): stop the workers (in-flight requests finish), wait for each
    worker's tally, quit. Every wait is bounded."""
    deadline = time.monotonic() + opts.run_seconds
    while time.monotonic() < deadline and not (opts.stop_file and os.path.exists(opts.stop_file)):
        time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
    workers = max(opts.expect_workers, 1)
    runner.stop()  # Locust waits for the workers' users to finish, at most stop_timeout + 60 s
    deadline = time.monotonic() + (runner.environment.stop_timeout or 0) + 15
    while len(WORKER_TALLIES) < workers and time.monotonic() < deadline:
        time.sleep(0.1)
    runner.quit()


def _write_results(environment) -> None:
    opts = environment.parsed_options
    path = getattr(opts, "results_json", "") if opts else ""
    if not path or isinstance(environment.runner, WorkerRunner):  # a worker's tally goes to the master
        return
    tally = merge_tallies(list(WORKER_TALLIES.values())) if isinstance(environment.runner, MasterRunner) \
        else TALLY.to_json()
    Path(path).write_text(json.dumps(tally, indent=1, sort_keys=True))
    # Locust's --csv writer runs once a second and is not flushed at exit, so its file can miss the
    # last second; this is the same CSV (Locust's own StatsCSV) written from the final statistics.
    import csv

    from locust.stats import PERCENTILES_TO_REPORT, StatsCSV

    writer = StatsCSV(environment, PERCENTILES_TO_REPORT)
    base = path[: -len(".json")] if path.endswith(".json") else path
    with open(f"{base}_stats.csv", "w", newline="") as f:
        writer.requests_csv(csv.writer(f))
    with open(f"{base}_failures.csv", "w", newline="") as f:
        writer.failures_csv(csv.writer(f))


@events.test_stop.add_listener
def _on_test_stop(environment, **_):
    _write_results(environment)


@events.quit.add_listener
def _on_quit(exit_code, **_):
    # test_stop fires before in-flight requests drain (--stop-timeout); quit comes after them.
    if _ENV:
        _write_results(_ENV[0])


_ENV: list = []


@events.init.add_listener
def _keep_env(environment, **_):
    _ENV.append(environment)


def _answered(resp, name: str) -> tuple[bool, object]:
    """(True, the JSON body or None) for a 200; else the failure counted under its kind and (False, None)."""
    if resp.status_code != 200:
        kind = _error_kind(resp)
        TALLY.errors[name][kind] += 1
        resp.failure(kind)
        return False, None
    try:
        return True, resp.json()
    except ValueError:
        return True, None


def _error_kind(resp) -> str:
    if resp.status_code == 0 or resp.status_code is None:
        return f"connection: {type(getattr(resp, 'error', None)).__name__}"
    return f"HTTP {resp.status_code}"


class ClassifyUser(HttpUser):
    """Common to both users: picks images, sends them, checks answers, sends the odd broken upload."""

    abstract = True
    host = "http://127.0.0.1:3000"

    def wait_time(self) -> float:
        return self.environment.parsed_options.think_time if self.environment.parsed_options else 0.0

    @property
    def opts(self):
        return self.environment.parsed_options

    def on_start(self) -> None:
        CATALOG.load(self.host, self.opts.fashion_images)
        self.rng = random.Random(f"{self.opts.seed}-{id(self)}")

    def send(self, images, *, variant=None, route=None, assignment=None, client_id=None, name="classify") -> None:
        opts = self.opts
        if opts.bad_share > 0 and self.rng.random() < opts.bad_share:
            return self.send_bad(images, variant=variant, route=route, client_id=client_id)
        image = self.rng.choice(images)
        form = {"top_k": str(opts.top_k)}
        if variant:
            form["variant"] = variant
        if route:
            form["route"] = route
        headers = {"X-Client-Id": client_id} if client_id else {}
        if opts.budget_ms > 0 and name.startswith("policy "):
            headers["X-Latency-Budget-Ms"] = f"{opts.budget_ms:g}"
        with self.client.post("/classify", files={"image": (image.filename, image.data, image.content_type)},
                              data=form, headers=headers, name=name, catch_response=True) as resp:
            ok, body = _answered(resp, name)
            if not ok:
                return
            problem = check_answer(body, variant=variant, route=route, assignment=assignment, top_k=opts.top_k,
                                   known_variants=CATALOG.variants)
            if problem:
                TALLY.errors[name][problem.split(":")[0]] += 1
                resp.failure(problem)
                return
            if client_id:
                # Split traffic: Locust's statistics then show one row per variant the split chose.
                resp.request_meta["name"] = f"{name}:{body['variant']}"
                TALLY.split[body["route"]][body["variant"]] += 1
                first = TALLY.client_variant.setdefault(client_id, body["variant"])
                if first != body["variant"]:
                    TALLY.sticky_violations += 1
                    TALLY.errors[name]["not sticky"] += 1
                    resp.failure(f"client {client_id} moved from {first} to {body['variant']}")
                    return
            if name.startswith("policy "):  # counted per route: the policy chose the variant
                TALLY.policy_answer(image, body)
            else:
                TALLY.answer(image, body)
            resp.success()
        if image.labelled and opts.feedback_share > 0 and self.rng.random() < opts.feedback_share:
            self.send_feedback(image, body)

    def send_feedback(self, image, answer: dict) -> None:
        """POST /feedback for `answer` with the image's true label; the server's verdict must be ours."""
        top1 = int(answer["predictions"][0]["index"])
        # Several accepted labels (a photo): the one the answer chose when it chose one, so right stays right.
        label = top1 if top1 in image.labels else min(image.labels)
        name = f"feedback {answer['variant']}"
        token = os.environ.get(ADMIN_TOKEN_ENV)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        with self.client.post("/feedback", json={"request_id": answer["request_id"], "label": label},
                              headers=headers, name=name, catch_response=True) as resp:
            ok, verdict = _answered(resp, name)
            if not ok:
                return
            verdict = verdict if isinstance(verdict, dict) else {}
            if verdict.get("variant") != answer["variant"] or verdict.get("correct") != (top1 in image.labels):
                TALLY.errors[name]["feedback verdict"] += 1
                resp.failure(f"feedback verdict {str(verdict)[:200]} does not match the answer {answer['variant']} "
                             f"top-1 {top1}, label {label}")
                return
            TALLY.feedback(image, top1, verdict)
            resp.success()

    def send_bad(self, images, *, variant=None, route=None, client_id=None) -> None:
        kind = self.rng.choice(BAD_KINDS)
        data, fname, ctype = bad_input(kind, self.rng, self.rng.choice(images))
        form = {"variant": variant} if variant else {"route": route} if route else {}
        name = f"bad {kind}"
        with self.client.post("/classify", files={"image": (fname, data, ctype)}, data=form, name=name,
                              catch_response=True) as resp:
            code = resp.status_code or 0
            TALLY.bad[kind]["4xx" if 400 <= code < 500 else str(code)] += 1
            if 400 <= code < 500:
                resp.success()
            else:
                TALLY.errors[name][_error_kind(resp)] += 1
                resp.failure(f"broken upload ({kind}) answered {code}, expected 4xx")


class VariantUser(ClassifyUser):
    """Explicit per-variant traffic: `variant=<name>` on every request."""

    def on_start(self) -> None:
        super().on_start()
        self.variant = self.opts.variant or self.rng.choice(sorted(CATALOG.variants))
        if self.variant not in CATALOG.variants:
            raise RuntimeError(f"variant {self.variant!r} is not served; served: {', '.join(sorted(CATALOG.variants))}")

    @task
    def classify(self) -> None:
        self.send(CATALOG.images[self.variant], variant=self.variant, assignment="explicit",
                  name=f"classify {self.variant}")


class SplitUser(ClassifyUser):
    """Split traffic: the route and a sticky client id; the service picks the variant."""

    _next_user = 0

    def on_start(self) -> None:
        super().on_start()
        self.route = self.opts.route or CATALOG.default_route
        if self.route not in CATALOG.routes:
            raise RuntimeError(f"route {self.route!r} is not served; served: {', '.join(sorted(CATALOG.routes))}")
        # Deterministic ids: the same run config meets the same clients, so shares are comparable;
        # a worker's index keeps its clients apart from the other workers'.
        SplitUser._next_user += 1
        n = max(1, self.opts.clients_per_user)
        runner = self.environment.runner
        worker = f"-w{runner.worker_index}" if isinstance(runner, WorkerRunner) else ""
        self.clients = [f"lt{self.opts.seed}{worker}-u{SplitUser._next_user}-c{i}" for i in range(n)]
        self.turn = 0

    @task
    def classify(self) -> None:
        client_id = self.clients[self.turn % len(self.clients)]
        self.turn += 1
        self.send(CATALOG.route_images[self.route], route=self.route, assignment="split", client_id=client_id,
                  name=f"split {self.route}")



class PolicyUser(ClassifyUser):
    """A policy route (`--route fashion-budget`, `--budget-ms 250`): no client id, the policy picks per request."""

    @task
    def classify(self) -> None:
        route = self.opts.route or CATALOG.default_route
        info = CATALOG.routes[route]
        # a policy route's variants live on their own route: its images are those of its first variant
        first = next(iter(info.get("weights") or info.get("split") or {}), None)
        images = CATALOG.images[first] if first in CATALOG.images else CATALOG.route_images[route]
        self.send(images, route=route, name=f"policy {route}")
