"""deploy/kubernetes/, checked offline: every overlay renders with kubectl's kustomize, every object is valid
for the Kubernetes API's schemas, the Prometheus Operator objects and the autoscalers hold what they must,
the rules pass promtool, and every port, path, metric and label the manifests name exists in the service.
No cluster is involved."""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from service import drain, metrics
from service.config import CONFIG_ENV, load_config
from service.server_config import ServerConfig
from store.paths import models_dir
from tests.deploy import manifests as gen

ROOT = gen.ROOT
K8S = gen.K8S
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").exists())
STORE_OVERLAYS = {"cpu", "gpu"}  # the others run images that carry their checkpoints
GPU_OVERLAYS = {"gpu", "gpu-packed"}
# The Secrets an operator creates before applying (docs/operations.md): never committed, with their keys.
EXTERNAL_SECRETS = {"effnet-api-keys": None, "effnet-worker-token": "token"}
# Labels Prometheus puts on every series it scrapes through a ServiceMonitor (target labels).
TARGET_LABELS = {"namespace", "service", "pod", "container", "endpoint", "job", "instance"}
# The oldest and the newest API versions kubernetes-validate has schemas for.
SCHEMA_VERSIONS = ("1.25.0", "latest")
KUBECTL = os.environ.get("KUBECTL") or shutil.which("kubectl")
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
# What the kustomize of kubectl 1.20 (Debian's kubernetes-client) knows; `patches:`, `components:`,
# `replacements:` came later, and its `resources:` takes files only (a folder goes under `bases:`).
KUSTOMIZE_1_20_KEYS = {"namespace", "resources", "bases", "patchesStrategicMerge", "configMapGenerator",
                       "secretGenerator", "images", "commonLabels", "commonAnnotations", "namePrefix", "nameSuffix",
                       "generatorOptions", "patchesJson6902", "vars", "crds", "apiVersion", "kind"}


def _exported() -> dict[str, tuple[str, set[str]]]:
    """Every series name the service exports -> (the family's type, its labels)."""
    from prometheus_client import REGISTRY

    out = {}
    for family in REGISTRY.collect():
        if not family.name.startswith("effnet_"):
            continue
        collector = next(c for c in vars(metrics).values() if getattr(c, "_name", None) == family.name)
        labels = set(collector._labelnames)
        names = {family.name}
        if family.type == "counter":
            names.add(family.name + "_total")
        if family.type == "histogram":
            names |= {family.name + s for s in ("_bucket", "_sum", "_count")}
        out.update({n: (family.type, labels) for n in names})
    return out


