"""Live route changes (service.live_routes): checks, persistence across restarts, who may change them.

The HTTP round trip is in test_gateway_http.py."""
import json
import os
import types
from collections import Counter

import pytest

from service.config import ConfigError, parse_config
from tests.service.fakes import CFG, gateway, gateway_for_routes, gateway_on_file


def test_a_route_change_moves_traffic_and_keeps_what_it_does_not_name():
    gw = gateway_for_routes()
    out = gw.change_route("fashion", {"split": {"b0": 3, "compact": 1}})
    assert out["split"] == {"b0": 0.75, "compact": 0.25} and out["previous"]["split"]["mec"] == 0.25
    assert out["shadow"] == {"variant": "mec", "fraction": 1.0}  # not named: kept
    picks = Counter(gw.router.assign("fashion").variant for _ in range(4000))
    assert set(picks) == {"b0", "compact"} and abs(picks["b0"] / 4000 - 0.75) < 0.03
    assert gw.describe_routes()["routes"]["fashion"]["split"] == {"b0": 0.75, "compact": 0.25}
    out = gw.change_route("fashion", {"shadow": None, "split": ["b0", "mec", "compact"]})
    assert out["shadow"] is None and out["split"] == {v: 1 / 3 for v in ("b0", "mec", "compact")}
    assert gw.router.assign("fashion", client_id="u1").shadow is None


def test_a_route_change_updates_the_variant_info_series():
    from prometheus_client import REGISTRY

    cfg = parse_config({**CFG, "routes": {**CFG["routes"], "fashion": {"split": {"b0": 1, "mec": 1}},
                                          "fashion-canary": {"split": {"compact": 1}}}})
    gw = gateway(cfg, {v: types.SimpleNamespace(classes=list("abcdefghij") if v != "lite0" else list(range(1000)),
                                                num_classes=10, params=1, macs=2, metrics={"top1": 0.9}, resolution=32)
                       for v in CFG["variants"]})
    gw.readiness.published = True  # its first ready has been announced
    gw.readiness.status = {v: {"device": "cpu", "engine": {"engine": "openvino", "precision": "fp32"}}
                           for v in CFG["variants"]}
    gw.info.publish(gw.cfg, gw.manifests, gw.readiness.status)
    gw.change_route("fashion", {"split": {"b0": 1, "mec": 1, "compact": 1}})

    def info(routes):
        return REGISTRY.get_sample_value("effnet_variant_info", {
            "variant": "compact", "route": routes, "model": "c:latest", "params": "1", "macs": "2", "top1": "0.9",
            "resolution": "32", "device": "cpu", "engine": "openvino", "precision": "fp32"})
    assert info("fashion-canary") == 0 and info("fashion,fashion-canary") == 1


@pytest.mark.parametrize("name, change, status, message", [
    ("cats", {"split": {"b0": 1}}, 404, "unknown route 'cats'; routes: fashion, imagenet"),
    ("fashion", {"split": {"b7": 1}}, 400, "unknown variant 'b7'"),
    ("fashion", {"split": {"b0": 0, "mec": 0, "compact": 0}}, 400, "the weights sum to 0"),
    ("fashion", {"split": {"b0": 1e308, "mec": 1e308, "compact": 1e308}}, 400, "too large to add up"),
    ("fashion", {"split": {"b0": -1, "mec": 1, "compact": 1}}, 400, "expected a number >= 0, got -1"),
    ("fashion", {"split": {"b0": "half", "mec": 1, "compact": 1}}, 400, "expected a number"),
    ("fashion", {"split": {"b0": 1, "mec": 1}, "shadow": None}, 400, r"\['compact'\] would be in no route"),
    ("fashion", {"split": {"b0": 1, "lite0": 1, "mec": 1, "compact": 1}}, 400, "has 1000 classes"),
    ("fashion", {"shadow": {"variant": "mec", "fraction": 2}}, 400, "expected 0..1"),
    ("fashion", {"split": {"b0": 0, "mec": 1, "compact": 0}, "shadow": {"variant": "mec", "fraction": 0.5}}, 400,
     "'mec' already answers every request of the route"),
    ("fashion", {"weights": {"b0": 1}}, 400, 'send a JSON object with "split"'),
    ("fashion", [], 400, 'send a JSON object with "split"'),
    ("fashion", {}, 400, 'send a JSON object with "split"'),
])
def test_a_bad_route_change_is_refused_and_changes_nothing(name, change, status, message):
    gw = gateway_for_routes()
    before = gw.cfg
    with pytest.raises(Exception, match=message) as e:
        gw.change_route(name, change)
    assert e.value.status == status and gw.cfg is before and gw.router.cfg is before


def test_a_route_change_to_a_variant_that_is_not_ready_is_refused():
    gw = gateway_for_routes(problems={"compact": "variant 'compact': sha256 mismatch"})
    with pytest.raises(Exception, match="variant 'compact' is not ready: .*sha256 mismatch"):
        gw.change_route("fashion", {"split": {"compact": 1, "b0": 1}})


