"""The gateway host is never a destination by accident, through a real gateway: the live
rows of tests/policy/admission_table.py opened through `portcullis connect`'s SOCKS5
proxy, against listeners of our own on 127.0.0.1 and on the gateway's side of a veth
pair, and the real Redis on 127.0.0.1; `policy explain` must agree on every row."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest

from conftest import Deployment, run_cli
from peers.stores import answering_redis_url
from policy.admission_table import LOOPBACK_TOLD, POLICIES, ROWS, USERS, fill
from portcullis.config import config_path, load_settings
from portcullis.policy.explain import explain, local_user

PASSWORD = "correct horse battery staple"


class Banner:
    """A TCP server that greets each connection with `hello from ADDRESS` and closes it."""

    def __init__(self, address: str, port: int = 0) -> None:
        self.server = socket.create_server((address, port))
        self.server.settimeout(0.1)   # accept() wakes up to see close()
        self._closed = threading.Event()
        self.port = int(self.server.getsockname()[1])
        self.address = address
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self.server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.sendall(f"hello from {self.address}\n".encode())

    def close(self) -> None:
        self._closed.set()
        self.server.close()
        self._thread.join(5)


def banners_on_one_port(addresses: list[str]) -> list[Banner]:
    """A banner server on each address, all on one port (the table has one {port})."""
    for _ in range(20):
        first = Banner(addresses[0])
        try:
            return [first, *(Banner(a, first.port) for a in addresses[1:])]
        except OSError:
            first.close()
    raise AssertionError("no port free on every address")


def recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, "the SOCKS5 proxy closed the connection"
        data += chunk
    return data


def socks_connect(proxy: str, host: str, port: int) -> tuple[int, socket.socket]:
    """A SOCKS5 CONNECT (RFC 1928) through `proxy`: the reply code and the socket."""
    proxy_host, proxy_port = proxy.rsplit(":", 1)
    sock = socket.create_connection((proxy_host, int(proxy_port)), timeout=20)
    sock.sendall(b"\x05\x01\x00")
    assert recv_exact(sock, 2) == b"\x05\x00"
    try:
        address = ipaddress.ip_address(host)
        kind = b"\x01" if address.version == 4 else b"\x04"
        where = kind + address.packed
    except ValueError:
        where = b"\x03" + bytes([len(host)]) + host.encode()
    sock.sendall(b"\x05\x01\x00" + where + port.to_bytes(2, "big"))
    reply = recv_exact(sock, 4)
    size = {1: 4, 4: 16}.get(reply[3]) or recv_exact(sock, 1)[0]
    recv_exact(sock, size + 2)
    return reply[1], sock


def audit(deployment: Deployment) -> list[dict[str, object]]:
    return [json.loads(line) for line in
            (deployment.directory / "audit.jsonl").read_text().splitlines()]


def denials_after(deployment: Deployment, seen: int) -> list[dict[str, object]]:
    """The tunnel.denied lines past the first `seen`, waiting (bounded) for one more."""
    for _ in range(100):
        denied = [e for e in audit(deployment) if e["event"] == "tunnel.denied"]
        if len(denied) > seen:
            return denied[seen:]
        time.sleep(0.05)
    return []


@pytest.fixture
def admitting(deployment: Deployment, test_host, start_process, tmp_path: Path):  # type: ignore[no-untyped-def]
    """One gateway with the table's policies, its users signed in, one tunnel each."""
    redis_url = asyncio.run(answering_redis_url())
    redis_port = urlparse(redis_url).port or 6379
    # Sessions in Redis, so that `policy explain --session` can read a live one.
    deployment.set("store", "ephemeral",
                   f'"{redis_url}?prefix=pc-admission-{secrets.token_hex(4)}:"')
    own, own_net = test_host.gateway_side, f"198.18.{test_host.octet}.0/30"
    banners = banners_on_one_port(["127.0.0.1", own])
    try:
        with deployment.config.open("a") as handle:
            handle.write(fill(POLICIES, own, own_net, banners[0].port, redis_port))
        live_users = sorted({row.user for row in ROWS if row.live})
        for user in live_users:
            deployment.add_user(user, PASSWORD, [USERS[user]])
        gateway = start_process("up", "--dir", str(deployment.directory), name="up")
        gateway.wait_for(r"Portal: https://")
        proxies, tunnels = {}, []
        for user in live_users:
            home = tmp_path / user
            signed_in = run_cli("login", deployment.url, "--user", user, "--password-stdin",
                                "--ca", str(deployment.ca), input=PASSWORD + "\n",
                                env={"PORTCULLIS_HOME": str(home)})
            assert signed_in.returncode == 0, signed_in.stderr
            tunnel = start_process("connect", "--no-proxy-auth", "--socks", "127.0.0.1:0",
                                   "--http", "off",
                                   name=f"connect-{user}", env={"PORTCULLIS_HOME": str(home)})
            proxies[user] = tunnel.wait_for(r"SOCKS5 proxy: listening on ([\d.]+:\d+)").group(1)
            tunnels.append(tunnel)
        yield deployment, proxies, lambda text: fill(text, own, own_net, banners[0].port,
                                                     redis_port)
        for tunnel in tunnels:   # before the gateway, which would make them reconnect
            started = time.monotonic()
            tunnel.stop()
            print(f"stopped {tunnel.log.name} in {time.monotonic() - started:.1f} s")
        started = time.monotonic()
        gateway.stop()
        print(f"stopped the gateway in {time.monotonic() - started:.1f} s")
    finally:
        for banner in banners:
            banner.close()


