"""The RADIUS factor against the real FreeRADIUS (tests/peers/radius.py): groups from
Class or Filter-Id, rejection, an Access-Challenge round, failover past a dead server and
past one that does not share our secret and past one that never answers, replies without
a Message-Authenticator, an outage that does not count against the user, and the packets
going through the Dialer the factor is given (a real `portcullis serve relay`)."""

from __future__ import annotations

import hashlib
import hmac
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import Deployment, free_udp_port, run_cli
from peers.login import HASHER_KEY, BuildLogin, Login, flow, settings_for
from peers.radius import (
    ALICE,
    ALICE_CLASS,
    ALICE_FILTER_ID,
    ALICE_PASSWORD,
    BOB,
    BOB_PASSWORD,
    CHALLENGE_CODE,
    CHALLENGE_MESSAGE,
    DAVE,
    DAVE_PASSWORD,
    FreeRadius,
    configure_radius_flow,
    relay_audit,
    require_freeradius,
    start_freeradius,
    start_relay_to,
)
from portcullis.errors import ConfigError
from portcullis.identity.conditions import LoginContext
from portcullis.identity.login import Authenticated, Denied, NextStep
from portcullis.identity.providers import IdentityProviders
from portcullis.net.dialer import Dialer, DirectDialer
from portcullis.net.socksrelay import ClassicRelayDialer
from portcullis.net.tls import client_context
from portcullis.store import DurableStore, MemoryStore
from portcullis.tokens import TokenHasher

pytestmark = pytest.mark.peer

CLIENT = LoginContext("192.0.2.9")
SECRET_FILE = "radius.secret"
# Short enough that a server that never answers costs half a second, not three.
FAST = {"timeout": 0.5, "retries": 0}


def dead_address() -> str:
    # Nothing listens there: a request to it is never answered.
    return f"127.0.0.1:{free_udp_port()}"


@pytest.fixture
def make_login(freeradius: FreeRadius, build_login: BuildLogin, tmp_path: Path):  # type: ignore[no-untyped-def]
    """make_login(servers=..., secret=..., throttle=..., dialer=..., **provider
    overrides)."""

    def make(servers: list[str] | None = None, secret: bytes | None = None,
             throttle: dict[str, Any] | None = None, dialer: Dialer | None = None,
             **overrides: Any) -> Login:
        (tmp_path / SECRET_FILE).write_bytes((secret or freeradius.secret) + b"\n")
        provider = {**freeradius.provider("radius", SECRET_FILE, **FAST),
                    "servers": servers or [freeradius.endpoint], **overrides}
        return build_login(flow({"provider": "radius"}, providers=[provider]),
                           throttle=throttle, client=CLIENT, dialer=dialer)

    return make


@pytest.fixture(scope="module")
def other_secret_radius(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FreeRadius]:
    """A second FreeRADIUS whose client entry has a secret we do not have."""
    require_freeradius()
    server = start_freeradius(tmp_path_factory.mktemp("freeradius-other"),
                              secret=b"a-secret-portcullis-does-not-know")
    yield server
    server.stop()


@pytest.mark.parametrize(("attribute", "groups"), [
    ("Class", (ALICE_CLASS,)),
    ("Filter-Id", (ALICE_FILTER_ID,)),
])
async def test_accepted_user_gets_groups_from_the_configured_attribute(
        make_login, attribute: str, groups: tuple[str, ...]) -> None:  # type: ignore[no-untyped-def]
    login = make_login(group_attribute=attribute)
    # The name is canonicalised before it is sent: "Alice " is alice.
    claims = await login.claims("Alice ", ALICE_PASSWORD)
    assert claims.username == "alice" and claims.sub == "radius:alice"
    assert claims.idp == "radius" and claims.amr == ("radius",)
    assert claims.groups == groups


async def test_wrong_password_is_rejected_and_counted(make_login) -> None:  # type: ignore[no-untyped-def]
    login = make_login()
    assert isinstance(await login.sign_in(BOB, BOB_PASSWORD + "x"), Denied)
    assert login.last_failure().startswith("RADIUS rejected")
    assert await login.account_failures("radius:bob") == 1
    assert await login.address_failures() == 1
    assert isinstance(await login.sign_in("nobody", BOB_PASSWORD), Denied)
    assert login.last_failure().startswith("RADIUS rejected")
    # A success resets bob's count.
    assert (await login.claims(BOB, BOB_PASSWORD)).username == "bob"
    assert await login.account_failures("radius:bob") == 0


