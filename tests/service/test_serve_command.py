"""`effnet serve` (cli/serve.py): checks before starting, --prepare, --reset-routes, ports."""
import os
import shutil

import pytest

from service.config import parse_config
from loadtest.processes import free_port
from tests.service.fakes import CFG, gateway_on_file


def test_effnet_serve_reset_routes_forgets_saved_changes(bentoml_home, tmp_path, capsys):
    import argparse

    from cli.serve import cmd_serve
    from tests.support.serving import write_config

    path = write_config(tmp_path / "serving.yaml", CFG)
    saved = gateway_on_file(path).change_route("fashion", {"split": {"b0": 1, "mec": 1, "compact": 1}})["saved_in"]
    args = argparse.Namespace(config=str(path), host="127.0.0.1", port=3999, check=True, reset_routes=True)
    cmd_serve(args)  # --check: exits after the reset (1 here: no checkpoints in this store)
    assert not os.path.exists(saved) and "forgot the route changes saved in" in capsys.readouterr().out
    assert gateway_on_file(path).cfg.routes == parse_config(CFG).routes


def test_effnet_serve_refuses_a_route_whose_variants_disagree_on_classes(bentoml_home, tmp_path, capsys):
    import argparse

    from cli.serve import cmd_serve
    from tests.support.serving import make_checkpoint, write_config

    make_checkpoint(bentoml_home, "compact-a", "compact", ["cat", "dog"], 32)
    make_checkpoint(bentoml_home, "compact-b", "compact", ["cat", "fox"], 32)
    cfg = write_config(tmp_path / "bad.yaml", {
        "variants": {"a": {"model": "compact-a:latest"}, "b": {"model": "compact-b:latest"}},
        "routes": {"pets": {"split": ["a", "b"]}},
    })
    assert cmd_serve(argparse.Namespace(config=str(cfg), host="127.0.0.1", port=3999)) == 2
    err = capsys.readouterr().err
    assert "route 'pets': variant 'b' (compact-b:latest) has 2 classes" in err and "'a'" in err


def test_serve_prepare_records_the_engine_each_worker_will_load(bentoml_home, tmp_path, capsys):
    """`make engines` (`effnet serve --prepare`) exports, verifies and times each variant as its worker
    will, so the worker's own load finds auto's choice recorded and only builds the winner."""
    import argparse

    from engines import load_engine
    from cli.serve import cmd_serve
    from tests.support.serving import make_checkpoint, write_config

    make_checkpoint(bentoml_home, "compact-a", "compact", ["cat", "dog"], 32)
    cfg = write_config(tmp_path / "c.yaml", {
        "server": {"cpu_threads": 2},
        "variants": {"a": {"model": "compact-a:latest", "engine": "auto", "max_batch_size": 2}},
        "routes": {"pets": {"split": ["a"]}},
    })
    check = argparse.Namespace(config=str(cfg), host="127.0.0.1", port=3999, prepare=False, check=True)
    assert cmd_serve(check) == 1  # `make serve` then runs `make checkpoints engines`
    assert "variant 'a': engine auto has not chosen for cpu, 2 thread(s), batch sizes [1, 2]" in capsys.readouterr().err
    args = argparse.Namespace(config=str(cfg), host="127.0.0.1", port=3999, prepare=True)
    assert cmd_serve(args) == 0
    assert cmd_serve(check) == 0  # prepared: `make serve` goes straight to serving
    out = capsys.readouterr().out
    assert "[a] compact" in out  # step 1: the export's own report, prefixed with the variant
    assert "auto: fastest verified engine at batch [1, 2]" in out
    eng, _ = load_engine("compact-a:latest", engine="auto", threads=2, batch_sizes=(1, 2))
    assert eng.describe()["reason"].startswith("auto: recorded choice")
    # A variant whose checkpoint is missing: nothing to prepare, said plainly, exit status 1.
    cfg = write_config(tmp_path / "missing.yaml", {"variants": {"a": {"model": "nowhere:latest"}},
                                                   "routes": {"pets": {"split": ["a"]}}})
    assert cmd_serve(argparse.Namespace(config=str(cfg), host="127.0.0.1", port=3999, prepare=True)) == 1
    assert "nowhere" in capsys.readouterr().err
    assert cmd_serve(argparse.Namespace(config=str(cfg), host="127.0.0.1", port=3999, check=True)) == 1
    err = capsys.readouterr().err
    assert "variant 'a'" in err and "nowhere" in err


