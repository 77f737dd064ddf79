"""The STA client of gateways and portals, against a real STA process (mutual TLS):
its connections are made by the Dialer it is given, whichever that is."""

from __future__ import annotations

import pytest

from conftest import Deployment, free_port
from peers.dialers import CarryingDialer
from portcullis.errors import TicketError
from portcullis.net.dialer import DirectDialer
from portcullis.net.tls import client_context
from portcullis.sta.authority import TicketRequest
from portcullis.sta.client import RemoteTicketAuthority

REQUEST = TicketRequest(user="alice", resource="wiki", address="10.0.0.5:80",
                        client_address="192.0.2.7")


def gateway_tls(deployment: Deployment):  # type: ignore[no-untyped-def]
    pki = deployment.directory / "pki"
    return client_context(deployment.ca, cert_file=pki / "gateway.crt",
                          key_file=pki / "gateway.key")


async def test_a_remote_sta_issues_and_redeems_over_the_dialer_it_is_given(
        deployment: Deployment, start_process) -> None:  # type: ignore[no-untyped-def]
    sta = start_process("serve", "sta", "--dir", str(deployment.directory), name="sta")
    sta.wait_for(r"sta listening on")
    dialer = CarryingDialer()
    remote = RemoteTicketAuthority(f"https://127.0.0.1:{deployment.port + 2}",
                                   gateway_tls(deployment), dialer)
    try:
        issued = await remote.issue(REQUEST)
        grant = await remote.redeem(issued.ticket, "192.0.2.7")
        with pytest.raises(TicketError, match="refused the ticket"):
            await remote.redeem(issued.ticket, "192.0.2.7")
    finally:
        await remote.close()
    assert (grant.user, grant.resource, grant.address) == ("alice", "wiki", "10.0.0.5:80")
    assert dialer.dials == 1   # one kept-alive connection, made by the Dialer
    assert "ticket.redeemed" in sta.output()


async def test_an_sta_the_dialer_cannot_reach_is_a_ticket_error_that_says_why(
        deployment: Deployment) -> None:
    port = free_port()
    remote = RemoteTicketAuthority(f"https://127.0.0.1:{port}", gateway_tls(deployment),
                                   DirectDialer())
    try:
        with pytest.raises(TicketError, match=r"cannot reach the STA .* refused the connection"):
            await remote.redeem("STA01.x", None)
    finally:
        await remote.close()
