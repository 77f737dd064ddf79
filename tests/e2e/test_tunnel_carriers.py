"""One tunnel, several carriers: `portcullis connect` opens K WebSockets (--carriers,
default 2) and spreads its TCP streams over them; an extra carrier that dies is reopened
while new streams go to the others; only a live tunnel's own session may add carriers;
a sign-out ends them all. Real `portcullis up` and `portcullis connect`."""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import ssl
import subprocess
import time
from pathlib import Path

import httpx
from test_tunnel import POLICIES, Tunnel, audit, carriers_up, connect, login, vpn  # noqa: F401  (vpn: a fixture)

from conftest import Deployment, run_cli
from e2e.test_workers import start_node, two_worker_deployment
from portcullis.gateway.carriers import JOIN_CHECK
from portcullis.net import websocket
from portcullis.net.muxsession import MuxSession
from portcullis.proto.mux import MuxConnection, Reason

BOUND = 1.0   # seconds from a sign-out to every carrier's end (as in test_revocation)


def alice_forward(deployment: Deployment, start_process, home: Path, echo_port: int,  # type: ignore[no-untyped-def]
                  carriers: int = 2) -> tuple[Tunnel, str, str]:
    """Alice's `connect --carriers N -L` to the echo server, once every carrier is up;
    the tunnel and the forward's local host and port."""
    login(deployment, "alice", home)
    tunnel = connect(deployment, start_process, home, f"127.0.0.1:0:127.0.0.1:{echo_port}",
                     carriers=carriers)
    carriers_up(home, carriers)
    host, port = tunnel.forwards[0]
    return tunnel, host, port


def echo_stream(host: str, port: str) -> socket.socket:
    """A connection through the tunnel that has carried one echo (so it is open there)."""
    sock = socket.create_connection((host, int(port)), timeout=10)
    assert echoes(sock)
    return sock


def echoes(sock: socket.socket) -> bool:
    try:
        sock.sendall(b"ping\n")
        return sock.recv(100) == b"ping\n"
    except OSError:
        return False


def started(deployment: Deployment, user: str) -> list[dict[str, object]]:
    return [e for e in audit(deployment) if e["event"] == "tunnel.started" and e["user"] == user]


def streams_per_carrier(home: Path, total: int) -> list[int]:
    """Each carrier's open streams, once the status file counts `total` in all."""
    deadline = time.monotonic() + 10
    while True:
        carriers = carriers_up(home, 2)
        counts = [int(carrier["streams"]) for carrier in carriers]
        if sum(counts) == total or time.monotonic() > deadline:
            return counts
        time.sleep(0.1)


def test_parallel_streams_spread_over_two_carriers_of_one_tunnel(
        vpn: Deployment, echo_server, tmp_path: Path, start_process) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    home = tmp_path / "alice"
    tunnel, host, port = alice_forward(vpn, start_process, home, echo_server.port)
    held = [echo_stream(host, port) for _ in range(6)]
    assert streams_per_carrier(home, 6) == [3, 3]
    status = run_cli("status", env={"PORTCULLIS_HOME": str(home)})
    assert "carriers        2 up of 2" in status.stdout, status.stdout + status.stderr
    assert "carrier 1: up from 127.0.0.1:" in status.stdout
    # Both carriers are one tunnel at the gateway: one id, one source, carriers 0 and 1.
    opened = started(vpn, "alice")
    assert sorted(e["carrier"] for e in opened) == [0, 1]
    assert len({e["tunnel"] for e in opened}) == 1
    for sock in held:
        sock.close()
    tunnel.process.stop()
    deadline = time.monotonic() + 10
    ended: list[dict[str, object]] = []
    while len(ended) < 2 and time.monotonic() < deadline:
        ended = [e for e in audit(vpn) if e["event"] == "tunnel.ended"]
        time.sleep(0.1)
    # The gateway carried streams on each carrier.
    assert sorted(e["carrier"] for e in ended) == [0, 1]
    assert all(int(str(e["bytes_to_client"])) >= 3 * 5 for e in ended), ended