LIVE = [row for row in ROWS if row.live]


def test_loopback_own_addresses_and_redis_are_refused_unless_a_network_names_them(
        admitting) -> None:  # type: ignore[no-untyped-def]
    """Every live row through the tunnel, and `policy explain` (the package function the
    CLI calls, then the CLI itself) giving the same answer as the gateway."""
    deployment, proxies, filled = admitting
    settings = load_settings(config_path(deployment.directory))
    seen = len([e for e in audit(deployment) if e["event"] == "tunnel.denied"])
    for row in LIVE:
        host, port = filled(row.asked), int(filled(str(row.port)))
        code, sock = socks_connect(proxies[row.user], host, port)
        with sock:
            if row.allowed:
                assert code == 0, row.id
                if port == int(filled("{redis}")):
                    sock.sendall(b"PING\r\n")
                    assert recv_exact(sock, 7) == b"+PONG\r\n", row.id
                else:
                    assert sock.recv(100) == f"hello from {filled(row.dials or '')}\n".encode()
            else:
                assert code != 0, row.id
                denied = denials_after(deployment, seen)
                assert len(denied) == 1, (row.id, denied)
                seen += 1
                assert denied[0]["user"] == row.user
                assert filled(row.reason) in str(denied[0]["reason"]), (row.id, denied[0])
        # `policy explain`, as the CLI calls it, on this host: the same answer.
        target = f"[{host}]:{port}/tcp"
        who = asyncio.run(local_user(settings, row.user))
        admission, lines = asyncio.run(explain(settings, who, target))
        assert admission.allowed == row.allowed, (row.id, lines)
        assert filled(row.reason) in admission.reason, (row.id, lines)
    assert [e for e in audit(deployment) if e["event"] == "tunnel.stream"
            and e["user"] == "lou" and e["address"] == "127.0.0.1"]

    # The command line: local accounts, a live session's claims, and the errors.
    redis = filled("{redis}")
    directory = str(deployment.directory)
    refused = run_cli("policy", "explain", "--user", "alice", "--to", f"127.0.0.1:{redis}/tcp",
                      "--dir", directory)
    assert refused.returncode == 0, refused.stderr
    assert "DENIED" in refused.stdout.splitlines()
    assert "127.0.0.1 is the gateway host's loopback" in refused.stdout
    assert f"the client is told: {LOOPBACK_TOLD}" in refused.stdout
    own = run_cli("policy", "explain", "--user", "alice", "--to", f"{filled('{own}')}:80/tcp",
                  "--dir", directory)
    assert "an address of the gateway host's own interfaces" in own.stdout
    # lou's live session, read from the store: claims as the gateway sees them.
    token = json.loads((deployment.directory.parent / "lou" / "session.json").read_text())["token"]
    allowed = run_cli("policy", "explain", "--session", token, "--to",
                      f"localhost:{redis}/tcp", "--dir", directory)
    assert allowed.returncode == 0, allowed.stderr
    assert "ALLOWED" in allowed.stdout.splitlines() and '"loopback"' in allowed.stdout
    assert "live session" in allowed.stdout and "groups loop" in allowed.stdout
    unknown = run_cli("policy", "explain", "--user", "nobody", "--to", "10.1.2.3:80/tcp",
                      "--dir", directory)
    assert unknown.returncode == 2 and "no local account 'nobody'" in unknown.stderr
    stale = run_cli("policy", "explain", "--session", "not-a-token", "--to", "10.1.2.3:80/tcp",
                    "--dir", directory)
    assert stale.returncode == 2 and "no live session" in stale.stderr




