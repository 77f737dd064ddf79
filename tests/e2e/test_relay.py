"""The relay's classic mode, end to end: `portcullis serve relay` as a real subprocess on
loopback, reached by curl through a real stunnel client, by a small test client (SOCKS5
bytes by hand, datagrams framed with proto/streamdatagrams.py) for UDP in stream to a
real dnsmasq and ICMP echo, and by hostile clients. Every refusal is an audit line at
the relay."""

from __future__ import annotations

import datetime as dt
import json
import re
import resource
import socket
import ssl
import struct
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import (
    Deployment,
    Process,
    free_port,
    require_program,
    run_cli,
)
from peers.servers import DnsServer, HttpServer
from portcullis.net.tls import client_context
from portcullis.pki import create_ca, issue_certificate, load_pair, write_pair
from portcullis.proto.streamdatagrams import StreamDatagrams, frame_datagram

GREETING = b"\x05\x01\x00"
HANDSHAKE_TIMEOUT = 3.0


@dataclass
class Relay:
    deployment: Deployment
    process: Process
    port: int
    health_port: int

    @property
    def pki(self) -> Path:
        return self.deployment.directory / "pki"

    def audit(self) -> list[dict[str, object]]:
        path = self.deployment.directory / "audit.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines()]

    def wait_for_audit(self, event: str, timeout: float = 15, **fields: object
                       ) -> dict[str, object]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for entry in self.audit():
                if entry["event"] == event and all(
                        str(value) in str(entry.get(key)) for key, value in fields.items()):
                    return entry
            time.sleep(0.05)
        raise AssertionError(f"no {event} {fields} in the relay's audit trail:\n"
                             + "\n".join(json.dumps(e) for e in self.audit()))

    def tls(self, role: str = "gateway", cert: Path | None = None,
            key: Path | None = None) -> ssl.SSLSocket:
        """A TLS connection presenting `role`'s certificate (or cert/key)."""
        context = client_context(self.pki / "ca.crt",
                                 cert_file=cert or self.pki / f"{role}.crt",
                                 key_file=key or self.pki / f"{role}.key")
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        return context.wrap_socket(raw, server_hostname="127.0.0.1")

    def socks(self, request: bytes, *, cert: Path | None = None,
              key: Path | None = None) -> tuple[ssl.SSLSocket, bytes]:
        """Greeting + `request` over TLS: (the connection, the SOCKS reply)."""
        conn = self.tls(cert=cert, key=key)
        conn.sendall(GREETING + request)
        assert read_exactly(conn, 2) == b"\x05\x00"
        return conn, read_reply(conn)


