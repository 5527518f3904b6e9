"""`bentoml build` works offline with the repository's bentofile (Docker cannot run here)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_bentoml_build_packs_the_service(tmp_path):
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "home"), "BENTOML_DO_NOT_TRACK": "true"}
    r = subprocess.run([sys.executable, "-m", "bentoml", "build", "-f", "bentofile.yaml", "."], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    bentos = list((tmp_path / "home" / "bentos" / "effnet-serving").glob("*/src"))
    assert len(bentos) == 1
    src = bentos[0]
    for f in ("service/app.py", "service/config.yaml", "store/checkpoint.py", "models/registry.py"):
        assert (src / f).is_file(), f
    assert not (src / "tests").exists()
    requirements = (src.parent / "env" / "python" / "requirements.txt").read_text()
    assert "bentoml==1.4.30" in requirements and "torch==2.14.1" in requirements
    # The engines auto picks from, and uvicorn's C parser and loop, travel with the bento too.
    for package in ("onnxruntime", "openvino", "uvloop", "httptools", "simplejpeg"):
        assert package in requirements, package


def test_uvicorn_under_bentoml_serve_picks_the_c_parser_and_loop():
    """uvicorn's "auto" picks httptools and uvloop when they are installed (pyproject.toml has them):
    5-20% more requests/s here. Fails if an install drops them."""
    import uvicorn.loops.auto as loops
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    assert AutoHTTPProtocol.__name__ == "HttpToolsProtocol"
    assert "uvloop" in loops.auto_loop_factory(use_subprocess=False).__module__


# Modules the bento packs that the server never imports: benchmark and test helpers, the CLI.
NOT_SERVED = {"service/bench.py", "service/cli.py", "models/cli.py", "engines/cli.py"}


def _imports_needed(path: Path) -> set[str]:
    """Top-level modules `path` imports, outside `try: ... except ImportError` (optional ones)."""
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


def _requirement_closure(names: set[str]) -> set[str]:
    """The distributions `names` install, with everything they require (as installed here)."""
    import re
    from importlib import metadata

    def norm(n: str) -> str:
        return re.sub(r"[-_.]+", "-", n).lower()

    seen, todo = set(), [norm(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for r in requires:
            if "extra ==" not in r:
                todo.append(norm(re.split(r"[ ;<>=!~\[(]", r, maxsplit=1)[0]))
    return seen


def test_the_bento_and_the_dockerfile_install_what_the_server_imports():
    """Every third-party module the served code imports (the bentofile's `include`, less the CLI and
    the benchmark and test helpers) comes from a package the bentofile and the Dockerfile both
    install, or from one of their requirements. NOTE: simplejpeg, added to pyproject.toml for the
    decoder, was missing from both until this test (2026-11-28)."""
    import re
    from importlib import metadata

    import yaml

    spec = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    bento = {re.split(r"[<>=!~\[ ]", p, maxsplit=1)[0].lower() for p in spec["python"]["packages"]}
    docker_text = re.sub(r"\$\{[^}]*\}", "", (ROOT / "Dockerfile").read_text().replace("\\\n", " "))
    docker = {re.split(r"[<>=!~\[ ]", p.strip('"'), maxsplit=1)[0].lower()
              for line in re.findall(r"pip install ([^\n&]*)", docker_text) for p in line.split()
              if not p.startswith(("-", "$"))}
    assert bento == docker, f"bentofile only: {sorted(bento - docker)}; Dockerfile only: {sorted(docker - bento)}"

    local = {"models", "store", "engines", "service"}
    files = {p for pattern in spec["include"] if pattern.endswith(".py") for p in ROOT.glob(pattern)}
    imported = set().union(*(_imports_needed(p) for p in files if str(p.relative_to(ROOT)) not in NOT_SERVED))
    third_party = imported - local - set(sys.stdlib_module_names) - {"__future__"}
    dists = metadata.packages_distributions()
    installed = _requirement_closure(bento)
    missing = {}
    for module in sorted(third_party):
        names = {re.sub(r"[-_.]+", "-", d).lower() for d in dists.get(module, [module])}
        if not names & installed:
            missing[module] = sorted(names)
    assert not missing, f"imported by the served code but installed by neither file: {missing}"