@pytest.fixture
def allow_all(deployment: Deployment, start_process) -> Iterator[str]:  # type: ignore[no-untyped-def]
    with deployment.config.open("a") as handle:
        handle.write('\n[[policies]]\nname = "no-ssh"\naction = "deny"\nports = ["22"]\n'
                     '\n[[policies]]\nname = "everything"\naction = "allow"\n'
                     'groups = ["all"]\n')
    deployment.add_user("alice", PASSWORD, ["all"])
    gateway = start_process("up", "--dir", str(deployment.directory), name="up")
    gateway.wait_for(r"Portal: https://")
    with httpx.Client(base_url=deployment.url, timeout=30,
                      verify=ssl.create_default_context(cafile=str(deployment.ca))) as client:
        handle = client.post("/api/v1/login", json={}).json()["handle"]
        body = client.post("/api/v1/login", json={
            "handle": handle, "answers": {"username": "alice", "password": PASSWORD}}).json()
    yield str(body["token"])


def test_a_refused_stream_datagram_flow_and_echo_are_answered_at_once_with_why(
        deployment: Deployment, allow_all: str) -> None:
    from portcullis.net import websocket
    from portcullis.net.muxsession import MuxSession
    from portcullis.proto import mux

    async def refusals() -> list[tuple[str, str, float]]:
        tls = ssl.create_default_context(cafile=str(deployment.ca))
        carrier = await websocket.connect(f"wss://localhost:{deployment.port}/api/v1/tunnel",
                                          tls)
        codec = mux.MuxConnection("client")
        codec.send_hello({"version": 1, "session": allow_all})
        session = MuxSession(codec)
        carrier.attach(session)
        await asyncio.wait_for(session.hello, 10)
        told: list[tuple[str, str, float]] = []
        done = asyncio.Event()
        opened = time.monotonic()

        def refused(reason: mux.Reason, message: str) -> None:
            told.append((reason.name, message, time.monotonic() - opened))
            if len(told) == 4:
                done.set()

        session.on_refused = refused
        session.open_local(mux.Protocol.TCP, "127.0.0.1", 6379)
        session.open_flow("127.0.0.1", 53, lambda data: None, idle_timeout=60)
        session.open_flow("127.0.0.1", 0, lambda data: None, idle_timeout=60,
                          protocol=mux.Protocol.ICMP)
        session.open_local(mux.Protocol.TCP, "10.1.2.3", 22)   # refused before any dial
        await asyncio.wait_for(done.wait(), 10)
        session.close(mux.Reason.CANCELLED, "done")
        return told

    told = asyncio.run(refusals())
    print("refusals (reason, message, seconds after opening):", told)
    assert [(reason, message) for reason, message, _ in told] == [
        ("DENIED", LOOPBACK_TOLD)] * 3 + [("DENIED", 'denied by rule "no-ssh"')]
    # An echo is refused on its open, well before an echo reply would have timed out (5 s).
    assert told[2][2] < 2.0
    denied = [e for e in audit(deployment) if e["event"] == "tunnel.denied"]
    assert [str(e["destination"]) for e in denied] == [
        "127.0.0.1:6379/tcp", "127.0.0.1:53/udp", "127.0.0.1:0/icmp", "10.1.2.3:22/tcp"]
    assert all("gateway host's loopback" in str(e["reason"]) for e in denied[:3])