def read_exactly(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise EOFError(f"closed after {data!r}")
        data += chunk
    return data


def read_reply(conn: socket.socket) -> bytes:
    head = read_exactly(conn, 4)
    size = {1: 4, 4: 16}[head[3]]
    return head + read_exactly(conn, size + 2)


def connect_request(host: str, port: int, command: int = 1) -> bytes:
    try:
        address = (b"\x04" + socket.inet_pton(socket.AF_INET6, host) if ":" in host
                   else b"\x01" + socket.inet_aton(host))
    except OSError:
        name = host.encode()
        address = b"\x03" + bytes([len(name)]) + name
    return bytes([5, command, 0]) + address + struct.pack("!H", port)


def closed_by_relay(conn: socket.socket, timeout: float = 20) -> bool:
    """True when the relay ends the connection (EOF, reset or TLS alert) in time."""
    conn.settimeout(timeout)
    try:
        while conn.recv(4096):
            pass
    except (ssl.SSLError, ConnectionError):
        return True
    except TimeoutError:
        return False
    return True


@pytest.fixture
def relay_config(http_server: HttpServer) -> Iterator[dict[str, object]]:
    config: dict[str, object] = {
        "port": free_port(), "health_port": free_port(),
        "allow": [f"127.0.0.1/32:{http_server.port}",
                  "localhost:8", "0.0.0.0/0:9"],
        "limits": {}}
    yield config


def start_relay(deployment: Deployment, start_process, config: dict[str, object]  # type: ignore[no-untyped-def]
                ) -> Relay:
    allow = json.dumps(config["allow"])
    limits = "".join(f"{key} = {value}\n" for key, value in
                     dict(config["limits"]).items())  # type: ignore[call-overload]
    with deployment.config.open("a") as handle:
        handle.write(f'\n[relay]\nlisten = "127.0.0.1:{config["port"]}"\n'
                     f'health_listen = "127.0.0.1:{config["health_port"]}"\n'
                     f"allow = {allow}\n"
                     f"handshake_timeout = {config.get('handshake_timeout', HANDSHAKE_TIMEOUT)}\n")
    if limits:
        deployment.set("limits", "max_connections", str(dict(config["limits"])  # type: ignore[call-overload]
                                                         ["max_connections"]))
    process = start_process("serve", "relay", "--dir", str(deployment.directory),
                            name="relay")
    process.wait_for(r"Relay: listening on 127\.0\.0\.1:\d+")
    process.wait_for(r"Relay health: http://")
    return Relay(deployment, process, int(config["port"]),  # type: ignore[call-overload]
                 int(config["health_port"]))  # type: ignore[call-overload]


@pytest.fixture
def relay(deployment: Deployment, start_process, relay_config: dict[str, object]  # type: ignore[no-untyped-def]
          ) -> Relay:
    return start_relay(deployment, start_process, relay_config)


def stunnel_client(tmp_path: Path, start_process, relay: Relay,  # type: ignore[no-untyped-def]
                   cert: Path, key: Path) -> int:
    """A real stunnel client: plain SOCKS5 in on a free port, TLS to the relay out,
    presenting `cert` and verifying the relay's certificate against the deployment CA."""
    stunnel = require_program("stunnel4")
    port = free_port()
    conf = tmp_path / f"stunnel-{port}.conf"
    conf.write_text(
        f"foreground = yes\npid =\ndebug = 5\n[relay]\nclient = yes\n"
        f"accept = 127.0.0.1:{port}\nconnect = 127.0.0.1:{relay.port}\n"
        f"cert = {cert}\nkey = {key}\nCAfile = {relay.pki / 'ca.crt'}\n"
        f"verifyChain = yes\ncheckIP = 127.0.0.1\n")
    start_process(str(conf), name="stunnel", program=stunnel).wait_listening(port)
    return port


def curl_through(socks_port: int, url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_program("curl"), "-sS", "--max-time", "15",
                           "--socks5-hostname", f"127.0.0.1:{socks_port}", url],
                          capture_output=True, text=True, timeout=30)


def serves_a_real_request(relay: Relay, http_server: HttpServer) -> bool:
    conn, reply = relay.socks(connect_request("127.0.0.1", http_server.port))
    with conn:
        if reply[1] != 0:
            return False
        conn.sendall(b"GET /index.html HTTP/1.0\r\nHost: intranet\r\n\r\n")
        body = b""
        while chunk := conn.recv(65536):
            body += chunk
    return b"intranet home" in body


# -- interop -----------------------------------------------------------------------------

def test_curl_through_an_stunnel_client_fetches_a_page_intact_through_the_relay(
        tmp_path: Path, start_process, relay: Relay,  # type: ignore[no-untyped-def]
        http_server: HttpServer) -> None:
    socks_port = stunnel_client(tmp_path, start_process, relay,
                                relay.pki / "gateway.crt", relay.pki / "gateway.key")
    result = curl_through(socks_port, f"http://127.0.0.1:{http_server.port}/index.html")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "<h1>intranet home</h1>\n"
    line = relay.wait_for_audit("relay.stream", destination=f"127.0.0.1:{http_server.port}")
    assert line["edge"] == "portcullis-gateway@127.0.0.1"
    assert line["address"] == "127.0.0.1"
    assert int(line["bytes_to_edge"]) > len("<h1>intranet home</h1>\n")  # type: ignore[call-overload]
    assert int(line["bytes_from_edge"]) > 0  # type: ignore[call-overload]


def test_curl_asking_for_a_name_entry_that_resolves_to_the_relays_loopback_is_refused(
        tmp_path: Path, start_process, relay: Relay,  # type: ignore[no-untyped-def]
        http_server: HttpServer) -> None:
    socks_port = stunnel_client(tmp_path, start_process, relay,
                                relay.pki / "gateway.crt", relay.pki / "gateway.key")
    # "localhost:8" is allowed by name, and localhost is the relay host's own loopback:
    # a NAME entry never opens it (no network entry names 127.0.0.1 on port 8).
    result = curl_through(socks_port, "http://localhost:8/")
    assert result.returncode != 0
    assert "Can't complete SOCKS5 connection to localhost. (2)" in result.stderr  # 02
    line = relay.wait_for_audit("relay.refused", destination="localhost:8/tcp")
    assert "the relay host's loopback" in str(line["reason"])