def test_a_dead_carrier_is_reopened_and_new_streams_go_to_the_others(
        vpn: Deployment, echo_server, tmp_path: Path, start_process) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    home = tmp_path / "alice"
    tunnel, host, port = alice_forward(vpn, start_process, home, echo_server.port)
    carriers = carriers_up(home, 2)
    first, second = echo_stream(host, port), echo_stream(host, port)
    assert streams_per_carrier(home, 2) == [1, 1]
    # Cut carrier 1's TCP connection under it (as a middlebox or a network change would).
    local_port = carriers[1]["local"].rsplit(":", 1)[1]
    killed = subprocess.run(["ss", "-K", "-tn", "sport", "=", f":{local_port}"],
                            capture_output=True, text=True, timeout=10)
    assert local_port in killed.stdout, killed.stdout + killed.stderr
    tunnel.process.wait_for(r"carrier 1 lost")
    # Carrier 1's stream went with it; carrier 0's carries on, and new streams work.
    second.settimeout(10)
    assert not echoes(second)
    assert echoes(first)
    fresh = [echo_stream(host, port) for _ in range(3)]
    # It is back, on a new connection, as carrier 1 of the same tunnel.
    deadline = time.monotonic() + 20
    while carriers_up(home, 2)[1]["local"] == carriers[1]["local"]:
        assert time.monotonic() < deadline, "carrier 1 was not reopened"
        time.sleep(0.1)
    opened = started(vpn, "alice")
    assert [e["carrier"] for e in opened].count(1) == 2
    assert len({e["tunnel"] for e in opened}) == 1
    later = [echo_stream(host, port) for _ in range(4)]
    assert sum(streams_per_carrier(home, 8)) == 8    # first, fresh and later, all open
    assert "tunnel lost" not in tunnel.process.output()
    for sock in [first, second, *fresh, *later]:
        sock.close()


# -- carriers from a hand-made client: what the gateway takes and refuses ---------------
async def open_carrier(deployment: Deployment, fields: dict[str, object]
                       ) -> tuple[MuxSession, dict[str, object] | None]:
    """A carrier presenting `fields` in its HELLO; the gateway's HELLO (None: refused)."""
    tls = ssl.create_default_context(cafile=str(deployment.ca))
    carrier = await websocket.connect(websocket.websocket_url(deployment.url,
                                                              "/api/v1/tunnel"), tls)
    codec = MuxConnection("client")
    codec.send_hello(fields)
    session = MuxSession(codec)
    carrier.attach(session)
    return session, await session.hello_within(10)


def token_of(home: Path) -> str:
    return str(json.loads((home / "session.json").read_text())["token"])


def test_only_the_tunnels_own_session_with_its_live_join_secret_adds_a_carrier(
        vpn: Deployment, tmp_path: Path) -> None:  # noqa: F811
    alice, bob = tmp_path / "alice", tmp_path / "bob"
    login(vpn, "alice", alice)
    login(vpn, "bob", bob)

    async def scenario() -> None:
        # A client that wants one carrier is given no join secret: a tunnel as before.
        single, hello = await open_carrier(vpn, {"session": token_of(alice)})
        assert hello is not None and "join" not in hello
        single.close(Reason.CANCELLED, "done")
        first, hello = await open_carrier(vpn, {"session": token_of(alice), "carriers": 2})
        assert hello is not None
        join = hello["join"]
        refused = [
            {"session": token_of(alice), "join": secrets.token_urlsafe(32), "carrier": 1},
            {"session": token_of(bob), "join": join, "carrier": 1},   # another's session
            {"join": join, "carrier": 1},                             # no session at all
            {"session": token_of(alice), "join": join, "carrier": 99},
        ]
        for fields in refused:
            session, answer = await open_carrier(vpn, fields)
            assert answer is None, fields
            assert session.goaway is not None
        extra, answer = await open_carrier(vpn, {"session": token_of(alice), "join": join,
                                                 "carrier": 1})
        assert answer is not None
        assert answer["id"] == hello["id"] and answer["carrier"] == 1
        # Carrier 0 ends: the extra one ends too, soon, and the secret is worthless.
        first.close(Reason.CANCELLED, "client stopped")
        await asyncio.wait_for(extra.closed.wait(), JOIN_CHECK + 5)
        assert extra.goaway is not None and "has ended" in extra.goaway[1]
        late, answer = await open_carrier(vpn, {"session": token_of(alice), "join": join,
                                                "carrier": 1})
        assert answer is None and late.goaway is not None
        assert late.goaway[0] == Reason.REFUSED

    asyncio.run(scenario())
    refusals = [str(e["reason"]) for e in audit(vpn) if e["event"] == "tunnel.refused"]
    assert refusals.count("unknown or expired carrier join secret") == 3   # forged, bob, late
    assert "no session presented" in refusals
    assert "no valid carrier index" in refusals
    opened = started(vpn, "alice")
    assert [e["carrier"] for e in opened] == [0, 0, 1]
    assert opened[2]["tunnel"] == opened[1]["tunnel"] != opened[0]["tunnel"]


