"""Role certificates are renewed before they expire, by a node at start, by `portcullis
cert renew`, and a running node serves the renewed one; `portcullis cert status` and the
log warn about a certificate close to its end."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import re
import signal
import ssl
import time

import pytest
from cryptography import x509

from conftest import Deployment, run_cli
from portcullis import node as node_module
from portcullis.pki import load_pair
from portcullis.pki.renewal import renew_role

NEAR_END = dt.timedelta(days=346)   # issued this long ago, a certificate has 19 days left


def served_certificate(deployment: Deployment) -> x509.Certificate:
    pem = ssl.get_server_certificate(("127.0.0.1", deployment.port), timeout=10)
    return x509.load_pem_x509_certificate(pem.encode())


def file_certificate(deployment: Deployment, role: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(
        (deployment.directory / "pki" / f"{role}.crt").read_bytes())


def age_role_certificate(deployment: Deployment, role: str) -> None:
    """Make `role`'s certificate one issued NEAR_END ago, with the same names."""
    pki = deployment.directory / "pki"
    renew_role(pki, role, load_pair(pki / "ca.crt", pki / "ca.key"),
               now=dt.datetime.now(dt.UTC) - NEAR_END)


def test_cert_status_warns_of_a_certificate_within_30_days_of_its_end(
        deployment: Deployment) -> None:
    fresh = run_cli("cert", "status", "--dir", str(deployment.directory))
    assert fresh.returncode == 0, fresh.stdout + fresh.stderr
    assert re.search(r"^gateway .* \(36[45] days\)  ok$", fresh.stdout, re.M), fresh.stdout
    age_role_certificate(deployment, "sta")
    aged = run_cli("cert", "status", "--dir", str(deployment.directory))
    assert aged.returncode == 1
    assert re.search(r"^sta .* expires in 1[89] days, on \d{4}-\d\d-\d\d$", aged.stdout, re.M)
    assert re.search(r"^ca .*  ok$", aged.stdout, re.M), aged.stdout


def test_a_node_renews_a_due_certificate_at_start_and_serves_the_new_one(
        deployment: Deployment, start_process) -> None:  # type: ignore[no-untyped-def]
    age_role_certificate(deployment, "gateway")
    old = file_certificate(deployment, "gateway")
    node = start_process("up", "--dir", str(deployment.directory), name="up")
    node.wait_for(r"Portal: ")
    assert re.search(r"certificate renewed .*certificate=gateway", node.output())
    served = served_certificate(deployment)
    assert served.serial_number != old.serial_number
    assert served.not_valid_after_utc - dt.datetime.now(dt.UTC) > dt.timedelta(days=364)
    assert served.subject == old.subject
    assert "needs attention" not in node.output()
    assert run_cli("cert", "status", "--dir", str(deployment.directory)).returncode == 0


def test_without_the_ca_key_a_node_warns_and_serves_what_it_has(
        deployment: Deployment, start_process) -> None:  # type: ignore[no-untyped-def]
    age_role_certificate(deployment, "gateway")
    pki = deployment.directory / "pki"
    (pki / "ca.key").rename(deployment.directory / "ca.key.offline")
    node = start_process("up", "--dir", str(deployment.directory), name="up")
    node.wait_for(r"Portal: ")
    output = node.output()
    assert re.search(r"certificate not renewed .*certificate=gateway", output), output
    assert re.search(r"certificate needs attention .*certificate=gateway.*"
                     r"expires in 1[89] days", output), output
    assert served_certificate(deployment) == file_certificate(deployment, "gateway")


def test_a_running_node_serves_a_certificate_renewed_by_the_cli_after_sighup(
        deployment: Deployment, start_process) -> None:  # type: ignore[no-untyped-def]
    node = start_process("up", "--dir", str(deployment.directory), name="up")
    node.wait_for(r"Portal: ")
    before = served_certificate(deployment)
    renewed = run_cli("cert", "renew", "--all", "--dir", str(deployment.directory))
    assert renewed.returncode == 0, renewed.stderr
    assert renewed.stdout.count("renewed ") == 5   # gateway, portal, sta, relay, shadow-hub
    assert served_certificate(deployment) == before     # loaded at the next check only
    node.popen.send_signal(signal.SIGHUP)
    node.wait_for(r"certificate reloaded .*certificate=gateway")
    after = served_certificate(deployment)
    assert after == file_certificate(deployment, "gateway")
    assert after.serial_number != before.serial_number


def test_cert_issue_refuses_a_client_certificate_longer_than_366_days(
        deployment: Deployment) -> None:
    out = deployment.directory / "issued"
    result = run_cli("cert", "issue", "laptop", "--out", str(out), "--days", "400",
                     "--dir", str(deployment.directory))
    assert result.returncode == 1
    assert "at most 366 days" in result.stderr
    assert not out.exists()


async def test_a_running_node_renews_a_certificate_that_falls_due_at_its_periodic_check(
        deployment: Deployment, monkeypatch: pytest.MonkeyPatch) -> None:
    """The daily check, run every 0.2 s here: it renews and serves, with no restart."""
    from portcullis.config import config_path, load_settings
    from portcullis.node import Node

    monkeypatch.setattr(node_module, "CERTIFICATE_CHECK_SECONDS", 0.2)
    node = await Node.build(load_settings(config_path(deployment.directory)),
                            ["gateway", "portal", "sta"])
    ready = asyncio.Event()
    serving = asyncio.ensure_future(node.serve(lambda _: ready.set()))
    try:
        await asyncio.wait_for(ready.wait(), 30)
        first = file_certificate(deployment, "gateway")
        age_role_certificate(deployment, "gateway")     # 19 days left: due
        aged = file_certificate(deployment, "gateway")
        deadline = time.monotonic() + 20
        while True:
            served = await asyncio.to_thread(served_certificate, deployment)
            if served.serial_number not in (first.serial_number, aged.serial_number):
                break
            assert time.monotonic() < deadline, "the running node did not renew"
            await asyncio.sleep(0.1)
        assert served == file_certificate(deployment, "gateway")
        assert served.not_valid_after_utc - dt.datetime.now(dt.UTC) > dt.timedelta(days=364)
    finally:
        serving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await serving