def test_a_route_change_is_saved_and_served_again_after_a_restart(bentoml_home, tmp_path):
    from tests.support.serving import write_config

    path = write_config(tmp_path / "serving.yaml", CFG)
    gw = gateway_on_file(path)
    out = gw.change_route("fashion", {"split": {"b0": 1, "mec": 1, "compact": 2}})
    saved = out["saved_in"]
    assert saved and saved.startswith(str(bentoml_home))
    again = gateway_on_file(path)  # a restart: a new gateway on the same file and store
    assert again.cfg.routes["fashion"].split == {"b0": 0.25, "mec": 0.25, "compact": 0.5}
    assert again.cfg.routes["fashion"].shadow.variant == "mec"  # not named by the change: the file's
    assert again.describe_routes()["routes"]["fashion"]["changed_at"] == gw.live.changed_at["fashion"]
    assert again.describe_routes()["routes"]["imagenet"]["changed_at"] is None
    picks = Counter(again.router.assign("fashion").variant for _ in range(4000))
    assert abs(picks["compact"] / 4000 - 0.5) < 0.03
    # changing it back to the file's route forgets the change: nothing left to restore
    again.change_route("fashion", {"split": {"b0": 0.5, "mec": 0.25, "compact": 0.25}})
    assert not os.path.exists(saved) and again.describe_routes()["routes"]["fashion"]["changed_at"] is None
    assert gateway_on_file(path).cfg.routes == parse_config(CFG).routes


def test_an_edited_route_in_the_file_wins_over_a_saved_change(bentoml_home, tmp_path, caplog):
    from tests.support.serving import write_config

    cfg = {**CFG, "routes": {**CFG["routes"], "canary": {"split": {"b0": 1, "compact": 1}}}}
    path = write_config(tmp_path / "serving.yaml", cfg)
    gateway_on_file(path).change_route("fashion", {"split": {"b0": 1, "compact": 1}, "shadow": {"variant": "mec", "fraction": 0.1}})
    gateway_on_file(path).change_route("canary", {"split": {"b0": 1, "compact": 3}})
    edited = {**cfg, "routes": {**cfg["routes"], "fashion": {"split": {"b0": 0.2, "mec": 0.4, "compact": 0.4},
                                                             "shadow": {"variant": "mec", "fraction": 1.0}}}}
    write_config(path, edited)
    with caplog.at_level("WARNING"):
        gw = gateway_on_file(path)
    assert gw.cfg.routes["fashion"].split == {"b0": 0.2, "mec": 0.4, "compact": 0.4}  # the file's edit
    assert gw.cfg.routes["canary"].split == {"b0": 0.25, "compact": 0.75}  # the other route's change stays
    assert "the route has been edited in" in caplog.text
    assert set(json.loads(gw.live.file.read_text())["routes"]) == {"canary"}  # dropped for good


def test_an_unreadable_route_changes_file_leaves_the_files_routes(bentoml_home, tmp_path, caplog):
    from service.route_state import state_path
    from tests.support.serving import write_config

    path = write_config(tmp_path / "serving.yaml", CFG)
    state = state_path(str(path))
    state.parent.mkdir(parents=True)
    base = json.dumps({"split": {"b0": 0.5, "mec": 0.25, "compact": 0.25}, "shadow": {"variant": "mec", "fraction": 1.0}})
    for junk in ("{not json", '{"version": 1, "routes": []}', '{"version": 1, "routes": {"fashion": {"base": {},'
                 ' "route": {"split": {"nope": 1}}}}}', '{"version": 1, "routes": {"fashion": {"base": {"split": [1]},'
                 ' "route": {}}}}', '{"version": 1, "routes": {"fashion": {"base": %s, "route": {"split": "b0"}}}}' % base,
                 '{"version": 1, "routes": {"fashion": {"base": %s, "route": {"split": {"nope": 1}}}}}' % base):
        state.write_text(junk)
        with caplog.at_level("WARNING"):
            assert gateway_on_file(path).cfg.routes == parse_config(CFG).routes
    assert "cannot be read" in caplog.text and "not in the expected form" in caplog.text
    assert "unknown variant 'nope'" in caplog.text  # a saved change the configuration no longer allows


def test_a_route_change_that_cannot_be_saved_is_refused_and_changes_nothing(bentoml_home, tmp_path):
    from tests.support.serving import write_config

    path = write_config(tmp_path / "serving.yaml", CFG)
    gw = gateway_on_file(path)
    gw.live.file.parent.parent.mkdir(parents=True)
    gw.live.file.parent.write_text("a file where the folder should be")
    before = gw.cfg
    with pytest.raises(Exception, match="could not be saved") as e:
        gw.change_route("fashion", {"split": {"b0": 1, "mec": 1, "compact": 1}})
    assert e.value.status == 500 and gw.cfg is before and gw.router.cfg is before


