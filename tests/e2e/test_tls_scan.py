"""Every listener of a deployment (gateway, STA, and the portal on its own) holds to
Mozilla's intermediate TLS profile, as a TLS scanner (testssl.sh) and OpenSSL's s_client
see it from outside."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import Deployment, require_program
from portcullis.net.tls import MOZILLA_INTERMEDIATE_CIPHERS

pytestmark = pytest.mark.peer

TLS13_SUITES = {"TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384",
                "TLS_CHACHA20_POLY1305_SHA256"}
PROFILE_CURVES = {"X25519", "prime256v1", "secp384r1"}


@pytest.fixture
def listeners(deployment: Deployment, start_process) -> Iterator[dict[str, int]]:  # type: ignore[no-untyped-def]
    """`portcullis up` (gateway and STA) and `portcullis serve portal` (the portal's own
    listener, which only a portal without the gateway in its process has)."""
    start_process("up", "--dir", str(deployment.directory), name="up").wait_for(r"Portal: ")
    start_process("serve", "portal", "--dir", str(deployment.directory),
                  name="portal").wait_for(r"portal listening on")
    yield {"gateway": deployment.port, "portal": deployment.port + 1,
           "sta": deployment.port + 2}


def s_client(deployment: Deployment, port: int, *args: str) -> subprocess.CompletedProcess[str]:
    pki = deployment.directory / "pki"
    # The STA and the lone portal ask for a role's client certificate: present one.
    return subprocess.run(
        [require_program("openssl"), "s_client", "-connect", f"127.0.0.1:{port}",
         "-CAfile", str(pki / "ca.crt"), "-verify_return_error",
         "-cert", str(pki / "gateway.crt"), "-key", str(pki / "gateway.key"), *args],
        input="", capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("role", ["gateway", "portal", "sta"])
def test_every_listener_takes_only_x25519_p256_and_p384_for_the_key_exchange(
        deployment: Deployment, listeners: dict[str, int], role: str) -> None:
    port = listeners[role]
    for group, reported in (("X25519", "X25519"), ("P-256", "prime256v1"),
                            ("P-384", "secp384r1")):
        result = s_client(deployment, port, "-tls1_3", "-groups", group)
        assert f"Server Temp Key: {reported}" in result.stdout.replace("ECDH, ", ""), (
            role, group, result.stdout[-2000:], result.stderr)
    for group in ("X448", "P-521"):
        result = s_client(deployment, port, "-groups", group)
        assert result.returncode != 0, (role, group, result.stdout)
        # No key exchange, no cipher: the handshake ended (asyncio closes without
        # sending the alert, so s_client sees the connection end).
        assert "Server Temp Key" not in result.stdout
        assert "Cipher is (NONE)" in result.stdout, (role, group, result.stdout)


def test_the_scanner_reports_the_intermediate_profile_on_every_listener(
        deployment: Deployment, listeners: dict[str, int], tmp_path: Path) -> None:
    testssl = require_program("testssl")
    scans = {}
    for role, port in listeners.items():
        report = tmp_path / f"testssl-{role}.json"
        command = [testssl, "--quiet", "--color", "0", "--warnings", "off",
                   "--jsonfile", str(report), "--protocols", "--pfs", "--cipher-per-proto",
                   "--server-defaults", f"127.0.0.1:{port}"]
        # Its own process group: testssl.sh runs openssl children of its own.
        scans[role] = (report, subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                                stderr=subprocess.DEVNULL,
                                                start_new_session=True))
    started = time.monotonic()
    try:
        for _, process in scans.values():
            process.wait(300)
    finally:
        for _, process in scans.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
    print(f"testssl.sh scanned {len(scans)} listeners in {time.monotonic() - started:.0f} s")
    for role, (report, _) in scans.items():
        findings = {entry["id"]: entry["finding"] for entry in json.loads(report.read_text())}
        print(role, {key: findings.get(key) for key in
                     ("TLS1", "TLS1_1", "TLS1_2", "TLS1_3", "PFS_ECDHE_curves",
                      "cert_notBefore", "cert_notAfter")})
        for old in ("SSLv2", "SSLv3", "TLS1", "TLS1_1"):
            assert findings[old] == "not offered", (role, old, findings[old])
        assert findings["TLS1_2"] == "offered", role
        assert findings["TLS1_3"].startswith("offered"), role
        tls12 = {finding.split()[3] for key, finding in findings.items()
                 if key.startswith("cipher-tls1_2_")}
        tls13 = {finding.split()[3] for key, finding in findings.items()
                 if key.startswith("cipher-tls1_3_")}
        assert tls12 and tls12 <= set(MOZILLA_INTERMEDIATE_CIPHERS.split(":")), (role, tls12)
        assert tls13 and tls13 <= TLS13_SUITES, (role, tls13)
        assert not [key for key in findings
                    if key.startswith(("cipher-tls1_x", "cipher-tls1_1_", "cipher-ssl"))], role
        assert set(findings["PFS_ECDHE_curves"].split()) == PROFILE_CURVES, role
        not_before, not_after = (dt.datetime.strptime(findings[key], "%Y-%m-%d %H:%M")
                                 for key in ("cert_notBefore", "cert_notAfter"))
        assert not_after - not_before <= dt.timedelta(days=366), role
