"""RADIUS (RFC 2865): PAP with Message-Authenticator, challenges, failover.

Every request carries a Message-Authenticator and every reply must carry a valid one
(the BLAST-RADIUS defence), so a forged or unsigned reply is dropped like a lost packet;
when a server's only answers were such unsigned (otherwise correct) replies, the audit
and the log say so, and what to set on the server, instead of "no answer".
An Access-Challenge (RSA SecurID, DUO and other proxies use it) becomes the next prompt,
its Reply-Message the label, its State kept in the flow and echoed back. Servers are
tried in order: a timeout moves on to the next one. The packets go through the node's
Dialer, so with a relay they leave from the relay like every other inward connection.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from pyrad import packet
from pyrad.dictionary import Dictionary

from portcullis.config.auth import RadiusProvider
from portcullis.config.values import parse_host_port
from portcullis.errors import DialError
from portcullis.identity.claims import Attributes
from portcullis.identity.conditions import LoginContext
from portcullis.identity.factors.prompts import password_step, typed_username
from portcullis.identity.flow import (
    Attempt,
    FactorOutcome,
    Failed,
    FlowState,
    Passed,
    Prompt,
    Refused,
    Retry,
    Step,
    Unavailable,
)
from portcullis.net.dialer import Dialer

log = structlog.get_logger("portcullis.identity.radius")
DICTIONARY = Path(__file__).with_name("radius.dictionary")
MAX_STATE = 253            # one RADIUS attribute's worth
MAX_USER_NAME = 253
MAX_PASSWORD = 128         # User-Password: at most 128 octets (RFC 2865 5.2)


@dataclass(frozen=True)
class RadiusReply:
    code: int                         # packet.AccessAccept / AccessReject / AccessChallenge
    message: str | None
    state: bytes | None
    groups: tuple[str, ...]


class RadiusUnavailable(Exception):
    """No configured server answered."""


# What the administrator must change when a server answers without Message-Authenticator.
UNSIGNED_REPLIES = (
    "answered without a Message-Authenticator, so its replies were dropped (BLAST-RADIUS, "
    "CVE-2024-3596; Portcullis has no setting to accept them): make the server sign its "
    "replies (FreeRADIUS 3.2.5 or later always does; Windows NPS: the July 2024 update with "
    "requireMsgAuth; a proxy on the way must do so too)")


class _Replies(asyncio.DatagramProtocol):
    """The datagrams that come back on one server's connected UDP flow, for the request
    to judge; an error on the flow (an ICMP port unreachable, a relay's stream that
    ended) ends the wait for this server."""

    def __init__(self) -> None:
        self.arrived: asyncio.Queue[bytes | Exception] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.arrived.put_nowait(data)

    def error_received(self, exc: Exception) -> None:
        self.arrived.put_nowait(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.arrived.put_nowait(exc or ConnectionResetError("the flow to the server ended"))


class _NoAnswer(Exception):
    """A server gave no reply that verifies; `unsigned`: how many of its replies were
    dropped only because they lacked a Message-Authenticator."""

    def __init__(self, message: str, unsigned: int) -> None:
        super().__init__(message)
        self.unsigned = unsigned


class RadiusServers:
    """The servers of one `[[auth.providers]]` of type radius, asked through `dialer`
    (the node's one Dialer: with a relay, RADIUS goes through it like everything else).

    pyrad encodes the packets and verifies the replies; the exchange itself is ours, on
    the event loop, because pyrad's clients make their own sockets."""

    def __init__(self, settings: RadiusProvider, secret: bytes, dialer: Dialer) -> None:
        self.settings = settings
        self._secret = secret
        self._dialer = dialer
        self._dictionary = Dictionary(str(DICTIONARY))

    async def authenticate(self, username: str, password: str, state: bytes | None,
                           client_address: str) -> RadiusReply:
        errors: list[str] = []
        for server in self.settings.servers:
            host, port = parse_host_port(server, what="RADIUS server")
            request = packet.AuthPacket(code=packet.AccessRequest, secret=self._secret,
                                        dict=self._dictionary, message_authenticator=True,
                                        User_Name=username,
                                        NAS_Identifier=self.settings.nas_identifier)
            request["User-Password"] = request.PwCrypt(password)
            request["Calling-Station-Id"] = client_address
            if state is not None:
                request["State"] = state
            try:
                reply = await self._ask(host, port, request)
            except DialError as exc:
                errors.append(f"{server}: {exc}")
                log.warning("RADIUS server could not be reached", provider=self.settings.name,
                            server=server, error=str(exc))
                continue
            except _NoAnswer as exc:
                if exc.unsigned:
                    errors.append(f"{server}: {UNSIGNED_REPLIES}")
                    log.error("RADIUS replies without Message-Authenticator dropped",
                              provider=self.settings.name, server=server,
                              replies=exc.unsigned, fix=UNSIGNED_REPLIES)
                    continue
                errors.append(f"{server}: {exc}")
                log.warning("RADIUS server did not answer", provider=self.settings.name,
                            server=server, error=str(exc))
                continue
            return self._reply(reply)
        raise RadiusUnavailable("; ".join(errors))

    async def _ask(self, host: str, port: int, request: packet.AuthPacket) -> packet.Packet:
        """Send `request` (again after each `timeout`, `retries` times) and return the
        first reply that verifies; anything else that arrives is dropped like a lost
        packet. A retransmission is the same datagram: same Identifier and authenticator
        (RFC 2865 2.5), so a late reply to an earlier one is as good."""
        transport, replies = await self._dialer.connect_udp(host, port, _Replies)
        datagram = request.RequestPacket()
        unsigned = 0
        loop = asyncio.get_running_loop()
        try:
            for _ in range(self.settings.retries + 1):
                transport.sendto(datagram)
                try:
                    async with asyncio.timeout_at(loop.time() + self.settings.timeout):
                        while True:
                            arrived = await replies.arrived.get()
                            if isinstance(arrived, Exception):
                                raise _NoAnswer(str(arrived) or repr(arrived), unsigned)
                            reply, only_unsigned = self._verified(request, arrived)
                            if reply is not None:
                                return reply
                            unsigned += only_unsigned
                except TimeoutError:
                    continue
            raise _NoAnswer("no answer", unsigned)
        finally:
            transport.close()

    @staticmethod
    def _verified(request: packet.AuthPacket, datagram: bytes
                  ) -> tuple[packet.Packet | None, bool]:
        """(the reply, False) when `datagram` is a reply to `request` with the right
        Response Authenticator and a valid Message-Authenticator, else (None, whether
        the Message-Authenticator is all it lacks: the count that names the server's
        misconfiguration rather than a forgery or noise)."""
        try:
            reply = request.CreateReply(packet=datagram)
        except (packet.PacketError, struct.error, ValueError, LookupError):
            # Decoded before it can be verified: whatever arrives must not end the sign-in.
            return None, False
        if request.VerifyReply(reply, datagram, enforce_ma=True):
            return reply, False
        # A Message-Authenticator that is there is checked either way: valid without
        # enforcement means there was none.
        return None, bool(request.VerifyReply(reply, datagram, enforce_ma=False))

    def _reply(self, reply: packet.Packet) -> RadiusReply:
        messages = reply.get("Reply-Message") or []
        states = reply.get("State") or []
        values = reply.get(self.settings.group_attribute) or []
        groups = tuple(v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
                       for v in values)
        return RadiusReply(reply.code, " ".join(messages) or None,
                           states[0] if states else None, groups)


class RadiusFactor:
    kind = "password"
    primary = True

    def __init__(self, name: str, servers: RadiusServers) -> None:
        self.name = name
        self._servers = servers

    async def step(self, state: FlowState, context: LoginContext) -> Step:
        if "radius_state" in state.data:
            label = state.data.get("radius_prompt") or "Response"
            return Step(kind="challenge", title="One more step",
                        prompts=(Prompt("response", label, secret=True),), message=label)
        return password_step(state)

    async def verify(self, state: FlowState, answers: Mapping[str, str],
                     attempt: Attempt) -> FactorOutcome:
        username = typed_username(state, answers)
        challenged = "radius_state" in state.data
        secret = answers.get("response" if challenged else "password", "")
        if username is None or not secret:
            return Failed("empty or malformed user name or password")
        if len(username.encode()) > MAX_USER_NAME or len(secret.encode()) > MAX_PASSWORD:
            # RFC 2865 limits; pyrad would raise rather than send them.
            return Failed("user name or password too long for RADIUS", username)
        if not await attempt.admit(username):
            return Refused("account locked", username)
        radius_state = bytes.fromhex(state.data["radius_state"]) if challenged else None
        try:
            reply = await self._servers.authenticate(username, secret, radius_state,
                                                     attempt.context.client_address)
        except RadiusUnavailable as exc:
            log.error("no RADIUS server answered", provider=self.name, error=str(exc))
            return Unavailable(f"RADIUS unavailable: {exc}", username)
        if reply.code == packet.AccessChallenge and reply.state and len(reply.state) <= MAX_STATE:
            state.data["radius_state"] = reply.state.hex()
            state.data["radius_prompt"] = (reply.message or "Response")[:200]
            return Retry("RADIUS challenge", username)
        if reply.code == packet.AccessAccept:
            return Passed("RADIUS accepted", username,
                          Attributes(groups=reply.groups))
        detail = f" ({reply.message})" if reply.message else ""
        return Failed(f"RADIUS rejected{detail}", username)
