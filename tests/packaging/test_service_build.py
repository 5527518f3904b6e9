"""Packaging: `bentoml build` works offline with the repository's bentofile (Docker cannot run here), and
every role installs what its code imports, from one list of runtime packages."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LOCAL = {"models", "store", "engines", "service", "training", "loadtest", "cli", "tests", "benchmarks"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _project() -> dict:
    """pyproject.toml's [project] with the dynamic fields filled in, as setuptools reads them."""
    import warnings

    from setuptools.config.pyprojecttoml import read_configuration

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # [tool.setuptools] is "beta" to older setuptools
        return read_configuration(ROOT / "pyproject.toml", expand=True)["project"]


def _requirement_lines(text: str) -> set[str]:
    return {line.split("#", 1)[0].replace(" ", "") for line in text.splitlines()
            if line.split("#", 1)[0].strip()}


@pytest.mark.server  # runs `bentoml build` in a child process
def test_bentoml_build_packs_the_service_with_the_runtime_set_of_pyproject(tmp_path):
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "home"), "BENTOML_DO_NOT_TRACK": "true"}
    r = subprocess.run([sys.executable, "-m", "bentoml", "build", "-f", "bentofile.yaml", "."], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    bentos = list((tmp_path / "home" / "bentos" / "effnet-serving").glob("*/src"))
    assert len(bentos) == 1
    src = bentos[0]
    for f in ("service/app.py", "service/experiments/live.py", "service/config.yaml", "store/checkpoint.py",
              "models/registry.py"):
        assert (src / f).is_file(), f
    assert not (src / "tests").exists()
    # Of the command, only what the bento serves: the gateway under the supervision of `effnet serve`.
    assert sorted(p.name for p in (src / "cli").glob("*.py")) == ["__init__.py", "bentoml_serve.py", "build.py", "serve.py",
                                                                          "worker.py"]
    requirements = _requirement_lines((src.parent / "env" / "python" / "requirements.txt").read_text())
    # BentoML adds its own pin when the list has none; ours is the same one.
    assert requirements == set(_project()["dependencies"])
    assert {"bentoml==1.4.30", "torch==2.14.1", "torchvision==0.29.1"} <= requirements


def test_the_runtime_set_is_one_list_that_pyproject_the_bentofile_and_the_dockerfile_read():
    import yaml

    runtime = _requirement_lines((ROOT / "requirements.txt").read_text())
    assert set(_project()["dependencies"]) == runtime
    assert yaml.safe_load((ROOT / "bentofile.yaml").read_text())["python"]["requirements_txt"] == "requirements.txt"
    docker = (ROOT / "Dockerfile").read_text()
    assert "COPY requirements.txt" in docker and "pip install --no-cache-dir -r requirements.txt" in docker
    # The image serves through the wrapper that restarts crashed workers promptly, inside containers too.
    assert '"-m", "cli.bentoml_serve", "serve"' in docker and "COPY cli/ cli/" in docker
    # No package is named in the Dockerfile outside requirements.txt.
    assert not re.search(r"pip install [^\n]*==", docker)
    # Test and load-test tools are not runtime packages.
    assert not {_norm(re.split(r"[<>=!~\[ ]", r)[0]) for r in runtime} & {"pytest", "locust", "scikit-image",
                                                                        "matplotlib"}


def test_uvicorn_under_bentoml_serve_picks_the_c_parser_and_loop():
    """uvicorn's "auto" picks httptools and uvloop when they are installed (requirements.txt has them):
    5-20% more requests/s through the gateway and worker hops. Fails if an install drops them."""
    import uvicorn.loops.auto as loops
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    assert AutoHTTPProtocol.__name__ == "HttpToolsProtocol"
    assert "uvloop" in loops.auto_loop_factory(use_subprocess=False).__module__


def _imports_needed(path: Path) -> set[str]:
    """Top-level modules `path` imports, also inside functions, outside `try: ... except ImportError`
    (optional ones)."""
    import ast

    tree = ast.parse(path.read_text())
    optional: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
                isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError", "Exception")
                for h in node.handlers):
            optional |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    names = set()
    for node in ast.walk(tree):
        if id(node) in optional:
            continue
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _served_files() -> set[Path]:
    import yaml

    spec = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    return {p for pattern in spec["include"] if pattern.endswith(".py") for p in ROOT.glob(pattern)}


# Each role: the code it runs, and the extras it installs on top of the runtime set.
ROLES = {
    "service": (_served_files, []),
    "train": (lambda: set((ROOT / "training").rglob("*.py")), ["train"]),
    "loadtest": (lambda: set((ROOT / "loadtest").rglob("*.py")) | {ROOT / "benchmarks" / "serve_bench.py"},
                 ["loadtest"]),
    "cli and tests": (lambda: set((ROOT / "cli").rglob("*.py")) | set((ROOT / "tests").rglob("*.py")),
                      ["train", "loadtest", "test"]),
}


@pytest.mark.parametrize("role", ROLES)
def test_each_role_declares_every_package_its_code_imports(role):
    """Every third-party module a role's code imports comes from a package that requirements.txt or the
    role's extras name themselves, not one that happens to come along with another (numpy with torch)."""
    from importlib import metadata

    files, extras = ROLES[role]
    project = _project()
    declared = {_norm(re.split(r"[ ;<>=!~\[(]", r, maxsplit=1)[0])
                for r in project["dependencies"] + [r for e in extras for r in project["optional-dependencies"][e]]}
    imported = set().union(*(_imports_needed(p) for p in files()))
    third_party = imported - LOCAL - set(sys.stdlib_module_names) - {"__future__"}
    dists = metadata.packages_distributions()
    missing = {m: sorted(dists.get(m, [m])) for m in sorted(third_party)
               if not {_norm(d) for d in dists.get(m, [m])} & declared}
    assert not missing, f"imported by {role} but declared by neither requirements.txt nor its extras: {missing}"
