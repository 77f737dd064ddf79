"""`auth.totp.enrolment = "code"`: knowing a password is not enough to enrol the first
authenticator app; the enrolment step asks for the single-use, expiring code an
administrator issued, and a wrong, spent or expired code ends the sign-in, audited."""

from __future__ import annotations

import time

import pytest

from peers.login import HASHER_KEY, BuildLogin, Login, flow
from peers.totp import oathtool_code
from portcullis.config.auth import TotpProvider
from portcullis.identity.login import Authenticated, Denied, NextStep
from portcullis.identity.passwords import hash_password
from portcullis.identity.totp import TotpService
from portcullis.store import DurableStore, MemoryStore
from portcullis.tokens import TokenHasher

ALICE = "local:alice"


@pytest.fixture
async def login(durable: DurableStore, build_login: BuildLogin) -> Login:
    await durable.add_user("alice", hash_password("pw"), ["staff"])
    return build_login(flow({"provider": "local"}, {"provider": "totp"},
                            totp={"enrolment": "code"}))


async def asked_for_the_code(login: Login) -> NextStep:
    step = await login.sign_in("alice", "pw")
    assert isinstance(step, NextStep) and step.step.kind == "totp-enrolment-code"
    # No secret is shown before the code.
    assert step.step.enrolment is None
    assert [prompt.name for prompt in step.step.prompts] == ["enrolment_code"]
    return step


async def test_a_password_alone_does_not_enrol_an_authenticator(login: Login,
                                                                durable: DurableStore) -> None:
    step = await asked_for_the_code(login)
    assert await login.submit(step.handle, {"enrolment_code": ""}) == Denied()
    assert login.last_failure() == "no enrolment code issued"
    assert await durable.get_totp(ALICE) is None


async def test_an_issued_code_lets_the_user_enrol_once(login: Login,
                                                       durable: DurableStore) -> None:
    code, _expires = await login.totp.issue_enrolment_code(ALICE, 3600)
    step = await asked_for_the_code(login)
    # Typed as people type: upper case, without the dash.
    shown = await login.submit(step.handle, {"enrolment_code": code.upper().replace("-", "")})
    assert isinstance(shown, NextStep) and shown.step.kind == "totp-enrol"
    assert shown.step.enrolment is not None
    secret = shown.step.enrolment["secret"]
    done = await login.submit(shown.handle, {"code": oathtool_code(secret)})
    assert isinstance(done, Authenticated) and done.session.claims.amr == ("local", "totp")
    assert await durable.get_totp(ALICE) is not None
    # After a reset the same code no longer works: it was spent.
    assert await login.totp.reset(ALICE)
    again = await asked_for_the_code(login)
    assert await login.submit(again.handle, {"enrolment_code": code}) == Denied()
    assert login.last_failure() == "no enrolment code issued"


async def test_a_wrong_code_is_refused_audited_and_counted_and_the_right_one_still_works(
        login: Login) -> None:
    code, _expires = await login.totp.issue_enrolment_code(ALICE, 3600)
    step = await asked_for_the_code(login)
    assert await login.submit(step.handle, {"enrolment_code": "aaaaa-aaaaa"}) == Denied()
    failure = login.events("login.failed")[-1]
    assert failure["reason"] == "wrong enrolment code" and failure["user"] == "alice"
    assert await login.account_failures(ALICE) == 1
    retry = await asked_for_the_code(login)
    shown = await login.submit(retry.handle, {"enrolment_code": code})
    assert isinstance(shown, NextStep) and shown.step.kind == "totp-enrol"


async def test_an_expired_code_is_refused(login: Login, durable: DurableStore) -> None:
    # Issued an hour ago, valid for a minute.
    earlier = TotpService(TotpProvider(type="totp", name="totp"), durable, MemoryStore(),
                          TokenHasher(HASHER_KEY), clock=lambda: time.time() - 3600)
    code, _expires = await earlier.issue_enrolment_code(ALICE, 60)
    step = await asked_for_the_code(login)
    assert await login.submit(step.handle, {"enrolment_code": code}) == Denied()
    assert login.last_failure() == "enrolment code expired"


async def test_with_self_enrolment_no_code_is_asked(durable: DurableStore,
                                                    build_login: BuildLogin) -> None:
    await durable.add_user("alice", hash_password("pw"), ["staff"])
    login = build_login(flow({"provider": "local"}, {"provider": "totp"}))
    step = await login.sign_in("alice", "pw")
    assert isinstance(step, NextStep) and step.step.kind == "totp-enrol"