def test_a_resource_named_localhost_is_refused_while_its_literal_address_is_launched(
        deployment: Deployment, echo_server, client_home: Path, start_process) -> None:  # type: ignore[no-untyped-def]
    deployment.add_resource("named", f"localhost:{echo_server.port}", ["staff"])
    deployment.add_resource("literal", f"127.0.0.1:{echo_server.port}", ["staff"])
    deployment.add_user("alice", PASSWORD, ["staff"])
    gateway = start_process("up", "--dir", str(deployment.directory), name="up")
    gateway.wait_for(r"Portal: https://")
    signed_in = run_cli("login", deployment.url, "--user", "alice", "--password-stdin",
                        "--ca", str(deployment.ca), input=PASSWORD + "\n")
    assert signed_in.returncode == 0, signed_in.stderr
    ports = {}
    for name in ("named", "literal"):
        process = start_process("launch", name, "--listen", "127.0.0.1:0", name=name)
        ports[name] = (process, int(process.wait_for(r"listening on [\d.]+:(\d+)").group(1)))
    with socket.create_connection(("127.0.0.1", ports["literal"][1]), timeout=10) as sock:
        sock.sendall(b"through the launch")
        assert sock.recv(100) == b"through the launch"
    with socket.create_connection(("127.0.0.1", ports["named"][1]), timeout=10) as sock:
        sock.sendall(b"never delivered")
        try:
            answer = sock.recv(100)
        except ConnectionResetError:
            answer = b""
        assert answer == b""   # closed: the gateway refused the stream
    ports["named"][0].wait_for(LOOPBACK_TOLD)
    refused = [e for e in audit(deployment) if e["event"] == "launch.refused"]
    assert [e["resource"] for e in refused] == ["named"]
    assert "127.0.0.1 is the gateway host's loopback" in str(refused[0]["reason"])


@pytest.mark.peer
def test_policy_explain_takes_a_directory_users_groups_from_a_sign_in(
        deployment: Deployment, slapd) -> None:  # type: ignore[no-untyped-def]
    from peers.ldap import PASSWORDS

    (deployment.directory / "secrets" / "ldap-bind").write_text(slapd.bind_password)
    with deployment.config.open("a") as handle:
        handle.write(f"""
[auth]
flow = "corp"
{slapd.provider_toml("corp", "secrets/ldap-bind", nested_groups=True)}[[auth.flows]]
name = "corp"
[[auth.flows.steps]]
provider = "corp"

[[policies]]
name = "sales-intranet"
action = "allow"
groups = ["sales"]
""")
    directory = str(deployment.directory)
    # bob has no local account: his groups exist only in the directory's answer.
    unknown = run_cli("policy", "explain", "--user", "bob", "--to", "10.20.1.10:443/tcp",
                      "--dir", directory)
    assert unknown.returncode == 2 and "--sign-in" in unknown.stderr
    signed_in = run_cli("policy", "explain", "--user", "bob", "--answer",
                        f"password={PASSWORDS['bob']}", "--to", "10.20.1.10:443/tcp",
                        "--dir", directory)
    assert signed_in.returncode == 0, signed_in.stderr
    lines = signed_in.stdout.splitlines()
    assert lines[0].startswith("user bob (signed in through flow corp, realm corp): groups")
    assert "sales" in lines[0] and "ALLOWED" in lines
    assert 'allowed by rule "sales-intranet": user bob in group sales' in signed_in.stdout
    # The same user, to the gateway host's Redis: the rule allows any destination, which
    # does not open loopback.
    loopback = run_cli("policy", "explain", "--user", "bob", "--answer",
                       f"password={PASSWORDS['bob']}", "--to", "127.0.0.1:6379/tcp",
                       "--dir", directory)
    assert "DENIED" in loopback.stdout.splitlines()
    assert 'rule "sales-intranet" allows any destination' in loopback.stdout
    wrong = run_cli("policy", "explain", "--user", "bob", "--answer", "password=nope",
                    "--to", "10.20.1.10:443/tcp", "--dir", directory)
    assert wrong.returncode == 1 and "would not sign bob in" in wrong.stderr