def test_route_changes_in_memory_are_not_saved(bentoml_home, tmp_path):
    from tests.support.serving import write_config

    path = write_config(tmp_path / "serving.yaml", {**CFG, "server": {"route_changes": "memory"}})
    out = gateway_on_file(path).change_route("fashion", {"split": {"b0": 1, "mec": 1, "compact": 1}})
    assert out["saved_in"] is None and not (bentoml_home / "effnet-state" / "route-changes").exists()
    assert gateway_on_file(path).cfg.routes["fashion"].split["b0"] == 0.5
    with pytest.raises(ConfigError, match="route_changes: expected persist or memory"):
        parse_config({**CFG, "server": {"route_changes": "disk"}})


@pytest.mark.parametrize("host, local, auth, token, status", [
    ("127.0.0.1:3000", "127.0.0.1", None, None, 403),  # no token configured: closed, even on this machine
    ("127.0.0.1:3000", "127.0.0.1", "Bearer s3cret", "s3cret", None),
    ("localhost:3000", "127.0.0.1", "Bearer s3cret", "s3cret", None),
    ("[::1]:3000", "::1", "Bearer s3cret", "s3cret", None),
    ("10.1.2.3:3000", "10.1.2.3", "Bearer s3cret", "s3cret", None),  # the address the request came in on
    ("127.0.0.1", "127.0.0.1", None, "s3cret", 401), ("127.0.0.1", "127.0.0.1", "Bearer wrong", "s3cret", 401),
    ("rebound.example:3000", "127.0.0.1", "Bearer s3cret", "s3cret", 403),  # DNS rebinding
    (None, "127.0.0.1", "Bearer s3cret", "s3cret", 403),
])
def test_route_changes_need_the_admin_token_and_a_host_header_naming_this_server(host, local, auth, token, status):
    from service.live_routes import admin_refusal

    refusal = admin_refusal(host, local, auth, token)
    assert (refusal[0] if refusal else None) == status, refusal


def test_a_proxy_name_can_be_allowed_as_host(monkeypatch):
    from service.live_routes import admin_refusal

    assert admin_refusal("models.example.org", "127.0.0.1", "Bearer t", "t")[0] == 403
    monkeypatch.setenv("EFFNET_ADMIN_HOSTS", "models.example.org, other.example")
    assert admin_refusal("models.example.org:443", "127.0.0.1", "Bearer t", "t") is None


def test_the_admin_token_comes_from_the_environment_else_the_state_folders_file(tmp_path, monkeypatch):
    import stat

    from service import audit

    monkeypatch.delenv("EFFNET_ADMIN_TOKEN", raising=False)
    assert audit.configured_token(tmp_path) is None
    path = audit.ensure_token_file(tmp_path)
    token = path.read_text().strip()
    assert len(token) >= 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert audit.ensure_token_file(tmp_path).read_text().strip() == token  # kept across restarts
    assert audit.configured_token(tmp_path) == token
    monkeypatch.setenv("EFFNET_ADMIN_TOKEN", "from-env")
    assert audit.configured_token(tmp_path) == "from-env"


def test_the_audit_log_names_a_token_by_its_fingerprint_only(tmp_path):
    from service import audit

    log = audit.AuditLog(tmp_path / "audit.jsonl")
    log.write(client="127.0.0.1", token=audit.fingerprint("s3cret"), route="fashion", before={"split": {"b0": 1}},
              after={"split": {"mec": 1}}, result={"status": 200})
    with open(tmp_path / "audit.jsonl", "a") as f:
        f.write('{"cut by a cra')  # a line cut by a crash is skipped, the others read
    entries = audit.read(tmp_path / "audit.jsonl")
    assert len(entries) == 1 and entries[0]["route"] == "fashion" and entries[0]["result"] == {"status": 200}
    assert "s3cret" not in (tmp_path / "audit.jsonl").read_text() and entries[0]["token"] == audit.fingerprint("s3cret")


def test_route_changes_saved_before_the_state_folder_are_still_served(bentoml_home, tmp_path):
    from service import route_state
    from tests.support.serving import write_config

    path = write_config(tmp_path / "serving.yaml", CFG)
    gateway_on_file(path).change_route("fashion", {"split": {"b0": 1, "mec": 1, "compact": 1}})
    new = route_state.state_path(str(path))
    old = route_state.legacy_path(new)
    old.parent.mkdir(parents=True)
    new.rename(old)  # as a server without a state folder left it
    assert gateway_on_file(path).cfg.routes["fashion"].split["b0"] == pytest.approx(1 / 3)
    gateway_on_file(path).change_route("fashion", {"split": {"b0": 1, "mec": 2, "compact": 1}})
    assert new.is_file() and not old.exists()