# -- refusals ---------------------------------------------------------------------------

def other_certificates(tmp_path: Path, relay: Relay) -> dict[str, tuple[Path, Path]]:
    ca = load_pair(relay.pki / "ca.crt", relay.pki / "ca.key")
    out = tmp_path / "certs"
    made = {
        "another CA": write_pair(out, "other-ca", issue_certificate(
            create_ca("Another CA"), "portcullis-gateway")),
        "expired": write_pair(out, "expired", issue_certificate(
            ca, "portcullis-gateway", valid_days=1,
            now=dt.datetime.now(dt.UTC) - dt.timedelta(days=30))),
        "the STA's": (relay.pki / "sta.crt", relay.pki / "sta.key"),
    }
    result = run_cli("cert", "issue", "alice", "--out", str(out), "--dir",
                     str(relay.deployment.directory))
    assert result.returncode == 0, result.stderr
    made["a user's"] = (out / "alice.crt", out / "alice.key")
    return made


@pytest.mark.parametrize(("which", "detail"), [
    ("another CA", "unable to get local issuer certificate"),
    ("expired", "certificate has expired"),
    ("a user's", "'alice'"),
    ("the STA's", "'portcullis-sta'"),
])
def test_a_certificate_that_is_not_the_gateways_is_refused_audited_and_never_served(
        tmp_path: Path, relay: Relay, http_server: HttpServer, which: str,
        detail: str) -> None:
    cert, key = other_certificates(tmp_path, relay)[which]
    served = b""
    try:
        conn = relay.tls(cert=cert, key=key)
        conn.sendall(GREETING + connect_request("127.0.0.1", http_server.port))
        conn.settimeout(10)
        while chunk := conn.recv(100):
            served += chunk
    except (ssl.SSLError, ConnectionError):
        pass
    assert served == b""   # not even the SOCKS method selection
    line = relay.wait_for_audit("relay.edge_refused", reason="certificate", detail=detail)
    assert line["reason"] == "certificate"
    assert serves_a_real_request(relay, http_server)


def test_a_client_without_a_certificate_is_refused_at_the_handshake_and_audited(
        relay: Relay, http_server: HttpServer) -> None:
    context = client_context(relay.pki / "ca.crt")
    served = b""
    try:
        with context.wrap_socket(socket.create_connection(("127.0.0.1", relay.port),
                                                          timeout=10),
                                 server_hostname="127.0.0.1") as conn:
            conn.sendall(GREETING)
            while chunk := conn.recv(100):
                served += chunk
    except (ssl.SSLError, ConnectionError):
        pass
    assert served == b""
    relay.wait_for_audit("relay.edge_refused", reason="certificate",
                         detail="presented no certificate")
    assert serves_a_real_request(relay, http_server)


def test_stunnel_with_a_users_certificate_gets_a_clear_error_from_curl(
        tmp_path: Path, start_process, relay: Relay,  # type: ignore[no-untyped-def]
        http_server: HttpServer) -> None:
    cert, key = other_certificates(tmp_path, relay)["a user's"]
    socks_port = stunnel_client(tmp_path, start_process, relay, cert, key)
    result = curl_through(socks_port, f"http://127.0.0.1:{http_server.port}/index.html")
    assert result.returncode != 0
    assert "intranet home" not in result.stdout
    relay.wait_for_audit("relay.edge_refused", detail="'alice'")


@pytest.mark.parametrize(("host", "port_of", "why"), [
    ("127.0.0.1", "other", "no relay.allow entry covers it"),
    ("192.0.2.1", "http", "no relay.allow entry covers it"),
    ("127.0.0.1", "nine", "'0.0.0.0/0:9' is wider"),
    ("localhost", "eight", "the relay host's loopback"),
    ("intranet.example", "http", "no relay.allow entry names it"),
])
def test_a_destination_the_allow_list_does_not_open_is_answered_02_and_audited(
        relay: Relay, http_server: HttpServer, host: str, port_of: str, why: str) -> None:
    port = {"http": http_server.port, "eight": 8, "nine": 9, "other": 1}[port_of]
    conn, reply = relay.socks(connect_request(host, port))
    with conn:
        assert reply[1] == 0x02   # NOT_ALLOWED: the edge reads it as DENIED
        assert closed_by_relay(conn)
    line = relay.wait_for_audit("relay.refused", destination=f"{host}:{port}/tcp")
    assert why in str(line["reason"])
    assert serves_a_real_request(relay, http_server)


