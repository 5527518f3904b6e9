"""The repository keeps the promises a newcomer relies on: docs that name what exists, links that
resolve, a README that stays a guide, modules of one screen-sized job, and comments without history."""
from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("models", "training", "store", "engines", "service", "loadtest", "cli")
MAX_MODULE_LINES = 500
MAX_README_LINES = 250
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md"), ROOT / "benchmarks" / "RESULTS.md"])
# Dates, the hosts things were measured on, and references to issues or sessions: history that
# belongs in commit messages and benchmarks/, not in code or configuration.
HISTORY = re.compile(r"\b20\d\d-[01]\d-[0-3]\d\b|\b(Xeon|EPYC|H100|H200)\b|\bissue #?\d+|\bFACTS\.md\b|\bsession \d+",
                     re.IGNORECASE)


def package_files(*suffixes: str) -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*") if p.suffix in suffixes
                  and "__pycache__" not in p.parts)


def comments_and_docstrings(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every comment and docstring of a Python file, or of every comment of a YAML file."""
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        return [(i, line.split("#", 1)[1]) for i, line in enumerate(text.splitlines(), 1) if "#" in line]
    found = [(t.start[0], t.string) for t in tokenize.generate_tokens(io.StringIO(text).readline)
             if t.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                found.append((getattr(node, "lineno", 1), doc))
    return found


def test_no_comment_in_package_code_or_configuration_carries_history():
    offending = [f"{p.relative_to(ROOT)}:{line}: {HISTORY.search(text).group(0)!r}"
                 for p in package_files(".py", ".yaml", ".yml") for line, text in comments_and_docstrings(p)
                 if HISTORY.search(text)]
    assert not offending, "history in comments (move it to a commit message or benchmarks/):\n" + "\n".join(offending)


def test_the_history_check_sees_a_dated_comment_and_a_dated_docstring(tmp_path):
    f = tmp_path / "m.py"
    f.write_text('"""Measured on the Xeon host."""\nx = 1  # since 2026-11-27\n')
    assert [bool(HISTORY.search(t)) for _, t in comments_and_docstrings(f)] == [True, True]


def test_no_package_module_is_longer_than_one_job():
    long = [f"{p.relative_to(ROOT)} ({n} lines)" for p in package_files(".py")
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES]
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_no_test_file_is_over_the_same_limit():
    long = [f"{p.relative_to(ROOT)}" for p in (ROOT / "tests").rglob("test_*.py")
            if len(p.read_text().splitlines()) > MAX_MODULE_LINES]
    assert not long


def test_the_readme_stays_a_users_guide():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= MAX_README_LINES
    for command in ("make serve", "make test"):
        assert command in readme


LINK = re.compile(r"\[[^\]]*\]\(([^)\s#]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_of_the_docs_resolves(doc):
    broken = [target for target in LINK.findall(doc.read_text())
              if "://" not in target and not target.startswith("mailto:")
              and not (doc.parent / target).exists()]
    assert not broken, f"{doc.relative_to(ROOT)} links to missing files: {broken}"


# `path/to/file.py` or `path/to/file.py:Name` or `path/to/file.py:Class.method` in backticks
NAMED = re.compile(r"`((?:[\w.-]+/)+[\w.-]+\.(?:py|ya?ml|md|toml|cfg))(?::([\w.]+))?`")


def defined_names(path: Path) -> set[str]:
    """Top-level functions and classes of a module, and Class.method for their methods."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            names |= {f"{node.name}.{n.name}" for n in node.body
                      if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


def test_the_architecture_walk_names_files_and_functions_that_exist():
    text = (ROOT / "docs" / "architecture.md").read_text()
    named = NAMED.findall(text)
    assert len(named) >= 10, "the walk names the files an image passes through"
    missing = []
    for path, name in named:
        p = ROOT / path
        if not p.exists():
            missing.append(path)
        elif name and name not in defined_names(p):
            missing.append(f"{path}:{name}")
    assert not missing, f"docs/architecture.md names what does not exist: {missing}"
