"""The README's quick start and the operational switches a newcomer meets first."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import httpx

from conftest import Deployment, free_port_run, require_program

REPO = Path(__file__).resolve().parents[2]


def test_make_run_initialises_a_deployment_and_serves_the_portal(
        tmp_path: Path, start_process) -> None:  # type: ignore[no-untyped-def]
    """`make run` on a copy of the repository, reusing this environment's virtualenv
    (the install step itself is what CI's `make test` exercises on a fresh clone)."""
    make = require_program("make")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    shutil.copy(REPO / "Makefile", clone / "Makefile")  # the working tree's, committed or not
    venv = Path(sys.executable).parent.parent
    port = free_port_run(3)
    # -o: never reinstall into this environment's virtualenv from the clone.
    process = start_process("-C", str(clone), "run", f"VENV={venv}", f"PORT={port}",
                            "-o", f"{venv}/bin/.installed", program=make, name="make-run")
    process.wait_for(r"Portal: https://", timeout=60)
    assert "password: " in process.output()
    ca = clone / ".portcullis" / "pki" / "ca.crt"
    health = httpx.get(f"https://127.0.0.1:{port}/api/v1/health", verify=_tls(ca))
    assert health.status_code == 200
    login_page = httpx.get(f"https://127.0.0.1:{port}/login", verify=_tls(ca))
    assert "Sign in" in login_page.text


def _tls(ca: Path):  # type: ignore[no-untyped-def]
    import ssl

    return ssl.create_default_context(cafile=str(ca))


def test_json_log_format_writes_one_json_object_per_line(deployment: Deployment,
                                                         start_process) -> None:  # type: ignore[no-untyped-def]
    deployment.set("log", "format", '"json"')
    process = start_process("up", "--dir", str(deployment.directory), name="json-up")
    process.wait_for(r"Portal: https://")
    httpx.post(f"{deployment.url}/api/v1/login", verify=_tls(deployment.ca),
               json={"answers": {"username": "admin", "password": "wrong"}})
    process.wait_for(r'"event": ?"login.failed"')
    records = [json.loads(line) for line in process.output().splitlines()
               if line.startswith("{")]
    failed = [record for record in records if record.get("event") == "login.failed"]
    assert failed and failed[0]["user"] == "admin" and failed[0]["reason"] == "wrong password"
