"""The device authorization grant (RFC 8628) through the login service, for a CLI whose
browser cannot reach its loopback (an ssh session): the "device" step, the polls, and the
session. Against the real oidc-provider of tests/peers/oidc.py (its `deviceFlow`), whose
device pages the test drives as the user's other device. The proxy in front of it
counts the token endpoint's requests, so what the gateway asks the provider is seen.

The provider names no interval (RFC 8628's default, 5 s, applies); the tests' proxy
makes it 1 s so that a real pending poll costs a second, not five."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from peers.login import CLIENT, BuildLogin, Login, flow
from peers.oidc import (
    CLIENT_SECRET,
    OidcPeer,
    device_sign_in,
    start_oidc_provider,
)
from portcullis.config.auth import Flow, FlowStep
from portcullis.identity.flow import (
    MAX_ROUNDS,
    AskStep,
    Finish,
    FlowState,
    Passed,
    Pending,
    decide,
)
from portcullis.identity.login import Authenticated, Denied, LoginResult, NextStep

INTERVAL = 1


def with_interval(body: dict[str, Any]) -> dict[str, Any]:
    return {**body, "interval": INTERVAL}


def test_pending_answers_are_no_rounds_however_long_the_wait() -> None:
    """A five-minute wait polled every second is 300 answers: MAX_ROUNDS must not end it;
    the factor's code expiry does."""
    definition = Flow(name="f", steps=[FlowStep(provider="idp")])
    state = FlowState(flow="f", device=True)
    for _ in range(MAX_ROUNDS * 20):
        decision = decide(definition, frozenset({"idp"}), state, Pending("authorization_pending"),
                          CLIENT)
        assert decision.action == AskStep(0) and decision.events == ()
        state = decision.state
    assert state.rounds == 0
    done = decide(definition, frozenset({"idp"}), state, Passed("signed in", "alice"), CLIENT)
    assert done.action == Finish("alice")


@pytest.fixture
async def login(build_login: BuildLogin, oidc_provider: OidcPeer,
                tmp_path: Path) -> AsyncIterator[Login]:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "oidc").write_text(CLIENT_SECRET)
    built = build_login(flow({"provider": "idp"},
                             providers=[oidc_provider.provider(preset="okta")]))
    oidc_provider.proxy.tamper_device = with_interval
    yield built
    oidc_provider.proxy.tamper_device = None
    oidc_provider.proxy.tamper_token = None
    oidc_provider.proxy.token_error = None
    await built.providers.close()


async def begin_device(login: Login) -> NextStep:
    begun = await login.service.begin(CLIENT, device=True)
    assert isinstance(begun, NextStep), login.events()[-1:]
    assert begun.step.kind == "device" and begun.step.device is not None
    return begun


async def poll_after_interval(login: Login, handle: str) -> LoginResult:
    await asyncio.sleep(INTERVAL + 0.2)
    return await login.submit(handle, {})


@pytest.mark.peer
async def test_a_device_sign_in_gives_a_session_and_pending_polls_do_not_exhaust_it(
        login: Login, oidc_provider: OidcPeer) -> None:
    begun = await begin_device(login)
    shown = begun.step.to_json()["device"]
    assert isinstance(shown, dict)
    assert shown["verification_uri"] == f"{oidc_provider.issuer}/device"
    assert shown["user_code"] in shown["verification_uri_complete"]
    assert shown["interval"] == INTERVAL and 0 < shown["expires_in"] <= 600
    # The device code is the secret: it is never shown (it stays in the sealed state).
    assert "device_code" not in json.dumps(begun.step.to_json())
    token_requests = oidc_provider.proxy.count("/token")
    # A real wait: the provider says authorization_pending, the step is asked again.
    pending = await poll_after_interval(login, begun.handle)
    assert isinstance(pending, NextStep) and pending.step.kind == "device"
    assert pending.step.device is not None and pending.step.device.user_code == shown["user_code"]
    assert oidc_provider.proxy.count("/token") == token_requests + 1
    # More answers than MAX_ROUNDS (sooner than the interval: the provider is not asked).
    for _ in range(MAX_ROUNDS + 4):
        again = await login.submit(begun.handle, {})
        assert isinstance(again, NextStep) and again.step.kind == "device"
    await device_sign_in(str(shown["verification_uri"]), str(shown["user_code"]), "alice")
    done = await poll_after_interval(login, begun.handle)
    assert isinstance(done, Authenticated), login.events()[-2:]
    claims = done.session.claims
    assert (claims.username, claims.amr, claims.groups) == ("alice", ("idp",),
                                                            ("staff", "Finance"))
    assert login.events("login.succeeded")[-1]["user"] == "alice"
    assert not login.events("login.failed")