def test_signing_out_ends_every_carrier_within_a_second(
        vpn: Deployment, echo_server, tmp_path: Path, start_process) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    home = tmp_path / "alice"
    tunnel, host, port = alice_forward(vpn, start_process, home, echo_server.port)
    held = [echo_stream(host, port), echo_stream(host, port)]
    assert streams_per_carrier(home, 2) == [1, 1]
    httpx.post(f"{vpn.url}/api/v1/logout", headers={"authorization": f"Bearer {token_of(home)}"},
               verify=ssl.create_default_context(cafile=str(vpn.ca)), timeout=10)
    signed_out = time.monotonic()
    for sock in held:   # each stream (one per carrier) ends with its carrier
        sock.settimeout(10)
        assert sock.recv(100) == b""
        assert time.monotonic() - signed_out < BOUND
    assert tunnel.process.popen.wait(15) == 1
    assert "sign in again" in tunnel.process.output()
    ended = [e for e in audit(vpn) if e["event"] == "tunnel.ended"]
    assert sorted(e["carrier"] for e in ended) == [0, 1]


def test_one_carrier_is_a_tunnel_as_before(
        vpn: Deployment, echo_server, tmp_path: Path, start_process) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    home = tmp_path / "alice"
    _, host, port = alice_forward(vpn, start_process, home, echo_server.port, carriers=1)
    held = [echo_stream(host, port) for _ in range(3)]
    status = json.loads((home / "tunnel-status.json").read_text())
    assert len(status["carriers"]) == 1
    assert [e["carrier"] for e in started(vpn, "alice")] == [0]
    for sock in held:
        sock.close()


def test_an_administrator_ending_one_carrier_ends_the_tunnel(
        vpn: Deployment, echo_server, tmp_path: Path, start_process) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    home, admin = tmp_path / "alice", tmp_path / "admin"
    tunnel, _, _ = alice_forward(vpn, start_process, home, echo_server.port)
    result = run_cli("login", vpn.url, "--user", "admin", "--password-stdin", "--ca",
                     str(vpn.ca), input=vpn.admin_password + "\n",
                     env={"PORTCULLIS_HOME": str(admin)})
    assert result.returncode == 0, result.stderr
    extra = next(e for e in started(vpn, "alice") if e["carrier"] == 1)
    killed = run_cli("sessions", "kill", str(extra["connection"]), "--connections-only",
                     env={"PORTCULLIS_HOME": str(admin)})
    assert killed.returncode == 0 and f"ended 1 connection(s) here: {extra['connection']}" \
        in killed.stdout, killed.stdout + killed.stderr
    assert tunnel.process.popen.wait(15) == 1
    assert "ended by an administrator" in tunnel.process.output()
    assert "reopening" not in tunnel.process.output()


def test_carriers_on_two_workers_carry_one_tunnel_and_end_with_its_session(
        tmp_path: Path, echo_server, start_process) -> None:  # type: ignore[no-untyped-def]
    """Two worker processes behind one port: carrier 1 is served by the worker that did not
    serve carrier 0 (the client spreads them), which knows the tunnel only from the
    shared store."""
    deployment = two_worker_deployment(tmp_path / "deployment", echo_server)
    with deployment.config.open("a") as handle:
        handle.write(POLICIES)
    node = start_node(deployment, tmp_path / "up.log")
    try:
        home = tmp_path / "alice"
        tunnel, host, port = alice_forward(deployment, start_process, home, echo_server.port)
        # The client opens carrier 1 again while it lands on carrier 0's worker (the
        # gateway names the process in HELLO): the tunnel uses both workers from the start.
        carriers = carriers_up(home, 2)
        workers = [node.holder(int(str(carrier["local"]).rsplit(":", 1)[1]))
                   for carrier in carriers]
        assert None not in workers and workers[0] != workers[1], workers
        held = [echo_stream(host, port), echo_stream(host, port)]
        assert streams_per_carrier(home, 2) == [1, 1]
        assert all(echoes(sock) for sock in held)
        httpx.post(f"{deployment.url}/api/v1/logout",
                   headers={"authorization": f"Bearer {token_of(home)}"},
                   verify=ssl.create_default_context(cafile=str(deployment.ca)), timeout=10)
        signed_out = time.monotonic()
        for sock in held:
            sock.settimeout(10)
            assert sock.recv(100) == b""
            assert time.monotonic() - signed_out < BOUND
        assert tunnel.process.popen.wait(15) == 1
    finally:
        node.process.stop()
