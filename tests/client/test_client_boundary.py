"""The light client is a package boundary: `portcullis.client` and the client's commands
import nothing of the server roles, the `portcullis-client` wheel holds every module they
import, and installing it pulls none of the server stack."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from peers.client_install import ROOT, installed_client, single_file_client

SRC = ROOT / "src"
# What the light client starts from: its commands, and all of portcullis.client.
ENTRY = "portcullis.cli.client"
SERVER_PACKAGES = ("gateway", "portal", "sta", "identity", "policy", "store", "pki", "relay",
                   "shadow", "idp", "federation", "web", "config", "node", "deployment",
                   "audit", "tokens")
# Distributions of the server stack; none may come with the light client.
SERVER_DISTRIBUTIONS = {"uvicorn", "starlette", "sqlalchemy", "aiosqlite", "asyncpg", "redis",
                        "argon2-cffi", "pydantic", "ldap3", "pyrad", "pysaml2", "authlib",
                        "joserfc", "cryptography", "jinja2", "python-multipart", "pyotp",
                        "segno", "psutil", "portcullis"}
# The light client's own dependencies (and uvloop, used where it is installed).
CLIENT_IMPORTS = {"click", "httpx", "websockets", "h11", "structlog", "uvloop"}


def _module_file(name: str) -> Path | None:
    path = SRC / name.replace(".", "/")
    for candidate in (path / "__init__.py", path.with_suffix(".py")):
        if candidate.exists():
            return candidate
    return None


def _imports(name: str) -> set[str]:
    """Every module `name` imports, at the top or inside a function (absolute names)."""
    file = _module_file(name)
    assert file is not None, name
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names
                         if _module_file(f"{base}.{alias.name}") is not None)
    return found


def import_closure(start: list[str]) -> tuple[set[str], set[str]]:
    """(our modules reachable from `start`, the top-level names of the others)."""
    ours: set[str] = set()
    others: set[str] = set()
    pending = list(start)
    while pending:
        name = pending.pop()
        if name in ours:
            continue
        ours.add(name)
        parts = name.split(".")
        parents = {".".join(parts[:i]) for i in range(1, len(parts))}
        for imported in _imports(name) | parents:
            if imported.split(".")[0] == "portcullis":
                pending.append(imported)
            elif imported != "__future__":
                others.add(imported.split(".")[0])
    return ours, others


def _client_modules() -> list[str]:
    return [f"portcullis.client.{path.stem}" for path in (SRC / "portcullis/client").glob("*.py")
            if path.stem != "__init__"]


def test_the_client_and_its_commands_import_no_server_role_package() -> None:
    ours, others = import_closure([ENTRY, *_client_modules()])
    crossing = sorted(name for name in ours
                      if name.split(".")[1:2] and name.split(".")[1] in SERVER_PACKAGES)
    assert crossing == []
    third_party = {name for name in others if name not in sys.stdlib_module_names}
    assert third_party <= CLIENT_IMPORTS, third_party - CLIENT_IMPORTS


def test_the_client_wheel_lists_every_module_the_client_imports() -> None:
    ours, _ = import_closure([ENTRY, *_client_modules()])
    project = tomllib.loads((ROOT / "client-dist/pyproject.toml").read_text())
    listed = set(project["tool"]["setuptools"]["py-modules"])
    modules = {name for name in ours if _module_file(name).name != "__init__.py"}  # type: ignore[union-attr]
    assert modules == listed
    assert project["project"]["scripts"]["portcullis-client"] == f"{ENTRY}:main"


def test_pip_installs_the_client_wheel_without_the_server_stack(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    venv = installed_client(tmp_path_factory)
    listed = subprocess.run([str(venv / "bin/pip"), "list", "--format=json",
                             "--disable-pip-version-check"],
                            capture_output=True, text=True, check=True, timeout=60)
    installed = {item["name"].lower().replace("_", "-") for item in json.loads(listed.stdout)}
    assert "portcullis-client" in installed
    assert installed & SERVER_DISTRIBUTIONS == set()
    helped = subprocess.run([str(venv / "bin/portcullis-client"), "--help"],
                            capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0, helped.stderr
    for command in ("login", "resources", "launch", "open", "register", "connect"):
        assert f"  {command} " in helped.stdout
    assert "serve" not in helped.stdout and "user " not in helped.stdout


def test_the_single_file_client_starts_with_nothing_installed(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    python, pyz = single_file_client(tmp_path_factory)
    bare = subprocess.run([str(python), "-c", "import click"], capture_output=True, timeout=60)
    assert bare.returncode != 0   # every module comes from the archive or the stdlib
    helped = subprocess.run([str(python), str(pyz), "open", "--help"], capture_output=True,
                            text=True, timeout=60)
    assert helped.returncode == 0, helped.stderr
    assert "portcullis://" in helped.stdout
