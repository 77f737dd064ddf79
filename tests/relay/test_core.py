"""RelayCore: one asked destination decided, dialled and audited at the relay, against
real loopback sockets."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from portcullis.audit import AuditTrail
from portcullis.errors import DialError
from portcullis.net.destinations import HostAddresses
from portcullis.net.dialer import DirectDialer
from portcullis.policy.admission import Address
from portcullis.policy.relay_allow import parse_allow_list
from portcullis.proto.mux import Reason
from portcullis.relay.core import RelayCore
from portcullis.relay.status import RelayStatus


def audit_lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def make_core(tmp_path: Path, allow: list[str]) -> RelayCore:
    return RelayCore(parse_allow_list(allow), AuditTrail(tmp_path / "audit.log"),
                     RelayStatus(), dialer=DirectDialer(timeout=5),
                     host_addresses=HostAddresses())


async def test_an_allowed_stream_is_dialled_and_audited_with_bytes_both_ways(
        tmp_path: Path) -> None:
    seen_from: list[str] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host, port = writer.get_extra_info("peername")[:2]
        seen_from.append(f"{host}:{port}")
        writer.write(b"hello " + await reader.readexactly(5))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    core = make_core(tmp_path, [f"127.0.0.1/32:{port}"])
    async with server:
        stream = await core.admit("edge-1", "127.0.0.1", port, "tcp")
        received = bytearray()
        closed = asyncio.get_running_loop().create_future()

        class Collect(asyncio.Protocol):
            def data_received(self, data: bytes) -> None:
                received.extend(data)

            def connection_lost(self, exc: Exception | None) -> None:
                closed.set_result(None)

        transport, _ = await core.connect(stream, Collect)
        assert core.status.streams == 1
        transport.write(b"relay")
        await closed
        stream.finished(len(received), 5)
    assert bytes(received) == b"hello relay"
    assert core.status.streams == 0
    (line,) = [e for e in audit_lines(tmp_path / "audit.log") if e["event"] == "relay.stream"]
    assert line["edge"] == "edge-1"
    assert line["address"] == "127.0.0.1"
    assert (line["bytes_to_edge"], line["bytes_from_edge"]) == (11, 5)
    assert [line["source"]] == seen_from   # the address the destination saw


async def test_a_destination_outside_the_allow_list_is_refused_and_audited(
        tmp_path: Path) -> None:
    core = make_core(tmp_path, ["10.0.0.0/8:1-65535", "0.0.0.0/0:22"])
    for host, port in (("192.0.2.1", 80), ("127.0.0.1", 22)):
        with pytest.raises(DialError) as caught:
            await core.admit("edge-1", host, port, "tcp")
        assert caught.value.reason == Reason.DENIED
        assert "does not allow" in str(caught.value)
    refused = [e for e in audit_lines(tmp_path / "audit.log") if e["event"] == "relay.refused"]
    assert [e["destination"] for e in refused] == ["192.0.2.1:80/tcp", "127.0.0.1:22/tcp"]
    assert "loopback" in str(refused[1]["reason"])
    assert core.status.refusals["denied"] == 2


async def test_a_name_that_does_not_resolve_at_the_relay_is_refused_as_not_found(
        tmp_path: Path) -> None:
    core = make_core(tmp_path, ["no-such-host.invalid:443"])
    with pytest.raises(DialError) as caught:
        await core.admit("edge-1", "no-such-host.invalid", 443, "tcp")
    assert caught.value.reason == Reason.NAME_NOT_FOUND
    assert core.status.refusals["name_not_found"] == 1


async def test_a_name_lookup_that_never_answers_is_given_up_audited_as_timed_out(
        tmp_path: Path) -> None:
    async def resolver_that_never_answers(host: str, port: int) -> list[Address]:
        never: asyncio.Future[list[Address]] = asyncio.get_running_loop().create_future()
        return await never

    core = RelayCore(parse_allow_list(["slow.example:443"]), AuditTrail(tmp_path / "audit.log"),
                     RelayStatus(), dialer=DirectDialer(timeout=5),
                     host_addresses=HostAddresses(), resolve_timeout=0.2,
                     resolver=resolver_that_never_answers)
    async with asyncio.timeout(10):   # without the relay's own limit, the lookup never ends
        with pytest.raises(DialError) as caught:
            await core.admit("edge-1", "slow.example", 443, "tcp")
    assert caught.value.reason == Reason.TIMED_OUT
    assert str(caught.value) == "the relay cannot resolve slow.example in time"
    (line,) = [e for e in audit_lines(tmp_path / "audit.log") if e["event"] == "relay.refused"]
    assert (line["destination"], line["refusal"]) == ("slow.example:443/tcp", "timed_out")
    assert line["reason"] == "no answer for slow.example within 0.2 s"
    assert core.status.refusals["timed_out"] == 1


async def test_a_refused_dial_is_audited_with_its_reason(tmp_path: Path) -> None:
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    core = make_core(tmp_path, [f"127.0.0.1:{port}"])
    stream = await core.admit("edge-1", "127.0.0.1", port, "tcp")
    with pytest.raises(DialError) as caught:
        await core.connect(stream, asyncio.Protocol)
    assert caught.value.reason == Reason.REFUSED
    (line,) = [e for e in audit_lines(tmp_path / "audit.log")
               if e["event"] == "relay.dial_failed"]
    assert line["refusal"] == "refused"
    assert core.status.streams == 0