# -- bad input --------------------------------------------------------------------------

def test_garbage_instead_of_tls_is_closed_and_the_relay_keeps_serving(
        relay: Relay, http_server: HttpServer) -> None:
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as conn:
        conn.sendall(b"GET / HTTP/1.1\r\nHost: relay\r\n\r\n" + bytes(range(256)) * 4)
        assert closed_by_relay(conn)
    relay.wait_for_audit("relay.edge_refused", reason="tls")
    assert serves_a_real_request(relay, http_server)


def test_tls_then_garbage_is_closed_and_the_relay_keeps_serving(
        relay: Relay, http_server: HttpServer) -> None:
    with relay.tls() as conn:
        conn.sendall(b"\x16\x03\x01garbage, not SOCKS5")
        assert closed_by_relay(conn)
    relay.wait_for_audit("relay.edge_refused", reason="socks", detail="not 5")
    assert serves_a_real_request(relay, http_server)


def test_a_truncated_socks_request_is_closed_at_the_handshake_timeout(
        relay: Relay, http_server: HttpServer) -> None:
    with relay.tls() as conn:
        conn.sendall(GREETING + connect_request("127.0.0.1", http_server.port)[:6])
        assert read_exactly(conn, 2) == b"\x05\x00"
        assert closed_by_relay(conn, timeout=HANDSHAKE_TIMEOUT + 15)
    relay.wait_for_audit("relay.edge_refused", reason="socks_timeout")
    assert serves_a_real_request(relay, http_server)


def test_a_socks_domain_of_255_bytes_is_refused_and_the_relay_keeps_serving(
        relay: Relay, http_server: HttpServer) -> None:
    name = ".".join(["a" * 63] * 3 + ["b" * 63])   # 255 bytes, a valid host name
    assert len(name) == 255
    conn, reply = relay.socks(connect_request(name, 443))
    with conn:
        assert reply[1] == 0x02
        assert closed_by_relay(conn)
    relay.wait_for_audit("relay.refused", destination=f"{name}:443/tcp")
    assert serves_a_real_request(relay, http_server)


IDLE_CONNECTIONS = 10_000
# Long enough for every idle connection to be open at once on a slow machine (opening
# 10,000 takes about 25 s here), short enough to bound the test.
IDLE_TIMEOUT = 60.0