@pytest.mark.peer
async def test_a_client_polling_too_fast_does_not_make_the_gateway_poll_faster(
        login: Login, oidc_provider: OidcPeer) -> None:
    begun = await begin_device(login)
    before = oidc_provider.proxy.count("/token")
    # Twenty answers in a row, far sooner than the interval: none reaches the provider.
    for _ in range(20):
        assert isinstance(await login.submit(begun.handle, {}), NextStep)
    assert oidc_provider.proxy.count("/token") == before
    # One interval later, one answer: one request.
    assert isinstance(await poll_after_interval(login, begun.handle), NextStep)
    for _ in range(5):
        assert isinstance(await login.submit(begun.handle, {}), NextStep)
    assert oidc_provider.proxy.count("/token") == before + 1


@pytest.mark.peer
async def test_slow_down_lengthens_the_interval_the_gateway_keeps(
        login: Login, oidc_provider: OidcPeer) -> None:
    """RFC 8628 3.5: slow_down adds 5 s to the interval, for the client and the gateway."""
    begun = await begin_device(login)
    oidc_provider.proxy.token_error = {"error": "slow_down"}
    before = oidc_provider.proxy.count("/token")
    slowed = await poll_after_interval(login, begun.handle)
    assert isinstance(slowed, NextStep) and slowed.step.device is not None
    assert slowed.step.device.interval == INTERVAL + 5
    assert oidc_provider.proxy.count("/token") == before + 1
    # The old interval is no longer enough.
    assert isinstance(await poll_after_interval(login, begun.handle), NextStep)
    assert oidc_provider.proxy.count("/token") == before + 1


@pytest.mark.peer
async def test_a_device_authorization_the_user_aborts_is_refused_and_audited(
        login: Login) -> None:
    begun = await begin_device(login)
    assert begun.step.device is not None
    page = await device_sign_in(begun.step.device.verification_uri,
                                begun.step.device.user_code, "alice", abort=True)
    assert "interrupted" in page or "access_denied" in page
    denied = await poll_after_interval(login, begun.handle)
    assert isinstance(denied, Denied)
    assert login.last_failure().startswith("the token endpoint refused the device code: "
                                           "access_denied")
    assert login.events("login.failed")[-1]["factor"] == "idp"


@pytest.mark.peer
async def test_a_device_code_past_its_expiry_is_refused_without_asking_the_provider(
        login: Login, oidc_provider: OidcPeer) -> None:
    oidc_provider.proxy.tamper_device = lambda body: {**with_interval(body), "expires_in": 1}
    begun = await begin_device(login)
    before = oidc_provider.proxy.count("/token")
    denied = await poll_after_interval(login, begun.handle)
    assert isinstance(denied, Denied)
    assert login.last_failure() == ("the device code expired before the user signed in at "
                                    "the provider")
    assert oidc_provider.proxy.count("/token") == before


@pytest.mark.peer
async def test_a_device_sign_ins_id_token_is_checked_as_the_code_flows(
        login: Login, oidc_provider: OidcPeer) -> None:
    oidc_provider.proxy.tamper_token = lambda body: {
        **body, "id_token": oidc_provider.resign(body["id_token"], aud="another-client")}
    begun = await begin_device(login)
    assert begun.step.device is not None
    await device_sign_in(begun.step.device.verification_uri, begun.step.device.user_code,
                         "alice")
    denied = await poll_after_interval(login, begun.handle)
    assert isinstance(denied, Denied)
    assert login.last_failure() == ("the ID token is for ['another-client'], not for "
                                    "client 'portcullis'")


@pytest.mark.peer
async def test_a_provider_with_device_grant_off_gets_the_redirect_step(
        build_login: BuildLogin, oidc_provider: OidcPeer, tmp_path: Path) -> None:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "oidc").write_text(CLIENT_SECRET)
    login = build_login(flow({"provider": "idp"},
                             providers=[oidc_provider.provider(device_grant=False)]))
    before = oidc_provider.proxy.count("/device/auth")
    begun = await login.service.begin(CLIENT, device=True)
    assert isinstance(begun, NextStep) and begun.step.kind == "redirect"
    assert oidc_provider.proxy.count("/device/auth") == before
    await login.providers.close()


@pytest.mark.peer
async def test_a_provider_without_device_authorization_gets_the_redirect_step(
        build_login: BuildLogin, tmp_path: Path) -> None:
    """The fallback: the CLI then uses its loopback, as without --device."""
    peer = start_oidc_provider(tmp_path / "idp", device_flow=False)
    try:
        (tmp_path / "secrets").mkdir()
        (tmp_path / "secrets" / "oidc").write_text(CLIENT_SECRET)
        login = build_login(flow({"provider": "idp"}, providers=[peer.provider()]))
        begun = await login.service.begin(CLIENT, device=True)
        assert isinstance(begun, NextStep) and begun.step.kind == "redirect"
        assert begun.step.redirect is not None
        assert begun.step.redirect.url.startswith(f"{peer.issuer}/auth?")
        await login.providers.close()
    finally:
        peer.close()
