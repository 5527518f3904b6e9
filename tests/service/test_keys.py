"""Client keys without a server: the file's hashes, reading it again, the token bucket, per-key quotas, and the
middleware's answers on a fake app."""
from __future__ import annotations

import asyncio
import json
import os

import pytest

from service.config import ConfigError, parse_config
from service.key_guard import OTHER, KeysMiddleware, MetricNames, guarded
from service.keys import KeyRing, hash_key, keys_file, parse_keys, presented_key
from service.quota import Quotas, TokenBucket


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _write(path, text: str, bump_s: int = 0) -> None:
    path.write_text(text)
    if bump_s:  # a later mtime, as a rewrite seconds later would have
        st = os.stat(path)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + bump_s * 10**9))


def test_the_file_holds_hashes_and_a_key_is_found_by_its_hash_only(tmp_path):
    f = tmp_path / "keys"
    _write(f, f"alice: {hash_key('alice-secret')}\nbob: {{sha256: {hash_key('bob-secret')}, requests_per_s: 2}}\n")
    ring = KeyRing(f)
    assert ring.find("alice-secret").name == "alice"
    assert ring.find("bob-secret").requests_per_s == 2
    assert ring.find(hash_key("alice-secret")) is None  # the stored hash is not a key
    assert ring.find("alice-secre") is None and ring.find("") is None and ring.find(None) is None
    assert "alice-secret" not in f.read_text()


@pytest.mark.parametrize("text, problem", [
    ("alice: hunter2\n", "64 hex digits"),
    (f"alice: {hash_key('a')}\nbob: {hash_key('a')}\n", "another name"),
    (f"al ice: {hash_key('a')}\n", "key names"),
    (f"alice: {{sha256: {hash_key('a')}, burst: 3}}\n", "unknown key"),
    (f"alice: {{sha256: {hash_key('a')}, concurrent: -1}}\n", "concurrent"),
    ("- alice\n", "expected `name: sha256-hex` lines"),
    ("alice: [\n", "not valid YAML"),
])
def test_a_bad_keys_file_is_refused_naming_the_problem(text, problem):
    with pytest.raises(ConfigError, match=problem):
        parse_keys(text, "keys.yaml")


def test_the_file_is_read_again_when_it_changes_and_not_more_often_than_the_poll(tmp_path):
    f, clock = tmp_path / "keys", Clock()
    _write(f, f"alice: {hash_key('a')}\n")
    ring = KeyRing(f, poll_s=1.0, clock=clock)
    _write(f, f"alice: {hash_key('a')}\nbob: {hash_key('b')}\n", bump_s=5)
    assert ring.find("b") is None  # within the poll interval: not looked at yet
    clock.now += 1.0
    assert ring.find("b").name == "bob"
    _write(f, "bob: not-a-hash\n", bump_s=10)  # a broken rewrite keeps the keys read before
    clock.now += 1.0
    assert ring.find("b").name == "bob" and ring.find("a").name == "alice"
    _write(f, f"bob: {hash_key('b')}\n", bump_s=15)  # alice's key revoked
    clock.now += 1.0
    assert ring.find("a") is None and ring.find("b").name == "bob"


def test_a_missing_or_broken_file_at_start_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot be read"):
        KeyRing(tmp_path / "absent")
    (tmp_path / "bad").write_text("alice: 12\n")
    with pytest.raises(ConfigError, match="hex"):
        KeyRing(tmp_path / "bad")


def test_the_keys_file_comes_from_the_configuration_else_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("EFFNET_API_KEYS_FILE", raising=False)
    assert keys_file("") is None
    assert keys_file("keys.yaml", str(tmp_path / "serve.yaml")) == tmp_path / "keys.yaml"
    monkeypatch.setenv("EFFNET_API_KEYS_FILE", "/run/secrets/keys")
    assert str(keys_file("")) == "/run/secrets/keys"
    assert keys_file("/etc/keys") == keys_file("/etc/keys", "/x/serve.yaml")


def test_x_api_key_comes_before_authorization():
    assert presented_key({b"authorization": b"Bearer k1"}) == "k1"
    assert presented_key({b"authorization": b"Bearer admin", b"x-api-key": b"k2"}) == "k2"
    assert presented_key({b"authorization": b"Basic k1"}) is None
    assert presented_key({}) is None


def test_the_bucket_allows_its_rate_on_average_and_says_how_long_to_wait():
    b = TokenBucket(rate=2, capacity=2, now=0.0)
    assert b.take(0.0) == 0 and b.take(0.0) == 0
    assert b.take(0.0) == pytest.approx(0.5)
    assert b.take(0.5) == 0
    taken = sum(b.take(0.5 + i * 0.1) == 0 for i in range(1, 51))  # 5 s more at 10 a second
    assert taken == 10