def _render(overlay: str) -> list[dict]:
    out = subprocess.run([KUBECTL, "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    if not KUBECTL:
        pytest.skip("no kubectl: `make setup` installs Debian's kubernetes-client (or set $KUBECTL)")
    return {o: _render(o) for o in OVERLAYS}


def _of(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def _named(objects: list[dict], kind: str, name: str) -> dict:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def _pod(deployment: dict) -> dict:
    return deployment["spec"]["template"]["spec"]


def _cluster_config() -> dict:
    return yaml.safe_load((K8S / "base" / "config.yaml").read_text())


# the files themselves

def test_the_generated_manifests_are_what_the_generator_makes_of_the_service():
    stale = [str(p.relative_to(ROOT)) for p, text in gen.files().items() if not p.exists() or p.read_text() != text]
    assert not stale, f"run `python -m tests.deploy.manifests`: {stale}"


def test_the_rules_and_the_dashboard_have_one_source():
    rule = yaml.safe_load((K8S / "base" / "prometheus-rule.yaml").read_text())
    assert rule["spec"]["groups"] == yaml.safe_load(gen.RULES.read_text())["groups"]
    board = yaml.safe_load((K8S / "base" / "grafana-dashboard.yaml").read_text())
    assert board["data"] == {"effnet-dashboard.json": gen.DASHBOARD.read_text()}


@pytest.mark.parametrize("folder", sorted(str(p.parent.relative_to(K8S)) for p in K8S.rglob("kustomization.yaml")))
def test_each_kustomization_uses_only_what_the_kustomize_of_kubectl_1_20_knows(folder):
    here = K8S / folder
    k = yaml.safe_load((here / "kustomization.yaml").read_text())
    assert set(k) <= KUSTOMIZE_1_20_KEYS, sorted(set(k) - KUSTOMIZE_1_20_KEYS)
    assert all((here / r).is_file() for r in k.get("resources", [])), "a folder goes under bases:"
    assert all((here / b / "kustomization.yaml").is_file() for b in k.get("bases", []))
    assert all((here / p).is_file() for p in k.get("patchesStrategicMerge", []))


def test_the_cluster_configuration_is_the_default_one_with_every_worker_elsewhere():
    source, cluster = yaml.safe_load(gen.SOURCE_CONFIG.read_text()), _cluster_config()
    assert cluster["routes"] == source["routes"] and cluster.get("default_route") == source.get("default_route")
    assert set(cluster["variants"]) == set(source["variants"])
    for name, v in cluster["variants"].items():
        kept = {k: x for k, x in source["variants"][name].items() if k not in gen.PER_HOST_KEYS}
        assert {k: v[k] for k in kept} == kept
        assert v["workers_at"] == f"dns://{gen.worker_name(name)}:{gen.PORT}"


def test_the_cluster_configuration_loads_as_the_service_reads_it():
    from service.config import VariantConfig

    if "workers_at" not in {f.name for f in dataclasses.fields(VariantConfig)}:
        pytest.skip("this tree's service has no `workers_at` yet (service/worker_addresses.py)")
    cfg = load_config(K8S / "base" / "config.yaml")
    assert cfg.server.readiness == "routes" and cfg.server.api_keys == gen.KEYS_PATH
    for name, v in cfg.variants.items():
        assert v.workers_at == (f"dns://{gen.worker_name(name)}:{gen.PORT}",)
        # The HPA can only ask for the pods the admission limit lets the metric count (see manifests.py).
        assert v.resolved_max_inflight >= gen.MAX_REPLICAS * gen.hpa_target(v.max_batch_size)


# rendered: schemas and references

def test_every_object_of_every_overlay_is_valid_for_the_kubernetes_api(rendered):
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed (pyproject's `test` extra, `make setup`)")
    from kubernetes_validate.utils import latest_version

    unique = {yaml.safe_dump(o): o for objs in rendered.values() for o in objs}  # the overlays share most
    checked = set()
    for obj in unique.values():
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # no offline schema; test_the_prometheus_operator_objects checks their fields
        for version in SCHEMA_VERSIONS:
            # strict: a field the API does not have (a typo, a field of a later version) fails too
            kv.validate(obj, latest_version() if version == "latest" else version, strict=True)
        checked.add(obj["kind"])
    assert checked == {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ConfigMap",
                       "PersistentVolumeClaim", "NetworkPolicy"}


def test_the_validator_refuses_what_the_api_would(rendered):
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed (pyproject's `test` extra, `make setup`)")
    deployment = _named(rendered["cpu"], "Deployment", gen.GATEWAY)
    _pod(deployment)["containers"][0]["readinessprobe"] = {}  # a misspelt field
    with pytest.raises(kv.ValidationError):
        kv.validate(deployment, "1.25.0", strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_name_an_object_refers_to_exists(rendered, overlay):
    objs = rendered[overlay]
    configmaps = {o["metadata"]["name"] for o in _of(objs, "ConfigMap")}
    claims = {o["metadata"]["name"] for o in _of(objs, "PersistentVolumeClaim")}
    for d in _of(objs, "Deployment"):
        pod = _pod(d)
        labels = d["spec"]["template"]["metadata"]["labels"]
        assert d["spec"]["selector"]["matchLabels"].items() <= labels.items()
        volumes = {v["name"]: v for v in pod["volumes"]}
        for v in volumes.values():
            if "configMap" in v:
                assert v["configMap"]["name"] in configmaps
            if "secret" in v:
                assert v["secret"]["secretName"] in EXTERNAL_SECRETS
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in claims
        for c in pod["containers"]:
            assert {m["name"] for m in c.get("volumeMounts", [])} <= set(volumes)
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert EXTERNAL_SECRETS.get(ref["name"]) == ref["key"]
    pods = [d["spec"]["template"]["metadata"]["labels"] for d in _of(objs, "Deployment")]
    for kind in ("Service", "PodDisruptionBudget"):
        for o in _of(objs, kind):
            sel = o["spec"]["selector"]
            sel = sel.get("matchLabels", sel)
            assert sum(sel.items() <= p.items() for p in pods) == 1, f"{kind}/{o['metadata']['name']}"
    for hpa in _of(objs, "HorizontalPodAutoscaler"):
        _named(objs, "Deployment", hpa["spec"]["scaleTargetRef"]["name"])
        for m in hpa["spec"]["metrics"]:
            if m["type"] == "Object":
                _named(objs, m["object"]["describedObject"]["kind"], m["object"]["describedObject"]["name"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_store_is_mounted_read_only_in_every_pod_or_in_none(rendered, overlay):
    for d in _of(rendered[overlay], "Deployment"):
        pod = _pod(d)
        stores = [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
        mounts = [m for c in pod["containers"] for m in c.get("volumeMounts", []) if m["mountPath"] == gen.STORE_MOUNT]
        if overlay in STORE_OVERLAYS:
            assert len(stores) == 1 and stores[0]["persistentVolumeClaim"]["readOnly"] is True
            assert len(mounts) == 1 and mounts[0]["readOnly"] is True and mounts[0]["name"] == stores[0]["name"]
        else:
            assert not stores and not mounts


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_the_variants_that_ask_for_a_gpu_get_one_and_only_in_a_gpu_overlay(rendered, overlay):
    wants = {gen.worker_name(n) for n, v in _cluster_config()["variants"].items() if v.get("gpu", 0) > 0}
    assert wants, "the default configuration serves a variant on a GPU"
    for d in _of(rendered[overlay], "Deployment"):
        pod, name = _pod(d), d["metadata"]["name"]
        gpus = [c["resources"]["limits"].get("nvidia.com/gpu") for c in pod["containers"]]
        if overlay in GPU_OVERLAYS and name in wants:
            assert gpus == [1] and pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
            assert ":cuda" in pod["containers"][0]["image"]
        else:
            assert gpus == [None] and "nodeSelector" not in pod and "tolerations" not in pod
            assert ":cuda" not in pod["containers"][0]["image"]


# rendered: what the service must agree with

def test_ports_paths_and_settings_the_pods_use_exist_in_the_service(rendered):
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f"EXPOSE {gen.PORT}" in dockerfile and f'"--port", "{gen.PORT}"' in dockerfile
    # the store goes where the image's BENTOML_HOME keeps its models
    home = re.search(r"\bBENTOML_HOME=(\S+)", dockerfile).group(1)
    assert models_dir(home) == Path(gen.STORE_MOUNT)
    probe_paths = set(drain.PROBES) | set(drain.READY_PATHS)
    cluster = _cluster_config()
    objs = rendered["cpu"]
    for d in _of(objs, "Deployment"):
        for c in _pod(d)["containers"]:
            assert c["ports"] == [{"name": "http", "containerPort": gen.PORT}]
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert c[probe]["httpGet"]["path"] in probe_paths and c[probe]["httpGet"]["port"] == "http"
            assert c["readinessProbe"]["httpGet"]["path"] == "/readyz" and c["livenessProbe"]["httpGet"]["path"] == "/livez"
            config_mount = next(m for m in c["volumeMounts"] if m["name"] == "config")
            assert config_mount["mountPath"] == gen.CONFIG_PATH
    gateway = _pod(_named(objs, "Deployment", gen.GATEWAY))["containers"][0]
    assert {"name": CONFIG_ENV, "value": gen.CONFIG_PATH} in gateway["env"]
    keys_mount = next(m for m in gateway["volumeMounts"] if m["name"] == "api-keys")
    assert cluster["server"]["api_keys"] == f"{keys_mount['mountPath']}/keys.yaml"
    for s in _of(objs, "Service"):
        assert s["spec"]["ports"] == [{"name": "http", "port": gen.PORT, "targetPort": "http"}]
    for name, v in cluster["variants"].items():
        worker = _named(objs, "Deployment", gen.worker_name(name))
        command = _pod(worker)["containers"][0]["command"]
        assert command[:4] == ["python", "-m", "cli.worker", name] and command[command.index("--port") + 1] == str(gen.PORT)
        assert command[command.index("--config") + 1] == gen.CONFIG_PATH
        host, port = v["workers_at"].removeprefix("dns://").rsplit(":", 1)
        headless = _named(objs, "Service", host)
        assert headless["spec"]["clusterIP"] == "None" and int(port) == gen.PORT
    try:  # the worker's token variable, where this tree has the standalone worker
        from service.worker_app import TOKEN_ENV
    except ImportError:
        TOKEN_ENV = "EFFNET_WORKER_TOKEN"
    for d in _of(objs, "Deployment"):
        assert TOKEN_ENV in {e["name"] for e in _pod(d)["containers"][0]["env"]}


def test_the_grace_periods_cover_the_prestop_hook_and_the_drain(rendered):
    server = ServerConfig()
    cluster = _cluster_config()
    for d in _of(rendered["cpu"], "Deployment"):
        pod = _pod(d)
        c = pod["containers"][0]
        sleep = c["lifecycle"]["preStop"]["exec"]["command"]
        assert sleep[0] == "sleep"
        prestop = int(sleep[1])
        drain_s = server.drain_grace_s + (drain.WORKER_MARGIN_S if c["name"] == "worker" else 0)
        assert pod["terminationGracePeriodSeconds"] >= prestop + drain_s + drain.FORCE_AFTER_S
        if c["name"] == "worker":  # it serves on until the gateway has stopped calling it
            variant = cluster["variants"][c["command"][3]]
            assert prestop >= (gen.DNS_TTL_S + variant["resolve_every_s"] + server.health_interval_s
                               + server.health_timeout_s)
            # a replica stays in DNS only while its pod passes its readiness probe, and leaves it at once
            # when its pod terminates
            assert _named(rendered["cpu"], "Service", d["metadata"]["name"])["spec"].get(
                "publishNotReadyAddresses") is not True


def test_every_pod_has_requests_and_limits_and_cpu_workers_as_many_threads_as_cpus(rendered):
    threads = _cluster_config()["server"]["cpu_threads"]
    for d in _of(rendered["cpu"], "Deployment"):
        for c in _pod(d)["containers"]:
            assert {"cpu", "memory"} <= set(c["resources"]["requests"]) and {"cpu", "memory"} <= set(c["resources"]["limits"])
            if c["name"] == "worker":
                assert c["resources"]["limits"]["cpu"] == str(threads)


def test_every_metric_the_manifests_name_is_one_the_service_exports(rendered):
    exported = _exported()
    texts = [yaml.safe_dump(rendered[o]) for o in OVERLAYS] + [(K8S / "prometheus-adapter.yaml").read_text()]
    used = {m for t in texts for m in re.findall(r"\b(effnet_[a-z0-9_]+)", t)}
    assert used and used <= set(exported), sorted(used - set(exported))


# autoscaling

def _adapter_rules() -> list[dict]:
    return yaml.safe_load((K8S / "prometheus-adapter.yaml").read_text())["rules"]["custom"]


def _served_metric(rule: dict, series: str) -> str | None:
    """The name prometheus-adapter serves `series` under by `rule`, or None."""
    name = rule.get("name", {"matches": "^(.*)$", "as": "${1}"})
    match = re.search(name["matches"], series)
    return None if not match else re.sub(r"\$\{?(\d+)\}?", lambda g: match.group(int(g.group(1))), name["as"] or "${1}")


def test_each_worker_scales_on_the_gateways_count_of_its_variant_through_an_adapter_rule(rendered):
    exported, rules, cluster = _exported(), _adapter_rules(), load_config(gen.SOURCE_CONFIG)
    objs = rendered["cpu"]
    hpas = {h["spec"]["scaleTargetRef"]["name"]: h for h in _of(objs, "HorizontalPodAutoscaler")}
    for name, v in cluster.variants.items():
        hpa = hpas[gen.worker_name(name)]["spec"]
        assert hpa["minReplicas"] >= 2 and hpa["maxReplicas"] == gen.MAX_REPLICAS
        (metric,) = hpa["metrics"]
        assert metric["type"] == "Object"  # the gateway's count, not a Pods metric of the workers
        obj = metric["object"]
        assert obj["describedObject"] == {"apiVersion": "v1", "kind": "Service", "name": gen.GATEWAY}
        assert obj["metric"]["selector"] == {"matchLabels": {"variant": name}}
        assert obj["target"] == {"type": "AverageValue", "averageValue": str(gen.hpa_target(v.max_batch_size))}
        serving = [(r, s) for r in rules for s in re.findall(r"(effnet_[a-z0-9_]+)\{", r["seriesQuery"])
                   if _served_metric(r, s) == obj["metric"]["name"]]
        assert len(serving) == 1, "exactly one adapter rule serves the metric"
        rule, series = serving[0]
        kind, labels = exported[series]
        assert kind == "gauge" and set(obj["metric"]["selector"]["matchLabels"]) <= labels
    # the Service of each HPA's describedObject is one the ServiceMonitor scrapes
    monitor = _of(objs, "ServiceMonitor")[0]["spec"]["selector"]["matchLabels"]
    assert monitor.items() <= _named(objs, "Service", gen.GATEWAY)["metadata"]["labels"].items()


def test_the_adapter_rules_map_only_labels_the_scrape_gives_and_group_by_the_described_object():
    for rule in _adapter_rules():
        overrides = rule["resources"]["overrides"]
        assert set(overrides) <= TARGET_LABELS and overrides["service"] == {"resource": "service"}
        assert overrides["namespace"] == {"resource": "namespace"}
        assert set(re.findall(r'(\w+)!?=~?"', rule["seriesQuery"])) <= TARGET_LABELS
        assert {"<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"} <= set(re.findall(r"<<\.\w+>>", rule["metricsQuery"]))


# Prometheus Operator

def test_the_prometheus_operator_objects_hold_what_the_operator_reads(rendered):
    objs = rendered["cpu"]
    (monitor,) = _of(objs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    selected = [s for s in _of(objs, "Service")
                if monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"].get("labels", {}).items()]
    assert {s["metadata"]["name"] for s in selected} == {gen.GATEWAY} | {gen.worker_name(n) for n in _cluster_config()["variants"]}
    for ep in monitor["spec"]["endpoints"]:
        assert set(ep) <= {"port", "path", "interval", "scrapeTimeout", "scheme", "honorLabels"}
        assert all(ep["port"] in {p["name"] for p in s["spec"]["ports"]} for s in selected)
        assert ep["path"] in drain.PROBES
        assert re.fullmatch(r"\d+s", ep["interval"]) and int(ep["interval"][:-1]) <= 15  # the dashboard's rates
    (rule,) = _of(objs, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and set(rule["spec"]) == {"groups"}
    for group in rule["spec"]["groups"]:
        assert set(group) <= {"name", "interval", "rules"} and group["rules"]
        for r in group["rules"]:
            assert set(r) <= {"record", "alert", "expr", "for", "labels", "annotations"}
            assert ("record" in r) != ("alert" in r) and r["expr"]
    dashboards = [c for c in _of(objs, "ConfigMap") if c["metadata"].get("labels", {}).get("grafana_dashboard") == "1"]
    assert [list(c["data"]) for c in dashboards] == [["effnet-dashboard.json"]]


def test_promtool_accepts_the_rules_as_the_prometheus_rule_carries_them(rendered, tmp_path):
    if not Path(PROMTOOL).exists():
        pytest.skip("no promtool: `make setup` installs Debian's prometheus")
    (rule,) = _of(rendered["cpu"], "PrometheusRule")
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    check = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0 and "SUCCESS" in check.stdout, check.stdout + check.stderr
    path.write_text(yaml.safe_dump({"groups": [{"name": "x", "rules": [{"record": "a:b", "expr": "sum(("}]}]}))
    assert subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, timeout=60).returncode != 0


def test_workers_take_calls_from_their_gateways_only(rendered):
    for overlay, objs in rendered.items():
        policy = _named(objs, "NetworkPolicy", "effnet-workers")["spec"]

        def selected(selector, pod_labels):
            return all(pod_labels.get(k) == v for k, v in selector["matchLabels"].items())

        pods = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"] for d in _of(objs, "Deployment")}
        workers = {n for n, labels in pods.items() if selected(policy["podSelector"], labels)}
        assert workers == {n for n in pods if n != "effnet-gateway"}, (overlay, workers)
        callers = [p["podSelector"] for rule in policy["ingress"] for p in rule["from"] if "podSelector" in p]
        assert [n for n, labels in pods.items() if any(selected(c, labels) for c in callers)] == ["effnet-gateway"]
        ports = {p["containerPort"] for d in _of(objs, "Deployment") for c in _pod(d)["containers"]
                 for p in c["ports"] if p["name"] == "http"}
        assert all(p["port"] == "http" for rule in policy["ingress"] for p in rule["ports"]) and ports == {gen.PORT}