@pytest.mark.parametrize("text, ok", [("3000", True), ("1", True), ("65535", True), ("0", False), ("99999", False),
                                      ("http", False)])
def test_serve_takes_only_real_port_numbers(text, ok):
    import argparse

    from cli.serve import port_number

    if ok:
        assert port_number(text) == int(text)
    else:
        with pytest.raises(argparse.ArgumentTypeError):
            port_number(text)


def test_serve_says_when_its_port_is_taken():
    import socket

    from cli.serve import port_in_use

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert "in use" in port_in_use("127.0.0.1", port)
    assert port_in_use("127.0.0.1", port) is None


def test_effnet_serve_says_which_variants_run_inside_the_gateway(bentoml_home, tmp_path, capsys, monkeypatch):
    import argparse

    from cli import serve as cli
    from tests.support.serving import write_config

    started = []
    monkeypatch.setattr(cli, "run_server", lambda *a: started.append(a) or 0)  # stop short of `bentoml serve`
    cfg = {**CFG, "variants": {**CFG["variants"], "mec": {**CFG["variants"]["mec"], "placement": "gateway"}}}
    path = write_config(tmp_path / "serving.yaml", cfg)
    cli.cmd_serve(argparse.Namespace(config=str(path), host="127.0.0.1", port=free_port()))
    out = capsys.readouterr().out
    assert started and "served inside the gateway process (placement: gateway, no HTTP hop): mec\n" in out
    cli.cmd_serve(argparse.Namespace(config=str(write_config(tmp_path / "w.yaml", CFG)), host="127.0.0.1",
                                     port=free_port()))
    assert "inside the gateway" not in capsys.readouterr().out


def test_two_servers_of_one_store_have_runtime_folders_of_their_own(tmp_path):
    from cli.serve import server_env

    home = tmp_path / "store"
    first = server_env(home, port=3001)["TMPDIR"]
    (open(os.path.join(first, "worker.sock"), "w")).close()  # what the first server's workers listen on
    second = server_env(home, port=3002)["TMPDIR"]
    assert first != second and os.path.exists(os.path.join(first, "worker.sock"))
    # One store, one state folder: route changes and the admin token are the store's, not the port's.
    assert server_env(home, port=3001)["EFFNET_STATE_DIR"] == server_env(home, port=3002)["EFFNET_STATE_DIR"]
    for folder in (first, second):
        shutil.rmtree(folder)


def test_a_port_is_served_by_one_effnet_serve_at_a_time(tmp_path):
    from cli.serve import port_lock

    fd, _ = port_lock(3005, tmp_path)
    assert fd is not None
    again, holder = port_lock(3005, tmp_path)
    assert again is None and f"pid {os.getpid()}" in holder
    other, _ = port_lock(3006, tmp_path)
    assert other is not None
    os.close(fd)
    os.close(other)
    fd, _ = port_lock(3005, tmp_path)  # let go when its holder ends
    assert fd is not None
    os.close(fd)


def test_effnet_serve_says_who_holds_the_port_it_was_asked_for(bentoml_home, tmp_path, capsys):
    import argparse

    from cli.serve import cmd_serve, port_lock
    from tests.support.serving import write_config

    port = free_port()
    fd, _ = port_lock(port)
    try:
        code = cmd_serve(argparse.Namespace(config=str(write_config(tmp_path / "s.yaml", CFG)), host="127.0.0.1",
                                            port=port))
    finally:
        os.close(fd)
    err = capsys.readouterr().err
    assert code == 2 and f"port {port} is taken by another effnet serve (pid {os.getpid()}" in err
