"""Versions of a variant (service/versions.py) without a server: the draw by share, the rules of shares,
promote, rollback and unload, and what a restart reloads. The worker processes are not started here
(tests/service/test_versions_http.py starts them through a real server)."""
import asyncio
import random
from types import SimpleNamespace

import pytest

from service.errors import ClientError
from service.versions import Version, Versions


class Dispatcher:
    def __init__(self):
        self.added, self.removed, self.health = [], [], SimpleNamespace(replicas={})

    def add_version(self, key, urls):
        self.added.append(key)

    async def remove_version(self, key):
        self.removed.append(key)

    def calls_pending(self, key):
        return 0


def versions(tmp_path, monkeypatch, down=()):
    monkeypatch.setenv("EFFNET_STATE_DIR", str(tmp_path))
    vs = Versions({"compact": "compact:v1", "b0": "b0:v1"}, {}, Dispatcher(), str(tmp_path / "serve.yaml"), "t",
                  usable=lambda key: key not in down, rng=random.Random(0))
    return vs


def loaded(vs, tag, share=0.0, state="ready"):
    """A version as `load` leaves it once its worker is ready (no process here)."""
    v = Version(tag, f"compact@{tag}", share=share, state=state)
    vs.by_variant["compact"].versions[tag] = v
    return v


def test_requests_follow_the_shares_and_only_versions_that_serve_take_them(tmp_path, monkeypatch):
    vs = versions(tmp_path, monkeypatch)
    assert vs.choose("compact") == ("compact", "compact:v1")  # one version: the configured one
    loaded(vs, "compact:v2", share=0.1)
    tags = [vs.choose("compact")[1] for _ in range(20000)]
    assert abs(tags.count("compact:v2") / len(tags) - 0.1) < 0.01
    assert vs.choose("compact") in {("compact", "compact:v1"), ("compact@compact:v2", "compact:v2")}
    vs.by_variant["compact"].versions["compact:v2"].state = "loading"
    assert {vs.choose("compact")[1] for _ in range(500)} == {"compact:v1"}


def test_a_version_whose_replicas_are_down_gives_its_share_and_default_back(tmp_path, monkeypatch):
    vs = versions(tmp_path, monkeypatch, down={"compact@compact:v2"})
    loaded(vs, "compact:v2", share=0.5)
    assert {vs.choose("compact")[1] for _ in range(500)} == {"compact:v1"}
    vs.by_variant["compact"].default = "compact:v2"  # promoted, then its workers died: the configured answers
    assert {vs.choose("compact")[1] for _ in range(100)} == {"compact:v1"}


def test_shares_promote_rollback_and_unload_follow_their_rules(tmp_path, monkeypatch):
    vs = versions(tmp_path, monkeypatch)
    loaded(vs, "compact:v2")
    loaded(vs, "compact:v3", state="loading")
    with pytest.raises(ClientError, match="default") as e:
        vs.set_share("compact", "v1", 0.1)
    assert e.value.status == 409
    with pytest.raises(ClientError, match="loading"):
        vs.set_share("compact", "v3", 0.1)
    vs.set_share("compact", "v3", 0.0)  # a loading version may be set to take nothing
    vs.set_share("compact", "v2", 0.6)
    loaded(vs, "compact:v4")
    with pytest.raises(ClientError, match="add up to 110%"):
        vs.set_share("compact", "v4", 0.5)
    with pytest.raises(ClientError, match="nothing to roll back"):
        vs.rollback("compact")
    with pytest.raises(ClientError, match="only a version that serves"):
        vs.promote("compact", "v3")

    vs.promote("compact", "compact:v2")
    vv = vs.by_variant["compact"]
    assert (vv.default, vv.previous) == ("compact:v2", "compact:v1") and all(v.share == 0 for v in vv.versions.values())
    vs.rollback("compact")
    assert (vv.default, vv.previous) == ("compact:v1", "compact:v2")
    with pytest.raises(ClientError, match="configured checkpoint"):
        vs.unload("compact", "v1")
    with pytest.raises(ClientError, match="no version 'v9'") as e:
        vs.unload("compact", "v9")
    assert e.value.status == 404

    async def unload():
        vs.unload("compact", "v2")
        await asyncio.gather(*vs.tasks)

    asyncio.run(unload())
    assert "compact:v2" not in vv.versions and vv.previous is None and vs.dispatcher.removed == ["compact@compact:v2"]


def test_a_restart_loads_the_saved_versions_again_with_their_shares(tmp_path, monkeypatch):
    vs = versions(tmp_path, monkeypatch)
    loaded(vs, "compact:v2", share=0.25)
    loaded(vs, "compact:v3")
    vs.promote("compact", "v3")
    vs.set_share("compact", "v2", 0.25)

    again = versions(tmp_path, monkeypatch)
    started = []
    monkeypatch.setattr(again, "check", lambda variant, tag: (tag, 0.9))
    monkeypatch.setattr(again, "_start", lambda variant, v: started.append(v.tag))
    again.restore()
    vv = again.by_variant["compact"]
    assert started == ["compact:v2", "compact:v3"]
    assert (vv.default, vv.previous) == ("compact:v3", "compact:v1")
    assert vv.versions["compact:v2"].share == 0.25 and vv.versions["compact:v2"].state == "loading"
    # until its workers are ready, the promoted version's requests go to the configured one
    assert {again.choose("compact")[1] for _ in range(100)} == {"compact:v1"}


def test_a_version_is_ready_only_once_a_check_has_found_its_worker_ready(tmp_path, monkeypatch):
    """A replica not checked yet counts as usable for calls, but a version must not take its share before
    its worker has answered: the first requests would find nothing listening."""
    from service.health import UP, Replica

    vs = versions(tmp_path, monkeypatch)
    v = loaded(vs, "compact:v2", share=0.5, state="loading")
    replica = Replica()
    vs.dispatcher.health.replicas[v.key] = [replica]

    async def run():
        task = asyncio.get_running_loop().create_task(vs._await_ready("compact", v))
        await asyncio.sleep(0.6)
        assert v.state == "loading"  # usable (unknown) but never checked
        assert {vs.choose("compact")[1] for _ in range(200)} == {"compact:v1"}
        replica.state, replica.status = UP, {"ready": True}
        await asyncio.wait_for(task, 2)
        assert v.state == "ready"

    asyncio.run(run())
