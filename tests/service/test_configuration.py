"""The serving configuration (service.config): defaults, validation, and the shipped service/config.yaml."""
import pytest

from service.config import ConfigError, check_label_spaces, load_config, parse_config
from tests.service.fakes import CFG


def test_default_config_serves_the_default_store():
    cfg = load_config()
    assert cfg.default_route == "fashion"
    assert set(cfg.routes["fashion"].split) == {"b0", "mec", "compact"} and cfg.routes["fashion"].shadow
    assert cfg.variants["lite0"].model == "lite0-imagenet:latest"
    assert cfg.server.max_body_bytes == 10 * 1024 * 1024
    # lite0 (224x224, inference-bound) runs two processes that share the cores; the rest one each. Every
    # variant in a worker process of its own: `placement: gateway` is a deployment's choice, not ours.
    assert cfg.variants["lite0"].workers == 2 and cfg.variants["b0"].workers == 1
    assert {v.placement for v in cfg.variants.values()} == {"worker"}


@pytest.mark.parametrize("patch, message", [
    ({"routes": {"fashion": {"split": {"b1": 1}}}}, "unknown variant 'b1'"),
    ({"default_route": "nope"}, "default_route: unknown route 'nope'"),
    ({"variants": {"b0": {"model": "x", "max_batch_size": 0}}}, "variants.b0.max_batch_size"),
    ({"variants": {"b0": {"model": "x", "typo": 1}}}, "unknown key"),
    ({"routes": {"fashion": {"split": {"b0": 1}, "shadow": {"variant": "mec", "fraction": 2}}}}, "fraction"),
    ({"server": {"max_body_mb": -1}}, "server.max_body_mb"),
    ({"routes": {"fashion": {"split": {"b0": 0, "mec": 0}}}}, "sum to 0"),
    ({"routes": {"fashion": {"split": {"b0": 1e308, "mec": 1e308}}}}, "too large to add up"),
    ({"variants": {"b0": {"model": "x", "workers": 0}}}, "variants.b0.workers: expected an integer > 0"),
    ({"server": {"tracing": "yes"}}, "server.tracing: expected true or false"),
    ({"server": {"worker_transport": "tcp"}}, "server.worker_transport: expected shared_memory or http"),
    ({"routes": {"imagenet": {"split": {"lite0": 1}, "shadow": {"variant": "lite0", "fraction": 0.5}}}},
     "routes.imagenet.shadow.variant: 'lite0' already answers every request"),
])
def test_invalid_configs_name_the_key(patch, message):
    data = {**CFG, **patch}
    if "variants" in patch:
        data["variants"] = {**CFG["variants"], **patch["variants"]}
    if "routes" in patch:
        data["routes"] = {**CFG["routes"], **patch["routes"]}
    with pytest.raises(ConfigError, match=message):
        parse_config(data)


def test_tracing_is_skipped_for_every_url_unless_switched_on():
    from opentelemetry.util.http import ExcludeList

    from service.config import tracing_options

    off = tracing_options(parse_config(CFG).server)
    assert all(ExcludeList(off["excluded_urls"]).url_disabled(f"http://127.0.0.1:3000{path}")
               for path in ("/classify", "/classify_batch", "/predict", "/status", "/"))
    assert tracing_options(parse_config({**CFG, "server": {"tracing": True}}).server) == {}


def test_a_config_path_that_is_no_yaml_file_is_a_config_error(tmp_path):
    (tmp_path / "binary.yaml").write_bytes(bytes(range(128, 256)))
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    for path, message in [(tmp_path, "is a folder"), (tmp_path / "none.yaml", "does not exist"),
                          (tmp_path / "binary.yaml", "cannot be read as text"), (tmp_path / "list.yaml", "expected a mapping")]:
        with pytest.raises(ConfigError, match=message):  # a traceback before (IsADirectoryError, UnicodeDecodeError)
            load_config(path)


def test_more_worker_processes_than_cpu_threads_are_lowered(caplog):
    """Each CPU batch holds a core slot, so processes beyond the thread budget could only wait."""
    data = {**CFG, "server": {"cpu_threads": 2}, "variants": {**CFG["variants"], "b0": {"model": "x", "workers": 3}}}
    with caplog.at_level("WARNING"):
        cfg = parse_config(data)
    assert cfg.variants["b0"].workers == 2 and "variants.b0.workers: 3 processes on 2 CPU threads" in caplog.text


def test_a_variant_with_other_classes_than_its_route_is_named():
    cfg = parse_config(CFG)
    classes = {"b0": list("abc"), "mec": list("abc"), "compact": list("abd"), "lite0": list("xyz")}
    with pytest.raises(ConfigError, match=r"route 'fashion': variant 'compact' \(c:latest\) has 3 classes"):
        check_label_spaces(cfg, classes)
    check_label_spaces(cfg, {**classes, "compact": list("abc")})


