"""The classic-mode relay Dialer against real TLS + SOCKS5 peers: stunnel requiring the
gateway's certificate in front of Debian's dante server (a stock relay), and our own
relay (`portcullis serve relay`), which also carries UDP and ICMP echo in the stream."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import uvloop

from conftest import Deployment, free_port, require_program, run_cli
from net.test_muxsession import pair
from peers.dante import Danted, StunnelServer
from peers.servers import DnsServer, EchoServer
from portcullis.errors import DialError
from portcullis.net.socksrelay import ClassicRelayDialer
from portcullis.net.tls import ResumingClientContext, client_context, server_context
from portcullis.proto import mux
from portcullis.proto.mux import Reason


class Relay:
    def __init__(self, danted: Danted, stunnel: StunnelServer, pki: Path,
                 closed_port: int) -> None:
        self.danted = danted
        self.stunnel = stunnel
        self.address = f"127.0.0.1:{stunnel.port}"
        self.pki = pki
        self.closed_port = closed_port   # dante refuses to connect there by rule

    def gateway_tls(self) -> ResumingClientContext:
        return client_context(self.pki / "ca.crt", cert_file=self.pki / "gateway.crt",
                              key_file=self.pki / "gateway.key")


@pytest.fixture
def relay(deployment: Deployment, tmp_path: Path) -> Iterator[Relay]:
    pki = deployment.directory / "pki"
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        blocked = unused.getsockname()[1]
    danted = Danted(require_program("danted"), tmp_path, blocked_port=blocked)
    try:
        stunnel = StunnelServer(require_program("stunnel"), tmp_path, cert=pki / "relay.crt",
                                key=pki / "relay.key", ca=pki / "ca.crt", forward=danted.port)
    except BaseException:
        danted.close()
        raise
    yield Relay(danted, stunnel, pki, blocked)
    stunnel.close()
    danted.close()


class Collector(asyncio.Protocol):
    def __init__(self) -> None:
        self.received = bytearray()
        self.eof = asyncio.Event()
        self.lost = asyncio.Event()
        self.events: list[str] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.events.append("made")

    def data_received(self, data: bytes) -> None:
        self.received += data

    def eof_received(self) -> None:
        self.events.append("eof")
        self.eof.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append("lost")
        self.lost.set()


async def read_until(protocol: Collector, size: int) -> bytes:
    async with asyncio.timeout(10):
        while len(protocol.received) < size:
            await asyncio.sleep(0.01)
    return bytes(protocol.received)


async def test_connect_relays_bytes_both_ways_through_stunnel_and_dante(
        relay: Relay, echo_server: EchoServer) -> None:
    dialer = ClassicRelayDialer(relay.address, relay.gateway_tls())
    transport, protocol = await dialer.connect("127.0.0.1", echo_server.port, Collector)
    payload = bytes(range(256)) * 4096   # 1 MiB
    transport.write(payload)
    assert await read_until(protocol, len(payload)) == payload
    assert protocol.events == ["made"]
    transport.close()


def _say_bye_then_read_until_eof(listener: socket.socket, heard: list[bytes]) -> None:
    connection, _ = listener.accept()
    with connection:
        connection.sendall(b"bye")
        connection.shutdown(socket.SHUT_WR)   # the server's end of stream, reading on
        while chunk := connection.recv(65536):
            heard.append(chunk)


async def test_the_servers_end_of_stream_reaches_the_callers_protocol(relay: Relay) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    heard: list[bytes] = []
    server = threading.Thread(target=_say_bye_then_read_until_eof, args=(listener, heard))
    server.start()
    try:
        dialer = ClassicRelayDialer(relay.address, relay.gateway_tls())
        transport, protocol = await dialer.connect("127.0.0.1",
                                                   listener.getsockname()[1], Collector)
        async with asyncio.timeout(10):
            await protocol.eof.wait()
        assert bytes(protocol.received) == b"bye"
        transport.close()
    finally:
        server.join(10)
        listener.close()


async def test_a_destination_the_relay_blocks_is_refused_as_denied(relay: Relay) -> None:
    dialer = ClassicRelayDialer(relay.address, relay.gateway_tls())
    with pytest.raises(DialError) as refused:
        await dialer.connect("127.0.0.1", relay.closed_port, Collector)
    assert refused.value.reason is Reason.DENIED
    assert f"the relay at {relay.address} refused 127.0.0.1:{relay.closed_port}" in str(
        refused.value)


async def test_a_destination_that_refuses_fails_the_dial_naming_it(relay: Relay) -> None:
    with socket.socket() as unused:   # bound, not listening: the port refuses
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
        dialer = ClassicRelayDialer(relay.address, relay.gateway_tls())
        with pytest.raises(DialError) as refused:
            await dialer.connect("127.0.0.1", port, Collector)
    # dante answers CONNECTION_REFUSED and resets at once; stunnel in front of it often
    # loses that answer (it reads the reset first), so either is what the edge can know.
    assert (refused.value.reason is Reason.REFUSED
            or "closed the connection without answering the request" in str(refused.value))
    assert f"127.0.0.1:{port}" in str(refused.value)


async def sessions_reused(dialer: ClassicRelayDialer, port: int, sizes: list[int]
                          ) -> list[bool]:
    """Dial an echo server once per size, echo that many bytes, and say for each
    connection whether its TLS session was resumed."""
    reused = []
    for size in sizes:
        transport, protocol = await dialer.connect("127.0.0.1", port, Collector)
        payload = bytes(range(256)) * (size // 256) + b"!" * (size % 256)
        transport.write(payload)
        assert await read_until(protocol, size) == payload
        reused.append(transport.get_extra_info("ssl_object").session_reused)
        transport.close()
    return reused


async def test_the_second_connection_resumes_the_first_ones_tls_session(
        relay: Relay, echo_server: EchoServer) -> None:
    dialer = ClassicRelayDialer(relay.address, relay.gateway_tls())
    assert await sessions_reused(dialer, echo_server.port, [4, 4, 4]) == [False, True, True]


def test_resumption_works_on_uvloop_as_the_node_runs(relay: Relay, echo_server: EchoServer) -> None:
    dialer = ClassicRelayDialer(relay.address, relay.gateway_tls())
    assert uvloop.run(sessions_reused(dialer, echo_server.port, [4, 4])) == [False, True]


async def test_a_relay_certificate_from_another_ca_fails_with_an_actionable_error(
        relay: Relay, tmp_path: Path) -> None:
    other = tmp_path / "other"
    assert run_cli("init", "--dir", str(other), "--port", "1").returncode == 0
    tls = client_context(other / "pki" / "ca.crt", cert_file=other / "pki" / "gateway.crt",
                         key_file=other / "pki" / "gateway.key")
    with pytest.raises(DialError) as failed:
        await ClassicRelayDialer(relay.address, tls).connect("127.0.0.1", 1, Collector)
    assert failed.value.reason is Reason.UNREACHABLE
    assert f"cannot verify the relay's certificate at {relay.address}" in str(failed.value)
    assert "portcullis cert issue --role relay" in str(failed.value)


async def test_the_relay_refusing_the_gateways_certificate_is_named(
        relay: Relay, tmp_path: Path) -> None:
    other = tmp_path / "other"
    assert run_cli("init", "--dir", str(other), "--port", "1").returncode == 0
    # Our CA trusts the relay; the relay does not trust the other deployment's gateway.
    tls = client_context(relay.pki / "ca.crt", cert_file=other / "pki" / "gateway.crt",
                         key_file=other / "pki" / "gateway.key")
    with pytest.raises(DialError) as failed:
        await ClassicRelayDialer(relay.address, tls).connect("127.0.0.1", 1, Collector)
    assert failed.value.reason is Reason.UNREACHABLE
    assert f"the relay at {relay.address} refused this gateway's TLS connection" in str(
        failed.value)


async def test_a_relay_that_accepts_tcp_and_never_answers_tls_times_out() -> None:
    listener = socket.create_server(("127.0.0.1", 0))   # accepts into its backlog only
    try:
        port = listener.getsockname()[1]
        tls = client_context(None)
        dialer = ClassicRelayDialer(f"127.0.0.1:{port}", tls, timeout=0.5)
        with pytest.raises(DialError) as failed:
            await dialer.connect("127.0.0.1", 1, Collector)
    finally:
        listener.close()
    assert failed.value.reason is Reason.TIMED_OUT
    assert f"the relay at 127.0.0.1:{port} did not answer within 0.5 s" in str(failed.value)


class Impostor:
    """A TLS server that presents another role's certificate from the deployment's CA
    (the same host names as the expected peer's) and records every byte a client sends
    it after the handshake; with `answer`, it first answers the request (up to a blank
    line) with what `answer` returns for it."""

    def __init__(self, pki: Path, role: str,
                 answer: Callable[[bytes], bytes] | None = None) -> None:
        self._tls = server_context(pki / f"{role}.crt", pki / f"{role}.key",
                                   client_ca_file=pki / "ca.crt")
        self._answer = answer
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(20)
        self.port = self._listener.getsockname()[1]
        self.received = bytearray()
        self._thread = threading.Thread(target=self._serve)
        self._thread.start()

    def _serve(self) -> None:
        try:
            connection, _ = self._listener.accept()
            with self._tls.wrap_socket(connection, server_side=True) as peer:
                if self._answer is not None:
                    request = b""
                    while b"\r\n\r\n" not in request:
                        request += peer.recv(4096) or b"\r\n\r\n"
                    peer.sendall(self._answer(request))
                while chunk := peer.recv(65536):
                    self.received += chunk
        except (OSError, ssl.SSLError):   # the client went away: what it sent is recorded
            pass

    def close(self) -> None:
        """Wait for the client to go away (its bytes recorded), then stop listening."""
        self._thread.join(20)
        self._listener.close()


async def test_a_server_presenting_the_stas_certificate_is_refused_before_any_socks_byte(
        deployment: Deployment) -> None:
    # `portcullis init` gives every role's certificate the same host names: only the
    # role tells the relay from the STA.
    impostor = Impostor(deployment.directory / "pki", "sta")
    try:
        dialer = ClassicRelayDialer(f"127.0.0.1:{impostor.port}", gateway_tls(deployment),
                                    timeout=5)
        with pytest.raises(DialError) as refused:
            await dialer.connect("127.0.0.1", 1, Collector)
    finally:
        impostor.close()
    assert refused.value.reason is Reason.UNREACHABLE
    assert "presented the certificate of 'portcullis-sta'" in str(refused.value)
    assert impostor.received == b""


async def test_dante_answering_icmp_echo_in_stream_as_unsupported_says_so(
        relay: Relay) -> None:
    dialer = ClassicRelayDialer(relay.address, relay.gateway_tls())
    with pytest.raises(DialError) as failed:
        await dialer.open_echo("127.0.0.1")
    assert "does not carry ICMP echo" in str(failed.value)


# -- our relay: the extensions -----------------------------------------------------------

@pytest.fixture
def our_relay(deployment: Deployment, start_process) -> str:  # type: ignore[no-untyped-def]
    """`portcullis serve relay` allowing loopback's unprivileged ports (and so its
    address for ICMP echo); its address."""
    port = free_port()
    with deployment.config.open("a") as config:
        config.write(f'\n[relay]\nlisten = "127.0.0.1:{port}"\n'
                     f'health_listen = "127.0.0.1:{free_port()}"\n'
                     'allow = ["127.0.0.1/32:1024-65535"]\n')
    relay = start_process("serve", "relay", "--dir", str(deployment.directory), name="relay")
    relay.wait_for(r"Relay: listening on 127\.0\.0\.1:\d+")
    return f"127.0.0.1:{port}"


def gateway_tls(deployment: Deployment) -> ResumingClientContext:
    pki = deployment.directory / "pki"
    return client_context(pki / "ca.crt", cert_file=pki / "gateway.crt",
                          key_file=pki / "gateway.key")


class Datagrams(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.received: asyncio.Queue[tuple[bytes, object]] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: object) -> None:
        self.received.put_nowait((data, addr))


async def test_udp_through_our_relay_carries_a_dns_query_and_dnsmasqs_answer(
        deployment: Deployment, our_relay: str, dns_server: DnsServer) -> None:
    dialer = ClassicRelayDialer(our_relay, gateway_tls(deployment))
    transport, protocol = await dialer.connect_udp("127.0.0.1", dns_server.port, Datagrams)
    query = (b"\xab\xcd\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"
             b"\x04wiki\x04corp\x07example\x00\x00\x01\x00\x01")
    transport.sendto(query)
    async with asyncio.timeout(10):
        answer, sender = await protocol.received.get()
    assert answer[:2] == b"\xab\xcd"
    assert socket.inet_aton(DnsServer.ADDRESS) in answer
    assert sender == ("127.0.0.1", dns_server.port)
    transport.close()


async def test_icmp_echo_through_our_relay_answers_from_its_loopback(
        deployment: Deployment, our_relay: str) -> None:
    channel = await ClassicRelayDialer(our_relay, gateway_tls(deployment)).open_echo(
        "127.0.0.1")
    answers = await asyncio.gather(*(channel.echo(sequence, b"ping %d" % sequence)
                                     for sequence in range(1, 4)))
    channel.close()
    assert [answer[0] if answer else None for answer in answers] == [
        b"ping 1", b"ping 2", b"ping 3"]


async def test_our_relay_refuses_a_port_outside_its_allow_list_as_denied(
        deployment: Deployment, our_relay: str) -> None:
    dialer = ClassicRelayDialer(our_relay, gateway_tls(deployment))
    with pytest.raises(DialError) as refused:
        await dialer.connect("127.0.0.1", 9, Collector)
    assert refused.value.reason is Reason.DENIED
    assert f"the relay at {our_relay} refused 127.0.0.1:9: not allowed" in str(refused.value)


async def test_a_closed_port_behind_our_relay_is_refused_as_refused(
        deployment: Deployment, our_relay: str, echo_server: EchoServer) -> None:
    echo_server.close()   # its port is allowed, and now nothing listens there
    dialer = ClassicRelayDialer(our_relay, gateway_tls(deployment))
    with pytest.raises(DialError) as refused:
        await dialer.connect("127.0.0.1", echo_server.port, Collector)
    assert refused.value.reason is Reason.REFUSED


async def test_our_relay_resumes_the_tls_session_and_relays_a_mebibyte(
        deployment: Deployment, our_relay: str, echo_server: EchoServer) -> None:
    dialer = ClassicRelayDialer(our_relay, gateway_tls(deployment))
    assert await sessions_reused(dialer, echo_server.port, [1, 1 << 20]) == [False, True]


async def test_a_tunnel_client_refused_by_our_relay_hears_its_destination_not_the_relay(
        deployment: Deployment, our_relay: str) -> None:
    client, gateway, wire = pair()   # the edge's session, the client played by a codec
    stream_id = client.open_stream(mux.Protocol.TCP, "127.0.0.1", 9)
    gateway.receive_message(b"".join(client.data_to_send()))
    failed = await gateway.connect_stream(
        stream_id, ClassicRelayDialer(our_relay, gateway_tls(deployment)), "127.0.0.1", 9)
    await asyncio.sleep(0)   # the REFUSE is written on the loop's next turn
    (refused,) = [e for e in wire.events if isinstance(e, mux.StreamRefused)]
    assert (refused.reason, refused.message) == (
        Reason.DENIED, "127.0.0.1:9 cannot be reached through the relay (denied)")
    # The edge's audit trail ("tunnel.stream_failed" records the returned error) keeps
    # the administrator's words: which relay refused.
    assert f"the relay at {our_relay} refused 127.0.0.1:9: not allowed" in str(failed)
