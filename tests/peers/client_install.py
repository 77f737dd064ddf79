"""The light client as users get it, built once per test session: the
`portcullis_client` wheel from client-dist/ `pip install`ed into a fresh virtual
environment (its dependencies from the configured index), and the single file
`portcullis-client.pyz` with an interpreter that has nothing installed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_built: dict[str, Path] = {}


def client_wheels(factory: pytest.TempPathFactory) -> Path:
    """A directory holding the built portcullis_client wheel."""
    if "wheels" not in _built:
        wheels = factory.mktemp("light-client") / "wheels"
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                        "--wheel-dir", str(wheels), str(ROOT / "client-dist")],
                       check=True, timeout=300)
        _built["wheels"] = wheels
    return _built["wheels"]


def installed_client(factory: pytest.TempPathFactory) -> Path:
    """The fresh venv holding the installed light client."""
    if "venv" not in _built:
        wheels = client_wheels(factory)
        venv = wheels.parent / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
        wheel = next(wheels.glob("portcullis_client-*.whl"))
        subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet",
                        "--disable-pip-version-check", str(wheel)], check=True, timeout=300)
        _built["venv"] = venv
    return _built["venv"]


def single_file_client(factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(a Python with no package installed, not even pip; portcullis-client.pyz)."""
    if "pyz" not in _built:
        wheels = client_wheels(factory)
        subprocess.run([sys.executable, str(ROOT / "scripts/build_client_pyz.py"),
                        str(wheels)], check=True, capture_output=True, timeout=300)
        bare = wheels.parent / "bare"
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True,
                       timeout=120)
        _built["python"], _built["pyz"] = bare / "bin" / "python", wheels / "portcullis-client.pyz"
    return _built["python"], _built["pyz"]