def test_ten_thousand_idle_tls_connections_are_closed_at_the_timeout_while_the_relay_serves(
        deployment: Deployment, start_process,  # type: ignore[no-untyped-def]
        relay_config: dict[str, object], http_server: HttpServer) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = IDLE_CONNECTIONS + 512
    assert hard == resource.RLIM_INFINITY or hard >= wanted, (
        f"the hard open files limit ({hard}) is below {wanted}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    relay_config["limits"] = {"max_connections": IDLE_CONNECTIONS + 100}
    relay_config["handshake_timeout"] = IDLE_TIMEOUT
    relay = start_relay(deployment, start_process, relay_config)
    try:
        idle = open_idle_connections(relay, http_server, IDLE_CONNECTIONS)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    print(f"{idle.opened} idle TLS connections opened, {idle.most_open} open at once; "
          f"a real request served meanwhile: {idle.served}; the relay closed {idle.closed}")
    assert idle.opened == IDLE_CONNECTIONS
    assert idle.served
    assert idle.closed == IDLE_CONNECTIONS
    assert serves_a_real_request(relay, http_server)
    refused = [e for e in relay.audit() if e["event"] == "relay.edge_refused"]
    assert len(refused) == IDLE_CONNECTIONS
    assert {e["reason"] for e in refused} == {"socks_timeout"}


@dataclass
class Idle:
    opened: int = 0        # TLS handshakes completed
    open_now: int = 0
    most_open: int = 0
    closed: int = 0        # ended by the relay (EOF or reset), not by us
    served: bool = False   # a real request went through while the idle ones were open


def open_idle_connections(relay: Relay, http_server: HttpServer, count: int) -> Idle:
    """Open `count` TLS connections to the relay with the gateway's certificate (asyncio:
    a pool of non-blocking sockets), each then saying nothing; once all are open, check
    that the relay serves a real request; then wait until the relay has closed every
    one of them at its timeout."""
    import asyncio

    idle = Idle()

    async def run() -> None:
        context = client_context(relay.pki / "ca.crt", cert_file=relay.pki / "gateway.crt",
                                 key_file=relay.pki / "gateway.key")
        gate = asyncio.Semaphore(256)
        all_open = asyncio.Event()

        async def one() -> None:
            async with gate:
                try:
                    reader, writer = await asyncio.open_connection(
                        "127.0.0.1", relay.port, ssl=context, server_hostname="127.0.0.1",
                        ssl_handshake_timeout=120)
                except (OSError, ssl.SSLError):
                    return   # refused during the handshake: counted as not opened
            idle.opened += 1
            idle.open_now += 1
            idle.most_open = max(idle.most_open, idle.open_now)
            if idle.opened == count:
                all_open.set()
            try:
                async with asyncio.timeout(IDLE_TIMEOUT + 120):
                    while await reader.read(4096):
                        pass
                idle.closed += 1
            except (OSError, ssl.SSLError):
                idle.closed += 1
            except TimeoutError:
                pass
            idle.open_now -= 1
            writer.transport.abort()

        tasks = [asyncio.ensure_future(one()) for _ in range(count)]
        async with asyncio.timeout(IDLE_TIMEOUT):
            await all_open.wait()
        idle.served = await asyncio.to_thread(serves_a_real_request, relay, http_server)
        await asyncio.gather(*tasks)

    asyncio.run(run())
    return idle


# -- UDP and ICMP echo in stream ----------------------------------------------------------

def test_udp_in_stream_carries_a_dns_query_to_dnsmasq_and_its_answer_back(
        deployment: Deployment, start_process,  # type: ignore[no-untyped-def]
        relay_config: dict[str, object], dns_server: DnsServer) -> None:
    relay_config["allow"] = [f"127.0.0.1/32:{dns_server.port}"]
    relay = start_relay(deployment, start_process, relay_config)
    conn, reply = relay.socks(connect_request("127.0.0.1", dns_server.port, command=0x83))
    query = (b"\xab\xcd\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"
             b"\x04wiki\x04corp\x07example\x00\x00\x01\x00\x01")
    with conn:
        assert reply[1] == 0
        conn.sendall(frame_datagram(query))
        frames = StreamDatagrams()
        answers: list[bytes] = []
        while not answers:
            answers = frames.receive_data(conn.recv(4096))
    assert answers[0][:2] == b"\xab\xcd"
    assert socket.inet_aton(DnsServer.ADDRESS) in answers[0]
    relay.wait_for_audit("relay.stream", destination=f"127.0.0.1:{dns_server.port}/udp")


def test_icmp_echo_in_stream_pings_the_relay_hosts_loopback_named_by_a_network_entry(
        relay: Relay) -> None:
    conn, reply = relay.socks(connect_request("127.0.0.1", 0, command=0x81))
    with conn:
        assert reply[1] == 0
        conn.sendall(frame_datagram(b"\x00\x07hello relay"))
        frames = StreamDatagrams()
        replies: list[bytes] = []
        while not replies:
            replies = frames.receive_data(conn.recv(4096))
    sequence, rtt = struct.unpack("!HI", replies[0][:6])
    assert (sequence, replies[0][6:]) == (7, b"hello relay")
    assert rtt < 10_000_000
    relay.wait_for_audit("relay.stream", destination="127.0.0.1:0/icmp")


def test_icmp_echo_to_an_address_no_entry_covers_is_refused(relay: Relay) -> None:
    conn, reply = relay.socks(connect_request("2001:db8::7", 0, command=0x81))
    with conn:
        assert reply[1] == 0x02
    relay.wait_for_audit("relay.refused", destination="2001:db8::7:0/icmp")


# -- operations --------------------------------------------------------------------------

def test_health_ready_and_status_answer_and_relay_status_prints_the_counters(
        relay: Relay, http_server: HttpServer) -> None:
    assert serves_a_real_request(relay, http_server)
    base = f"http://127.0.0.1:{relay.health_port}"
    assert urllib.request.urlopen(base + "/health", timeout=5).status == 200
    assert urllib.request.urlopen(base + "/ready", timeout=5).status == 200
    status = json.load(urllib.request.urlopen(base + "/status", timeout=5))
    assert status["ready"] is True
    assert status["streams_total"] >= 1
    assert status["bytes_to_edges"] > 0
    result = run_cli("relay", "status", "--dir", str(relay.deployment.directory))
    assert result.returncode == 0, result.stderr
    assert re.search(r"ready:\s+yes", result.stdout)
    assert re.search(r"streams:\s+0 open, [1-9]\d* in all", result.stdout)


def test_relay_status_exits_1_when_no_relay_answers(deployment: Deployment) -> None:
    with deployment.config.open("a") as handle:
        handle.write(f'\n[relay]\nhealth_listen = "127.0.0.1:{free_port()}"\n')
    result = run_cli("relay", "status", "--dir", str(deployment.directory))
    assert result.returncode == 1
    assert "the relay does not answer" in result.stderr


def test_serve_refuses_to_mix_the_relay_with_other_roles(deployment: Deployment) -> None:
    result = run_cli("serve", "relay", "gateway", "--dir", str(deployment.directory))
    assert result.returncode == 2
    assert "the relay runs in a process of its own" in result.stderr


def test_cert_issue_role_relay_writes_the_relays_certificate_with_its_names(
        deployment: Deployment, tmp_path: Path) -> None:
    from cryptography import x509

    out = tmp_path / "relay-host"
    result = run_cli("cert", "issue", "--role", "relay", "--hostname", "relay.dmz2.example",
                     "--ip", "192.0.2.10", "--out", str(out), "--dir",
                     str(deployment.directory))
    assert result.returncode == 0, result.stderr
    cert = x509.load_pem_x509_certificate((out / "relay.crt").read_bytes())
    assert cert.subject.rfc4514_string() == "CN=portcullis-relay"
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["relay.dmz2.example"]
    assert [str(a) for a in names.get_values_for_type(x509.IPAddress)] == ["192.0.2.10"]
    assert (out / "relay.key").stat().st_mode & 0o077 == 0


def test_sighup_reloads_the_allow_list_for_new_connections(
        relay: Relay, http_server: HttpServer) -> None:
    import signal

    assert serves_a_real_request(relay, http_server)
    config = relay.deployment.config
    config.write_text(re.sub(r"(?m)^allow = .*$", 'allow = ["10.0.0.0/8:1-65535"]',
                             config.read_text()))
    relay.process.popen.send_signal(signal.SIGHUP)
    relay.process.wait_for("relay configuration reloaded")
    conn, reply = relay.socks(connect_request("127.0.0.1", http_server.port))
    with conn:
        assert reply[1] == 0x02
    relay.wait_for_audit("relay.refused", destination=f"127.0.0.1:{http_server.port}/tcp")


def test_32_mib_through_a_tcp_echo_arrive_intact_both_ways_at_once(
        deployment: Deployment, start_process,  # type: ignore[no-untyped-def]
        relay_config: dict[str, object], echo_server) -> None:  # type: ignore[no-untyped-def]
    import asyncio
    import hashlib
    import random

    relay_config["allow"] = [f"127.0.0.1/32:{echo_server.port}"]
    relay = start_relay(deployment, start_process, relay_config)
    size = 32 * 1024 * 1024
    block = random.Random(7).randbytes(1 << 20)

    async def round_trip() -> tuple[str, str, int]:
        context = client_context(relay.pki / "ca.crt", cert_file=relay.pki / "gateway.crt",
                                 key_file=relay.pki / "gateway.key")
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", relay.port, ssl=context, server_hostname="127.0.0.1")
        writer.write(GREETING + connect_request("127.0.0.1", echo_server.port))
        assert await reader.readexactly(2) == b"\x05\x00"
        assert (await reader.readexactly(10))[1] == 0
        sent, received = hashlib.sha256(), hashlib.sha256()

        async def send() -> None:
            for index in range(size // len(block)):
                chunk = bytes([index & 0xFF]) + block[1:]
                sent.update(chunk)
                writer.write(chunk)
                await writer.drain()   # the relay's back-pressure reaches us here

        sending = asyncio.ensure_future(send())
        count = 0
        while count < size:
            data = await reader.read(1 << 20)
            assert data, f"closed after {count} bytes"
            received.update(data)
            count += len(data)
        await sending
        writer.close()
        return sent.hexdigest(), received.hexdigest(), count

    sent, received, count = asyncio.run(asyncio.wait_for(round_trip(), 120))
    assert count == size
    assert sent == received
    line = relay.wait_for_audit("relay.stream", destination=f"127.0.0.1:{echo_server.port}")
    assert line["bytes_to_edge"] == size and line["bytes_from_edge"] == size