async def test_empty_password_is_refused_without_asking_the_server(make_login) -> None:  # type: ignore[no-untyped-def]
    login = make_login()
    assert isinstance(await login.sign_in(ALICE, ""), Denied)
    assert login.last_failure() == "empty or malformed user name or password"


async def test_a_challenge_becomes_the_next_prompt(make_login) -> None:  # type: ignore[no-untyped-def]
    login = make_login()
    first = await login.sign_in(DAVE, DAVE_PASSWORD)
    assert isinstance(first, NextStep)
    assert first.step.kind == "challenge"
    assert [prompt.name for prompt in first.step.prompts] == ["response"]
    assert first.step.prompts[0].label == CHALLENGE_MESSAGE
    assert first.step.prompts[0].secret


async def test_answering_the_challenge_with_the_code_signs_in(make_login) -> None:  # type: ignore[no-untyped-def]
    login = make_login()
    first = await login.sign_in(DAVE, DAVE_PASSWORD)
    assert isinstance(first, NextStep) and first.step.kind == "challenge"
    second = await login.submit(first.handle, {"response": CHALLENGE_CODE})
    assert isinstance(second, Authenticated), login.events()[-1:]
    assert second.session.claims.username == "dave"
    assert second.session.claims.amr == ("radius",)


async def test_a_wrong_challenge_code_is_denied_by_the_server(make_login) -> None:  # type: ignore[no-untyped-def]
    login = make_login()
    first = await login.sign_in(DAVE, DAVE_PASSWORD)
    assert isinstance(first, NextStep) and first.step.kind == "challenge"
    second = await login.submit(first.handle, {"response": "000000"})
    assert isinstance(second, Denied)
    assert login.last_failure().startswith("RADIUS rejected")
    assert login.events("login.failed")[-1]["user"] == "dave"
    assert await login.account_failures("radius:dave") == 1


async def test_a_wrong_challenge_code_is_denied(make_login) -> None:  # type: ignore[no-untyped-def]
    login = make_login()
    first = await login.sign_in(DAVE, DAVE_PASSWORD)
    assert isinstance(first, NextStep)
    assert isinstance(await login.submit(first.handle, {"response": "000000"}), Denied)
    assert not login.events("login.succeeded")


async def test_a_dead_first_server_fails_over_to_the_next(
        make_login, freeradius: FreeRadius) -> None:  # type: ignore[no-untyped-def]
    login = make_login(servers=[dead_address(), freeradius.endpoint])
    assert (await login.claims(ALICE, ALICE_PASSWORD)).groups == (ALICE_CLASS,)


async def test_a_server_with_another_secret_is_like_one_that_does_not_answer(
        make_login, freeradius: FreeRadius, other_secret_radius: FreeRadius) -> None:  # type: ignore[no-untyped-def]
    # It drops our request (its Message-Authenticator does not verify with its secret),
    # so the next server is asked.
    login = make_login(servers=[other_secret_radius.endpoint, freeradius.endpoint])
    assert (await login.claims(ALICE, ALICE_PASSWORD)).username == "alice"
    alone = make_login(servers=[other_secret_radius.endpoint])
    assert isinstance(await alone.sign_in(ALICE, ALICE_PASSWORD), Denied)
    assert alone.last_failure().startswith("RADIUS unavailable")
    assert await alone.account_failures("radius:alice") == 0


async def test_our_wrong_secret_is_an_outage_not_a_failure(
        make_login, freeradius: FreeRadius) -> None:  # type: ignore[no-untyped-def]
    login = make_login(secret=b"not-the-shared-secret", throttle={"account_failures": 1})
    assert isinstance(await login.sign_in(ALICE, ALICE_PASSWORD), Denied)
    assert login.last_failure().startswith("RADIUS unavailable")
    assert await login.account_failures("radius:alice") == 0
    assert not (await login.throttle.account("radius:alice")).locked


