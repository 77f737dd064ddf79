"""The FreeRADIUS peer (tests/peers/radius.py) answers pyrad and radclient the way the
RADIUS tests expect: accept with Class/Filter-Id, reject, a challenge round, and no
answer at all to a request without Message-Authenticator."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from pyrad import packet
from pyrad.client import Client, Timeout
from pyrad.dictionary import Dictionary

from conftest import require_program
from peers.radius import (
    ALICE,
    ALICE_CLASS,
    ALICE_FILTER_ID,
    ALICE_REPLY_MESSAGE,
    BOB,
    CHALLENGE_CODE,
    CHALLENGE_MESSAGE,
    DAVE,
    DAVE_REPLY_MESSAGE,
    USERS,
    FreeRadius,
    start_freeradius,
)

pytestmark = pytest.mark.peer


def client(server: FreeRadius, timeout: float = 2.0) -> Client:
    # pyrad's retries is the number of sends in total: 0 would never send at all.
    return Client(
        server=server.address, authport=server.port, secret=server.secret,
        dict=Dictionary(str(server.dictionary)), retries=1, timeout=timeout,
        enforce_ma=True,
    )


def access_request(
    radius: Client, user: str, password: str, state: bytes | None = None
) -> packet.AuthPacket:
    # CreateAuthPacket adds a Message-Authenticator when the packet is encoded.
    request = radius.CreateAuthPacket(
        code=packet.AccessRequest, User_Name=user, NAS_Identifier="portcullis-test"
    )
    request["User-Password"] = request.PwCrypt(password)
    if state is not None:
        request["State"] = state
    return request


def test_accept_carries_class_filter_id_and_reply_message(freeradius: FreeRadius) -> None:
    radius = client(freeradius)
    reply = radius.SendPacket(access_request(radius, ALICE, USERS[ALICE]))
    assert reply.code == packet.AccessAccept
    assert reply["Class"] == [ALICE_CLASS.encode()]  # octets in RFC 2865
    assert reply["Filter-Id"] == [ALICE_FILTER_ID]
    assert reply["Reply-Message"] == [ALICE_REPLY_MESSAGE]
    # The server signs its replies; enforce_ma=True made the client check that.
    assert reply.message_authenticator


def test_wrong_password_is_rejected(freeradius: FreeRadius) -> None:
    radius = client(freeradius)
    reply = radius.SendPacket(access_request(radius, BOB, "not-" + USERS[BOB]))
    assert reply.code == packet.AccessReject
    assert "Class" not in reply


def test_unknown_user_is_rejected(freeradius: FreeRadius) -> None:
    radius = client(freeradius)
    reply = radius.SendPacket(access_request(radius, "mallory", "whatever"))
    assert reply.code == packet.AccessReject


def challenge(radius: Client) -> bytes:
    reply = radius.SendPacket(access_request(radius, DAVE, USERS[DAVE]))
    assert reply.code == packet.AccessChallenge
    assert reply["Reply-Message"] == [CHALLENGE_MESSAGE]
    (state,) = reply["State"]
    assert isinstance(state, bytes) and state
    return state


def test_challenge_then_right_code_is_accepted(freeradius: FreeRadius) -> None:
    radius = client(freeradius)
    state = challenge(radius)
    reply = radius.SendPacket(access_request(radius, DAVE, CHALLENGE_CODE, state))
    assert reply.code == packet.AccessAccept
    assert reply["Reply-Message"] == [DAVE_REPLY_MESSAGE]


def test_challenge_then_wrong_code_is_rejected(freeradius: FreeRadius) -> None:
    radius = client(freeradius)
    state = challenge(radius)
    reply = radius.SendPacket(access_request(radius, DAVE, "000000", state))
    assert reply.code == packet.AccessReject


def test_code_without_the_challenge_state_is_rejected(freeradius: FreeRadius) -> None:
    radius = client(freeradius)
    challenge(radius)
    reply = radius.SendPacket(access_request(radius, DAVE, CHALLENGE_CODE, b"\x00" * 16))
    assert reply.code == packet.AccessReject


def test_wrong_password_gets_no_challenge(freeradius: FreeRadius) -> None:
    radius = client(freeradius)
    reply = radius.SendPacket(access_request(radius, DAVE, "not-" + USERS[DAVE]))
    assert reply.code == packet.AccessReject


def test_request_without_message_authenticator_is_dropped(freeradius: FreeRadius) -> None:
    radius = client(freeradius, timeout=1.0)
    request = radius.CreateAuthPacket(
        code=packet.AccessRequest, User_Name=ALICE, message_authenticator=False
    )
    request["User-Password"] = request.PwCrypt(USERS[ALICE])
    assert 80 not in request.keys()  # noqa: SIM118 - Packet.keys() names attributes
    with pytest.raises(Timeout):
        radius.SendPacket(request)


def test_wrong_secret_gets_no_answer(freeradius: FreeRadius) -> None:
    radius = client(freeradius, timeout=1.0)
    radius.secret = b"not-the-secret"
    with pytest.raises(Timeout):
        radius.SendPacket(access_request(radius, ALICE, USERS[ALICE]))


def test_radclient_gets_accept(freeradius: FreeRadius) -> None:
    radclient = require_program("radclient")   # under CI a missing one fails
    result = subprocess.run(
        [radclient, "-x", "-r", "1", "-t", "2", f"{freeradius.address}:{freeradius.port}",
         "auth", freeradius.secret.decode()],
        input=f'User-Name = "{ALICE}", User-Password = "{USERS[ALICE]}", '
              "Message-Authenticator = 0x00\n",
        capture_output=True, text=True, timeout=10, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Received Access-Accept" in result.stdout
    assert f'Filter-Id = "{ALICE_FILTER_ID}"' in result.stdout


def test_two_servers_run_side_by_side(
    freeradius: FreeRadius, tmp_path: Path
) -> None:
    second = start_freeradius(tmp_path, secret=b"second-secret")
    try:
        assert second.port != freeradius.port
        radius = client(second)
        reply = radius.SendPacket(access_request(radius, ALICE, USERS[ALICE]))
        assert reply.code == packet.AccessAccept
    finally:
        second.stop()
    assert not second.running()
    # After the stop nothing answers on that port any more: a dead server for failover.
    with pytest.raises(Timeout):
        dead = client(second, timeout=0.5)
        dead.SendPacket(access_request(dead, ALICE, USERS[ALICE]))