def test_the_body_deadline_must_come_before_bentomls_timeout():
    with pytest.raises(ConfigError, match="body_timeout_s .60. must be below server.timeout_s .60."):
        parse_config({**CFG, "server": {"body_timeout_s": 60}})


def test_worker_batch_sizes_are_exact_for_small_maxima_else_powers_of_two():
    """Static-shape engines pad each batch to the next size: a variant batching at most 8 (large inputs)
    compiles every size, larger maxima waste at most half of a batch."""
    from service.config import VariantConfig

    assert VariantConfig("v", "m:latest", max_batch_size=8).batch_sizes == (1, 2, 3, 4, 5, 6, 7, 8)
    assert VariantConfig("v", "m:latest", max_batch_size=4).batch_sizes == (1, 2, 3, 4)
    assert VariantConfig("v", "m:latest", max_batch_size=12).batch_sizes == (1, 2, 4, 8, 12)
    assert VariantConfig("v", "m:latest", max_batch_size=32).batch_sizes == (1, 2, 4, 8, 16, 32)
    assert VariantConfig("v", "m:latest", max_batch_size=1).batch_sizes == (1,)


def test_calls_in_flight_default_to_two_per_worker_process_and_can_be_set(tmp_path):
    from service.config import ConfigError, VariantConfig, load_config

    assert VariantConfig("v", "m:latest").resolved_calls_in_flight == 2
    assert VariantConfig("v", "m:latest", workers=2).resolved_calls_in_flight == 4
    assert VariantConfig("v", "m:latest", workers=2, calls_in_flight=1).resolved_calls_in_flight == 1
    cfg = tmp_path / "c.yaml"
    body = "variants:\n  a: {model: 'a:latest', calls_in_flight: %s}\nroutes:\n  r: {split: [a]}\n"
    cfg.write_text(body % "3")
    assert load_config(cfg).variants["a"].resolved_calls_in_flight == 3
    for bad in ("0", "-1", "two"):
        cfg.write_text(body % bad)
        with pytest.raises(ConfigError, match="calls_in_flight"):
            load_config(cfg)


def test_placement_is_worker_or_gateway_and_in_the_gateway_one_call_per_stream(tmp_path):
    from service.config import ConfigError, VariantConfig, load_config

    assert VariantConfig("v", "m:latest").placement == "worker"
    # in the gateway a call beyond the streams would only wait for one, unbatched
    assert VariantConfig("v", "m:latest", workers=2, placement="gateway").resolved_calls_in_flight == 2
    assert VariantConfig("v", "m:latest", placement="gateway", calls_in_flight=3).resolved_calls_in_flight == 3
    cfg = tmp_path / "c.yaml"
    body = "variants:\n  a: {model: 'a:latest', placement: %s}\nroutes:\n  r: {split: [a]}\n"
    cfg.write_text(body % "gateway")
    assert load_config(cfg).variants["a"].placement == "gateway"
    for bad in ("inline", "Gateway", "1", "[gateway]"):
        cfg.write_text(body % bad)
        with pytest.raises(ConfigError, match=r"variants\.a\.placement: expected worker or gateway"):
            load_config(cfg)


def test_the_shipped_configuration_writes_only_what_differs_from_the_defaults():
    """Each default is written once, in service/config.py: a key of service/config.yaml that repeats it
    would drift from it unnoticed."""
    import dataclasses

    import yaml

    from service.config import DEFAULT_CONFIG, ServerConfig, VariantConfig

    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    defaults = {f.name: f.default for f in dataclasses.fields(VariantConfig) if f.default is not dataclasses.MISSING}
    for name, v in raw["variants"].items():
        same = {k: x for k, x in v.items() if k in defaults and defaults[k] == x}
        assert not same, f"variants.{name} repeats the defaults {same}"
    server = {f.name: f.default for f in dataclasses.fields(ServerConfig)}
    same = {k: x for k, x in (raw.get("server") or {}).items() if k in server and server[k] == x}
    assert not same, f"server repeats the defaults {same}"
    # what a variant gets when it names nothing but its checkpoint
    v = load_config().variants["b0"]
    assert (v.engine, v.max_batch_size, v.max_latency_ms, v.workers, v.placement) == ("auto", 32, 5000, 1, "worker")


def test_code_and_yaml_name_each_setting_alike():
    """A YAML key is the field of the same name (max_body_mb, calls_in_flight), not a second name for it."""
    cfg = parse_config({**CFG, "server": {"max_body_mb": 2.5},
                        "variants": {**CFG["variants"], "b0": {"model": "b0:latest", "calls_in_flight": 3}}})
    assert cfg.server.max_body_mb == 2.5 and cfg.server.max_body_bytes == int(2.5 * 1024 * 1024)
    assert cfg.variants["b0"].calls_in_flight == cfg.variants["b0"].resolved_calls_in_flight == 3