async def test_no_server_answering_denies_without_counting_a_failure(make_login) -> None:  # type: ignore[no-untyped-def]
    login = make_login(servers=[dead_address(), dead_address()],
                       throttle={"account_failures": 1, "address_failures": 1})
    # One counted failure would lock alice (account_failures=1) and refuse the address.
    assert isinstance(await login.sign_in(ALICE, ALICE_PASSWORD), Denied)
    reason = login.last_failure()
    assert reason.startswith("RADIUS unavailable") and reason.count("127.0.0.1:") == 2
    assert login.events("login.failed")[-1]["user"] == "alice"
    assert await login.account_failures("radius:alice") == 0
    assert not (await login.throttle.account("radius:alice")).locked
    assert await login.address_failures() == 0


async def test_a_server_that_never_answers_is_asked_again_then_the_next_one_is(
        make_login, freeradius: FreeRadius) -> None:  # type: ignore[no-untyped-def]
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))   # takes the requests in, never replies
    try:
        login = make_login(servers=[f"127.0.0.1:{silent.getsockname()[1]}",
                                    freeradius.endpoint], retries=1)
        assert (await login.claims(ALICE, ALICE_PASSWORD)).groups == (ALICE_CLASS,)
        silent.setblocking(False)
        asked = [silent.recv(4096), silent.recv(4096)]
        with pytest.raises(BlockingIOError):
            silent.recv(4096)
    finally:
        silent.close()
    # retries = 1: sent twice, the same datagram (same Identifier and authenticator).
    assert asked[0] == asked[1] and asked[0][0] == 1


class FakeRadius:
    """Answers every Access-Request with an Access-Accept that carries the right Response
    Authenticator, with or without a Message-Authenticator (a BLAST-RADIUS forger can
    make the former but not the latter)."""

    def __init__(self, secret: bytes, sign: bool) -> None:
        self.secret = secret
        self.sign = sign
        self.requests = 0
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = int(self.sock.getsockname()[1])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _reply(self, request: bytes) -> bytes:
        identifier, authenticator = request[1], request[4:20]
        attributes = b""
        if self.sign:
            blank = struct.pack("!BB", 80, 18) + bytes(16)
            header = struct.pack("!BBH", 2, identifier, 20 + len(blank))
            mac = hmac.new(self.secret, header + authenticator + blank, hashlib.md5).digest()
            attributes = struct.pack("!BB", 80, 18) + mac
        header = struct.pack("!BBH", 2, identifier, 20 + len(attributes))
        response = hashlib.md5(header + authenticator + attributes + self.secret).digest()
        return header + response + attributes

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                request, peer = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            if len(request) >= 20 and request[0] == 1:
                self.requests += 1
                self.sock.sendto(self._reply(request), peer)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.mark.parametrize("signed", [True, False])
async def test_a_reply_without_message_authenticator_is_not_believed(
        make_login, freeradius: FreeRadius, signed: bool) -> None:  # type: ignore[no-untyped-def]
    fake = FakeRadius(freeradius.secret, sign=signed)
    try:
        login = make_login(servers=[f"127.0.0.1:{fake.port}"])
        result = await login.sign_in(ALICE, "any password at all")
    finally:
        fake.close()
    assert fake.requests == 1
    if signed:
        # The fake is a correct RADIUS server: a signed Accept is taken.
        assert isinstance(result, Authenticated)
    else:
        assert isinstance(result, Denied)
        # Said as what it is, with what to change, not as a time-out.
        reason = login.last_failure()
        assert f"127.0.0.1:{fake.port}: answered without a Message-Authenticator" in reason
        assert "no answer" not in reason and "FreeRADIUS 3.2.5" in reason
        # Not the user's fault: nothing counted against alice.
        assert await login.account_failures("radius:alice") == 0


async def test_a_missing_secret_file_is_a_config_error_naming_the_key(
        durable: DurableStore, tmp_path: Path) -> None:
    provider = {"type": "radius", "name": "radius", "servers": ["127.0.0.1:1812"],
                "secret_file": "nope/radius.secret", **FAST}
    settings = settings_for(flow({"provider": "radius"}, providers=[provider]), tmp_path)
    providers = IdentityProviders(settings, durable, MemoryStore(), TokenHasher(HASHER_KEY),
                                  dialer=DirectDialer())
    with pytest.raises(ConfigError) as raised:
        providers.flow()
    assert raised.value.key == "auth.providers[0].secret_file"