def test_a_key_past_its_quota_is_refused_while_another_key_goes_on():
    clock = Clock()
    q = Quotas(rate=1, concurrent=2, clock=clock)
    assert q.admit("a") is None
    q.release("a")
    refused = q.admit("a")
    assert refused.over == "rate" and refused.retry_after_s == 1
    assert q.admit("b") is None  # another key, its own bucket
    clock.now += 1.0
    assert q.admit("a", rate=10) is None and q.admit("a", rate=10) is None
    assert q.admit("a", rate=10).over == "concurrent"  # three in flight against two
    q.release("a")
    assert q.admit("a", rate=10) is None
    assert q.admit("c", rate=0, concurrent=0) is None  # 0 = unlimited


def test_metric_labels_are_bounded():
    label = MetricNames(2)
    assert [label(n) for n in ("a", "b", "c", "a", "d")] == ["a", "b", OTHER, "a", OTHER]


def test_only_the_inference_and_feedback_endpoints_need_a_key():
    assert guarded("POST", "/classify") and guarded("POST", "/classify_batch") and guarded("POST", "/feedback")
    assert guarded("POST", "/v2/models/b0/infer") and guarded("POST", "/v2/models/b0/versions/3/infer")
    for method, path in (("GET", "/readyz"), ("GET", "/metrics"), ("PATCH", "/routes/fashion"), ("GET", "/variants"),
                         ("GET", "/v2/models/b0")):
        assert not guarded(method, path)


def test_the_server_settings_are_checked():
    cfg = {"variants": {"b0": {"model": "b0:latest"}}, "routes": {"r": {"split": ["b0"]}}}
    server = parse_config({**cfg, "server": {"api_keys": "k.yaml", "api_key_requests_per_s": 5}}).server
    assert server.api_keys == "k.yaml" and server.api_key_requests_per_s == 5 and server.api_key_concurrent == 0
    for bad in ({"api_keys": 3}, {"api_key_concurrent": 1.5}, {"api_keys_poll_s": 0}, {"api_key_metric_names": 0}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            parse_config({**cfg, "server": bad})


def _call(mw, headers: dict, path: str = "/classify") -> tuple[int, dict, dict]:
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path,
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
    asyncio.run(mw(scope, receive, send))
    start = sent[0]
    body = b"".join(m.get("body", b"") for m in sent[1:])
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, json.loads(body)


def test_the_middleware_answers_401_alike_for_no_key_and_a_wrong_one_and_429_past_the_quota(tmp_path):
    f = tmp_path / "keys"
    _write(f, f"alice: {{sha256: {hash_key('ka')}, requests_per_s: 1}}\nbob: {hash_key('kb')}\n")

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": json.dumps({"key": scope["state"]["api_key"]}).encode()})

    mw = KeysMiddleware(app, f)
    none, wrong = _call(mw, {}), _call(mw, {"Authorization": "Bearer nope"})
    assert none[0] == wrong[0] == 401 and none[2]["error"] == wrong[2]["error"]
    assert _call(mw, {"X-Api-Key": "ka"})[2] == {"key": "alice"}
    status, headers, body = _call(mw, {"X-Api-Key": "ka"})
    assert status == 429 and headers["retry-after"] == "1" and "quota" in body["error"]
    assert _call(mw, {"Authorization": "Bearer kb"})[0] == 200


def test_effnet_keys_add_prints_a_key_once_and_the_file_holds_only_its_hash(tmp_path, capsys):
    from cli.main import main

    f = tmp_path / "keys.yaml"
    _write(f, f"alice: {hash_key('a')}")  # no newline at the end: the new line still goes on its own
    assert main(["keys", "add", "dave", "--file", str(f), "--requests-per-s", "2.5", "--concurrent", "3"]) == 0
    key = capsys.readouterr().out.strip()
    assert key not in f.read_text() and (f.stat().st_mode & 0o777) == 0o600
    dave = KeyRing(f).find(key)
    assert (dave.name, dave.requests_per_s, dave.concurrent) == ("dave", 2.5, 3)
    assert KeyRing(f).find("a").name == "alice"
    assert main(["keys", "add", "dave", "--file", str(f)]) == 2  # a name already there
    assert main(["keys", "add", "erin", "--file", str(f), "--concurrent", "-1"]) == 2
    assert "erin" not in f.read_text()
