"""The light client as a user gets it: the `portcullis_client` wheel built from
client-dist/ and `pip install`ed into a fresh virtual environment (its dependencies from
the configured index), once per test session."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_installed: dict[str, Path] = {}


def installed_client(factory: pytest.TempPathFactory) -> Path:
    """The fresh venv holding the installed light client (built on first use)."""
    if "venv" not in _installed:
        base = factory.mktemp("light-client")
        wheels = base / "wheels"
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                        "--wheel-dir", str(wheels), str(ROOT / "client-dist")],
                       check=True, timeout=300)
        venv = base / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
        wheel = next(wheels.glob("portcullis_client-*.whl"))
        subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet",
                        "--disable-pip-version-check", str(wheel)], check=True, timeout=300)
        _installed["venv"] = venv
    return _installed["venv"]