async def test_answers_longer_than_radius_allows_are_refused_not_crashed(
        make_login) -> None:  # type: ignore[no-untyped-def]
    """RFC 2865: User-Password at most 128 octets, User-Name 253; pyrad would raise."""
    login = make_login()
    assert await login.sign_in(ALICE, "x" * 200) == Denied()
    assert login.last_failure() == "user name or password too long for RADIUS"
    assert await login.sign_in("a" * 300, ALICE_PASSWORD) == Denied()


async def test_every_spelling_reaches_freeradius_and_the_lockout_as_one_name(make_login) -> None:  # type: ignore[no-untyped-def]
    login = make_login(throttle={"account_failures": 3})
    # FreeRADIUS knows "alice": the full-width, upper-case spelling is sent as that.
    assert (await login.claims("ＡＬＩＣＥ", ALICE_PASSWORD)).username == "alice"
    for typed in ("ALICE", "ａｌｉｃｅ", " Alice "):
        assert isinstance(await login.sign_in(typed, "not-her-password"), Denied)
    assert await login.account_failures("radius:alice") == 3
    assert isinstance(await login.sign_in("alice", ALICE_PASSWORD), Denied)
    assert login.last_failure() == "account locked"


# -- through the node's Dialer: a real relay in the loop ---------------------------------

@pytest.fixture
def relay_to_freeradius(deployment: Deployment, start_process,  # type: ignore[no-untyped-def]
                        freeradius: FreeRadius) -> str:
    return start_relay_to(freeradius, deployment, start_process)


async def test_radius_packets_go_through_the_dialer_it_is_given(
        make_login, freeradius: FreeRadius, deployment: Deployment,
        relay_to_freeradius: str) -> None:  # type: ignore[no-untyped-def]
    pki = deployment.directory / "pki"
    dialer = ClassicRelayDialer(relay_to_freeradius, client_context(
        pki / "ca.crt", cert_file=pki / "gateway.crt", key_file=pki / "gateway.key"))
    # The first server is outside the relay's allow-list: refused there, so the next one
    # is asked, through the relay too.
    blocked = dead_address()
    login = make_login(servers=[blocked, freeradius.endpoint], dialer=dialer)
    first = await login.sign_in(DAVE, DAVE_PASSWORD)
    assert isinstance(first, NextStep) and first.step.kind == "challenge"
    second = await login.submit(first.handle, {"response": CHALLENGE_CODE})
    assert isinstance(second, Authenticated), login.events()[-1:]
    refused = relay_audit(deployment, "relay.refused", f"{blocked}/udp")
    assert refused["refusal"] == "denied"
    carried = relay_audit(deployment, "relay.stream", f"{freeradius.endpoint}/udp")
    assert carried["address"] == freeradius.address
    assert int(carried["bytes_to_edge"]) > 0 and int(carried["bytes_from_edge"]) > 0


# -- commands that ask RADIUS from their own process (`auth test`, `policy explain`) -----

def auth_test_alice(deployment: Deployment) -> str:
    result = run_cli("auth", "test", "--user", ALICE, "--answer", f"password={ALICE_PASSWORD}",
                     "--dir", str(deployment.directory))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"passed  radius as {ALICE}" in result.stdout
    return result.stdout


def test_auth_test_asks_radius_through_the_relay_in_classic_mode(
        deployment: Deployment, freeradius: FreeRadius, relay_to_freeradius: str) -> None:
    configure_radius_flow(deployment, freeradius,
                          f'via = "relay"\nrelay = "{relay_to_freeradius}"\n')
    auth_test_alice(deployment)
    relay_audit(deployment, "relay.stream", f"{freeradius.endpoint}/udp")


def test_auth_test_in_dial_out_mode_says_it_asks_radius_directly(
        deployment: Deployment, freeradius: FreeRadius) -> None:
    # The relays' connections belong to the gateway process, not to this command.
    configure_radius_flow(deployment, freeradius, 'via = "relay"\nmode = "dial-out"\n')
    shown = auth_test_alice(deployment)
    assert "dial-out" in shown and "asks the RADIUS servers directly from this host" in shown
