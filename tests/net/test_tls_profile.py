"""The TLS contexts of every listener and client follow Mozilla's intermediate profile,
checked against a real peer: OpenSSL's own s_client and s_server."""

from __future__ import annotations

import re
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import free_port, require_program
from portcullis.errors import PKIError
from portcullis.net.tls import MOZILLA_INTERMEDIATE_GROUPS, client_context, server_context
from portcullis.net.tls_groups import restrict_groups
from portcullis.pki import create_ca, issue_certificate, write_pair

ACCEPTED = ["X25519", "P-256", "P-384"]
REFUSED = ["X448", "P-521", "ffdhe2048"]


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    ca = create_ca()
    write_pair(tmp_path, "ca", ca)
    cert, key = write_pair(tmp_path, "server", issue_certificate(
        ca, "server", dns_names=["localhost"], ip_addresses=["127.0.0.1"]))
    return {"ca": tmp_path / "ca.crt", "cert": cert, "key": key}


@pytest.fixture
def tls_server(pki: dict[str, Path]) -> Iterator[int]:
    """A TLS server on our server context that greets every client, one at a time."""
    context = server_context(pki["cert"], pki["key"])
    listener = socket.create_server(("127.0.0.1", 0))
    stopping = threading.Event()

    def serve() -> None:
        while not stopping.is_set():
            try:
                raw, _ = listener.accept()
            except OSError:
                return
            raw.settimeout(5)
            try:
                with context.wrap_socket(raw, server_side=True) as conn:
                    conn.sendall(b"hello\n")
                    conn.unwrap()
            except (OSError, ssl.SSLError):
                raw.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stopping.set()
    listener.shutdown(socket.SHUT_RDWR)   # wakes the accept() of the thread
    listener.close()
    thread.join(5)


def s_client(port: int, ca: Path, *args: str) -> subprocess.CompletedProcess[str]:
    openssl = require_program("openssl")
    return subprocess.run([openssl, "s_client", "-connect", f"127.0.0.1:{port}",
                           "-CAfile", str(ca), "-verify_return_error", *args],
                          input="", capture_output=True, text=True, timeout=20)


def negotiated_group(output: str) -> str | None:
    """The group s_client reports ("Server Temp Key: ECDH, prime256v1, 256 bits")."""
    match = re.search(r"Server Temp Key: (?:ECDH, )?([\w-]+)", output)
    names = {"prime256v1": "P-256", "secp384r1": "P-384"}
    return names.get(match.group(1), match.group(1)) if match else None


@pytest.mark.parametrize("group", ACCEPTED)
def test_a_tls13_listener_accepts_a_client_offering_only_a_profile_group(
        pki: dict[str, Path], tls_server: int, group: str) -> None:
    result = s_client(tls_server, pki["ca"], "-tls1_3", "-groups", group)
    assert result.returncode == 0, result.stdout + result.stderr
    assert negotiated_group(result.stdout) == group, result.stdout


@pytest.mark.parametrize("group", REFUSED)
def test_a_tls13_listener_refuses_a_client_offering_only_another_group(
        pki: dict[str, Path], tls_server: int, group: str) -> None:
    result = s_client(tls_server, pki["ca"], "-tls1_3", "-groups", group)
    assert result.returncode != 0
    assert negotiated_group(result.stdout) is None
    assert "handshake failure" in result.stderr, result.stderr


# In TLS 1.2 a client must also offer the curve of the server's ECDSA key (P-256) to
# use it at all (RFC 8422), so these clients offer a group first and P-256 second.
@pytest.mark.parametrize("group", ACCEPTED)
def test_a_tls12_listener_takes_the_clients_first_group_when_the_profile_has_it(
        pki: dict[str, Path], tls_server: int, group: str) -> None:
    offered = ":".join(dict.fromkeys([group, "P-256"]))
    result = s_client(tls_server, pki["ca"], "-tls1_2", "-groups", offered)
    assert result.returncode == 0, result.stdout + result.stderr
    assert negotiated_group(result.stdout) == group, result.stdout


@pytest.mark.parametrize("group", REFUSED)
def test_a_tls12_listener_passes_over_a_group_outside_the_profile(
        pki: dict[str, Path], tls_server: int, group: str) -> None:
    result = s_client(tls_server, pki["ca"], "-tls1_2", "-groups", f"{group}:P-256")
    assert result.returncode == 0, result.stdout + result.stderr
    assert negotiated_group(result.stdout) == "P-256", result.stdout


@pytest.fixture
def s_server(pki: dict[str, Path], request: pytest.FixtureRequest) -> Iterator[int]:
    """OpenSSL's s_server offering only the group the test names."""
    openssl = require_program("openssl")
    port = free_port()
    process = subprocess.Popen(
        [openssl, "s_server", "-accept", f"127.0.0.1:{port}", "-cert", str(pki["cert"]),
         "-key", str(pki["key"]), "-groups", request.param, "-quiet"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert time.monotonic() < deadline and process.poll() is None, "no s_server"
            time.sleep(0.05)
    yield port
    process.kill()
    process.wait(5)


def _connect(context: ssl.SSLContext, port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as conn:
        return str(conn.version())


@pytest.mark.parametrize("s_server", ACCEPTED, indirect=True)
def test_our_client_connects_to_a_server_that_offers_only_a_profile_group(
        pki: dict[str, Path], s_server: int) -> None:
    assert _connect(client_context(pki["ca"]), s_server) == "TLSv1.3"


@pytest.mark.parametrize("s_server", ["X448", "P-521"], indirect=True)
def test_our_client_refuses_a_server_that_offers_only_another_group(
        pki: dict[str, Path], s_server: int) -> None:
    with pytest.raises(ssl.SSLError):
        _connect(client_context(pki["ca"]), s_server)


def test_the_profile_groups_are_x25519_p256_and_p384() -> None:
    assert MOZILLA_INTERMEDIATE_GROUPS == ("X25519", "P-256", "P-384")


def test_a_group_openssl_does_not_know_is_an_error_not_a_silent_default() -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    with pytest.raises(PKIError, match="refused the TLS groups"):
        restrict_groups(context, ["no-such-group"])
