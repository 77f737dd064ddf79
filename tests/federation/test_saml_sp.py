"""The SAML factor against a real SAML IdP (pysaml2's IdP side, peers/saml_idp.py):
redirect() → the IdP's sign-in form → its SAMLResponse → verify(). Every refusal names
its rule in the outcome's reason (the audit trail's text)."""

from __future__ import annotations

import base64
import re
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Route

from peers.saml import CALLBACK, SamlPeer, saml_idp_fixture  # noqa: F401  (the fixture)
from portcullis.federation.saml import Refused, ServiceProvider, metadata_endpoint
from portcullis.identity.claims import SamlSubject
from portcullis.identity.conditions import LoginContext
from portcullis.identity.factors.saml import SamlFactor
from portcullis.identity.flow import Attempt, FactorOutcome, FlowState, Passed
from portcullis.store import EphemeralStore, MemoryStore

pytestmark = pytest.mark.peer

CONTEXT = LoginContext("192.0.2.7")
RELAY = "relay-token-1"

SignIn = Callable[..., Awaitable[tuple[FactorOutcome, dict[str, str]]]]


async def _admit(_: str) -> bool:
    return True


ATTEMPT = Attempt(CONTEXT, _admit)


def factor_for(peer: SamlPeer, store: EphemeralStore | None = None,
               **settings: Any) -> SamlFactor:
    return SamlFactor(peer.provider(**settings), peer.source(**settings),
                      store if store is not None else MemoryStore())


async def start(factor: SamlFactor, peer: SamlPeer, username: str, password: str,
                **answer: str) -> tuple[FlowState, dict[str, str]]:
    """redirect() and the browser's trip through the IdP: the flow's state and the
    fields the IdP posts to the ACS."""
    state = FlowState(flow="default")
    redirect = await factor.redirect(state, CONTEXT, CALLBACK, RELAY)
    posted = await peer.browse(redirect.url, dict(redirect.form) if redirect.form else None,
                               username, password, **answer)
    return state, posted


def decoded(posted: dict[str, str]) -> str:
    return base64.b64decode(posted["SAMLResponse"]).decode()


def encoded(xml: str) -> dict[str, str]:
    return {"SAMLResponse": base64.b64encode(xml.encode()).decode(), "RelayState": RELAY}


# -- signing in -----------------------------------------------------------------------


async def test_a_user_signs_in_through_the_idp_with_claims_mapped(saml_idp: SamlPeer) -> None:
    factor = factor_for(saml_idp)
    state, posted = await start(factor, saml_idp, "alice", "alice-pass")
    assert posted["RelayState"] == RELAY
    outcome = await factor.verify(state, posted, ATTEMPT)
    assert isinstance(outcome, Passed), outcome.reason
    assert outcome.username == "alice"
    attributes = outcome.attributes
    assert attributes is not None
    assert attributes.groups == ("staff", "finance")
    assert attributes.email == "alice@corp.example"
    assert attributes.display_name == "Alice Liddell"
    assert attributes.upn == "alice@corp.example"
    assert attributes.sid == "S-1-5-21-1004336348-1177238915-682003330-1105"
    assert attributes.guid == "0b5ee5a4-3b0c-4f8e-9c11-2f5a7d2c1e01"


async def test_http_post_binding_and_adfs_claim_names(saml_idp: SamlPeer) -> None:
    factor = factor_for(saml_idp, binding="post", claims="adfs",
                        attributes={"username": "http://schemas.xmlsoap.org/ws/2005/05/"
                                                "identity/claims/upn"})
    state, posted = await start(factor, saml_idp, "bob", "bob-pass")
    outcome = await factor.verify(state, posted, ATTEMPT)
    assert isinstance(outcome, Passed), outcome.reason
    assert outcome.username == "bob@corp.example"
    assert outcome.attributes is not None
    assert outcome.attributes.groups == ("vpn-users",)
    assert outcome.attributes.sid == "S-1-5-21-1004336348-1177238915-682003330-1106"


@pytest.mark.parametrize("sign", ["response", "assertion"])
async def test_one_signature_covering_the_assertion_is_enough(saml_idp: SamlPeer,
                                                               sign: str) -> None:
    factor = factor_for(saml_idp)
    state, posted = await start(factor, saml_idp, "alice", "alice-pass", sign=sign)
    outcome = await factor.verify(state, posted, ATTEMPT)
    assert isinstance(outcome, Passed), outcome.reason


async def test_an_encrypted_assertion_is_decrypted_with_the_sp_key(saml_idp: SamlPeer) -> None:
    factor = factor_for(saml_idp, require_encrypted_assertions=True)
    state, posted = await start(factor, saml_idp, "alice", "alice-pass", encrypt="1",
                                sign="response")
    assert "EncryptedAssertion" in decoded(posted)
    assert "alice@corp.example" not in decoded(posted)
    outcome = await factor.verify(state, posted, ATTEMPT)
    assert isinstance(outcome, Passed), outcome.reason
    assert outcome.attributes is not None and outcome.attributes.groups == ("staff", "finance")


async def test_a_clear_assertion_is_refused_when_encryption_is_required(
        saml_idp: SamlPeer) -> None:
    factor = factor_for(saml_idp, require_encrypted_assertions=True)
    state, posted = await start(factor, saml_idp, "alice", "alice-pass")
    outcome = await factor.verify(state, posted, ATTEMPT)
    assert not isinstance(outcome, Passed)
    assert "not encrypted" in outcome.reason


# -- refusals -------------------------------------------------------------------------


async def test_an_unsigned_response_is_refused(saml_idp: SamlPeer) -> None:
    factor = factor_for(saml_idp)
    state, posted = await start(factor, saml_idp, "alice", "alice-pass", sign="none")
    outcome = await factor.verify(state, posted, ATTEMPT)
    assert not isinstance(outcome, Passed)
    assert "signature" in outcome.reason.lower() and "signed" in outcome.reason


async def test_a_signed_response_is_refused_when_the_assertion_must_be_signed(
        saml_idp: SamlPeer) -> None:
    factor = factor_for(saml_idp, want_assertions_signed=True)
    state, posted = await start(factor, saml_idp, "alice", "alice-pass", sign="response")
    outcome = await factor.verify(state, posted, ATTEMPT)
    assert not isinstance(outcome, Passed)
    assert "Signature missing for assertion" in outcome.reason


async def test_an_assertion_for_another_audience_is_refused(saml_idp: SamlPeer) -> None:
    factor = factor_for(saml_idp)
    state, posted = await start(factor, saml_idp, "alice", "alice-pass",
                                audience="https://other.example/sp")
    outcome = await factor.verify(state, posted, ATTEMPT)
    assert not isinstance(outcome, Passed)
    assert "AudienceRestrictions" in outcome.reason


async def test_a_replayed_assertion_is_refused_by_every_node(
        saml_idp: SamlPeer, ephemeral_store: EphemeralStore) -> None:
    # Two gateway nodes sharing the ephemeral store (on Redis, as a cluster does).
    node1 = factor_for(saml_idp, ephemeral_store)
    node2 = factor_for(saml_idp, ephemeral_store)
    state, posted = await start(node1, saml_idp, "alice", "alice-pass")
    first = await node1.verify(state, posted, ATTEMPT)
    assert isinstance(first, Passed), first.reason
    again = await node2.verify(state, posted, ATTEMPT)
    assert not isinstance(again, Passed)
    assert again.reason.startswith("SAML assertion id-") and again.reason.endswith(" replayed")


async def test_an_expired_assertion_is_refused(saml_idp: SamlPeer) -> None:
    factor = factor_for(saml_idp)
    state, posted = await start(factor, saml_idp, "alice", "alice-pass", expired="1")
    outcome = await factor.verify(state, posted, ATTEMPT)
    assert not isinstance(outcome, Passed)
    assert outcome.reason.startswith("SAML response refused: expired"), outcome.reason


async def test_an_answer_to_another_request_is_refused(saml_idp: SamlPeer) -> None:
    factor = factor_for(saml_idp)
    _, posted = await start(factor, saml_idp, "alice", "alice-pass")
    other_state, _ = await start(factor, saml_idp, "alice", "alice-pass")
    outcome = await factor.verify(other_state, posted, ATTEMPT)
    assert not isinstance(outcome, Passed)
    assert "unsolicited" in outcome.reason.lower()


async def test_an_answer_sent_to_another_acs_is_refused(saml_idp: SamlPeer) -> None:
    factor = factor_for(saml_idp)
    state, posted = await start(factor, saml_idp, "alice", "alice-pass")
    state.data["saml_callback"] = "http://127.0.0.1:8400/callback"
    outcome = await factor.verify(state, posted, ATTEMPT)
    assert not isinstance(outcome, Passed)
    assert "Destination" in outcome.reason


async def test_an_unsolicited_response_is_refused_by_default(saml_idp: SamlPeer) -> None:
    factor = factor_for(saml_idp)
    posted = await saml_idp.unsolicited("alice", "alice-pass")
    outcome = await factor.verify(FlowState(flow="default"), posted, ATTEMPT)
    assert not isinstance(outcome, Passed)
    assert "IdP-initiated sign-in is not allowed" in outcome.reason


async def test_idp_initiated_sign_in_when_allowed(saml_idp: SamlPeer) -> None:
    factor = factor_for(saml_idp, allow_idp_initiated=True)
    posted = await saml_idp.unsolicited("alice", "alice-pass")
    outcome = await factor.verify(FlowState(flow="default"), posted, ATTEMPT)
    assert isinstance(outcome, Passed), outcome.reason
    assert outcome.username == "alice"


async def test_a_response_to_a_request_is_not_taken_as_idp_initiated(
        saml_idp: SamlPeer) -> None:
    factor = factor_for(saml_idp, allow_idp_initiated=True)
    _, posted = await start(factor, saml_idp, "alice", "alice-pass")
    outcome = await factor.verify(FlowState(flow="default"), posted, ATTEMPT)
    assert not isinstance(outcome, Passed)
    assert "InResponseTo" in outcome.reason


async def test_a_missing_required_claim_refuses_with_the_claim_named(
        saml_idp: SamlPeer) -> None:
    factor = factor_for(saml_idp, required_attributes=["email"])
    state, posted = await start(factor, saml_idp, "mallory", "mallory-pass")
    outcome = await factor.verify(state, posted, ATTEMPT)
    assert not isinstance(outcome, Passed)
    assert "lacks required claims: email" in outcome.reason


# -- an attacker's changes to a signed response ---------------------------------------


SIGNATURE = r"<(\w+):Signature\b.*?</\1:Signature>"


def _assertion(xml: str) -> str:
    match = re.search(r"<(\w+):Assertion\b.*?</\1:Assertion>", xml, re.S)
    assert match, xml
    return match.group(0)


async def test_signature_wrapping_with_an_evil_assertion_first_is_refused(
        saml_idp: SamlPeer) -> None:
    factor = factor_for(saml_idp)
    state, posted = await start(factor, saml_idp, "alice", "alice-pass", sign="assertion")
    xml = decoded(posted)
    original = _assertion(xml)
    # XSW: an unsigned copy naming someone else, with a fresh ID, put before the signed
    # one; the signed original stays, so its signature still verifies.
    evil = re.sub(r'ID="[^"]+"', 'ID="id-evil"', original, count=1)
    evil = re.sub(SIGNATURE, "", evil, flags=re.S)
    evil = evil.replace(">alice<", ">admin<")
    outcome = await factor.verify(state, encoded(xml.replace(original, evil + original)),
                                  ATTEMPT)
    assert not isinstance(outcome, Passed)
    assert "Invalid number of assertions in Response: 2" in outcome.reason


async def test_signature_wrapping_with_the_signed_assertion_hidden_is_refused(
        saml_idp: SamlPeer) -> None:
    factor = factor_for(saml_idp)
    state, posted = await start(factor, saml_idp, "alice", "alice-pass", sign="assertion")
    xml = decoded(posted)
    original = _assertion(xml)
    # XSW: the evil assertion carries the original's ID and signature; the original,
    # still signed, hides inside the signature's Object where no claim is read from.
    signature = re.search(SIGNATURE, original, re.S)
    assert signature
    ds = signature.group(1)
    evil_body = original.replace(signature.group(0), "").replace(">alice<", ">admin<")
    hidden = signature.group(0).replace(f"</{ds}:Signature>",
                                        f"<{ds}:Object>{original}</{ds}:Object></{ds}:Signature>")
    issuer_end = re.search(r"</\w+:Issuer>", evil_body)
    assert issuer_end
    evil = evil_body.replace(issuer_end.group(0), issuer_end.group(0) + hidden, 1)
    outcome = await factor.verify(state, encoded(xml.replace(original, evil)), ATTEMPT)
    assert not isinstance(outcome, Passed)
    assert "signature: Signature verification failed" in outcome.reason


async def test_signature_wrapping_with_the_signed_assertion_moved_aside_is_refused(
        saml_idp: SamlPeer) -> None:
    factor = factor_for(saml_idp)
    state, posted = await start(factor, saml_idp, "alice", "alice-pass", sign="assertion")
    xml = decoded(posted)
    original = _assertion(xml)
    # XSW: the one assertion in its place is the evil, unsigned one with the original's
    # ID; the signed original sits in the Response's Extensions, where xmlsec1 could find
    # it by that ID.
    evil = re.sub(SIGNATURE, "", original, flags=re.S).replace(">alice<", ">admin<")
    status = re.search(r"<(\w+):Status>", xml)
    assert status
    p = status.group(1)
    wrapped = xml.replace(original, evil).replace(
        status.group(0), f"<{p}:Extensions>{original}</{p}:Extensions>{status.group(0)}")
    outcome = await factor.verify(state, encoded(wrapped), ATTEMPT)
    assert not isinstance(outcome, Passed)
    assert outcome.reason == ("SAML response refused: signature: Neither the response nor "
                              "the assertions are signed")


@pytest.mark.parametrize("keep_signature", [False, True])
async def test_signature_wrapping_of_a_signed_response_is_refused(
        saml_idp: SamlPeer, keep_signature: bool) -> None:
    factor = factor_for(saml_idp)
    state, posted = await start(factor, saml_idp, "alice", "alice-pass", sign="response")
    xml = decoded(posted).removeprefix('<?xml version="1.0"?>').strip()
    original = _assertion(xml)
    # XSW: a new Response with the same ID around an evil assertion, unsigned or with a
    # copy of the original's signature (whose Reference names that ID); the signed
    # Response rides along in its Extensions.
    root = re.match(r"<(\w+):Response\b[^>]*>", xml)
    assert root
    p = root.group(1)
    evil = xml.replace(original, original.replace(">alice<", ">admin<"))
    if not keep_signature:
        evil = re.sub(SIGNATURE, "", evil, flags=re.S)
    status = re.search(rf"<{p}:Status>", evil)
    assert status
    wrapped = evil.replace(status.group(0),
                           f"<{p}:Extensions>{xml}</{p}:Extensions>{status.group(0)}", 1)
    outcome = await factor.verify(state, encoded(wrapped), ATTEMPT)
    assert not isinstance(outcome, Passed)
    assert outcome.reason.startswith("SAML response refused: signature:"), outcome.reason


async def test_a_sha1_signature_is_refused(saml_idp: SamlPeer) -> None:
    factor = factor_for(saml_idp)
    state, posted = await start(factor, saml_idp, "alice", "alice-pass", sha1="1")
    outcome = await factor.verify(state, posted, ATTEMPT)
    assert not isinstance(outcome, Passed)
    assert "SHA-1 is refused" in outcome.reason


async def test_a_sha1_signature_inside_an_encrypted_assertion_is_refused(
        saml_idp: SamlPeer) -> None:
    """The gate sees only ciphertext there; the decrypted assertion is checked too."""
    factor = factor_for(saml_idp)
    state, posted = await start(factor, saml_idp, "alice", "alice-pass", sha1="1",
                                encrypt="1", sign="assertion")
    assert "sha1" not in decoded(posted)
    outcome = await factor.verify(state, posted, ATTEMPT)
    assert not isinstance(outcome, Passed)
    assert "SHA-1 is refused" in outcome.reason, outcome.reason


async def test_a_comment_inside_the_nameid_does_not_shorten_the_user_name(
        saml_idp: SamlPeer) -> None:
    factor = factor_for(saml_idp)
    state, posted = await start(factor, saml_idp, "mallory", "mallory-pass", sign="assertion")
    xml = decoded(posted)
    assert ">admin.evil<" in xml
    # Exclusive C14N drops comments, so the signature still verifies; a parser that
    # stops at the comment would read "admin".
    outcome = await factor.verify(state, encoded(xml.replace(">admin.evil<",
                                                             ">admin<!---->.evil<")), ATTEMPT)
    assert isinstance(outcome, Passed), outcome.reason
    assert outcome.username == "admin.evil"


# -- the XML gate ----------------------------------------------------------------------


async def test_an_entity_expansion_is_refused_before_it_expands(saml_idp: SamlPeer) -> None:
    factor = factor_for(saml_idp)
    state, posted = await start(factor, saml_idp, "alice", "alice-pass")
    xml = decoded(posted)
    laughs = "".join(f'<!ENTITY l{n} "{f"&l{n - 1};" * 10}">' for n in range(1, 10))
    bomb = (f'<!DOCTYPE samlp:Response [<!ENTITY l0 "lol">{laughs}]>'
            + xml.replace(">alice<", ">&l9;<"))
    outcome = await factor.verify(state, encoded(bomb), ATTEMPT)
    assert not isinstance(outcome, Passed)
    assert "DTD" in outcome.reason


async def test_an_external_entity_is_refused_unfetched(saml_idp: SamlPeer) -> None:
    factor = factor_for(saml_idp)
    state, posted = await start(factor, saml_idp, "alice", "alice-pass")
    xml = decoded(posted)
    xxe = ('<!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
           + xml.replace(">alice<", ">&x;<"))
    outcome = await factor.verify(state, encoded(xxe), ATTEMPT)
    assert not isinstance(outcome, Passed)
    assert "DTD" in outcome.reason


async def test_an_oversize_response_is_refused_before_decoding(saml_idp: SamlPeer) -> None:
    factor = factor_for(saml_idp, max_response_bytes=8192)
    state, posted = await start(factor, saml_idp, "alice", "alice-pass")
    padded = decoded(posted).replace("</samlp:Response>", " " * 20000 + "</samlp:Response>")
    outcome = await factor.verify(state, encoded(padded), ATTEMPT)
    assert not isinstance(outcome, Passed)
    assert "refused before decoding" in outcome.reason



# -- metadata and single logout ----------------------------------------------------------


async def test_the_gateway_serves_its_sp_metadata(saml_idp: SamlPeer) -> None:
    source = saml_idp.source()

    async def lookup(name: str) -> ServiceProvider | None:
        return await source.get() if name == "corp" else None

    app = Starlette(routes=[Route("/saml/{provider}/metadata", metadata_endpoint(lookup))])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="https://gateway.test") as http:
        answer = await http.get("/saml/corp/metadata")
        missing = await http.get("/saml/nobody/metadata")
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "application/samlmetadata+xml"
    assert 'entityID="https://gateway.test/saml/corp"' in answer.text
    assert 'Location="https://gateway.test/login/callback/corp"' in answer.text
    assert 'Location="https://gateway.test/saml/corp/slo"' in answer.text
    assert 'use="signing"' in answer.text and 'use="encryption"' in answer.text
    assert missing.status_code == 404


async def signed_in(peer: SamlPeer) -> SamlSubject:
    """The subject the sign-in keeps with the session, for single logout."""
    factor = factor_for(peer)
    state, posted = await start(factor, peer, "alice", "alice-pass")
    outcome = await factor.verify(state, posted, ATTEMPT)
    assert isinstance(outcome, Passed) and outcome.attributes is not None, outcome.reason
    subject = outcome.attributes.saml
    assert subject is not None and subject.provider == "corp"
    assert subject.name_id == "alice" and subject.session_index
    return subject


async def redirected(url: str) -> urllib.parse.SplitResult:
    """Where the IdP's answer to GET `url` redirects the browser."""
    async with httpx.AsyncClient(timeout=20) as http:
        answer = await http.get(url)
    assert answer.status_code == 303, answer.text
    return urllib.parse.urlsplit(answer.headers["location"])


async def test_single_logout_is_confirmed_by_the_idp(saml_idp: SamlPeer) -> None:
    subject = await signed_in(saml_idp)
    provider = await saml_idp.source().get()
    request = provider.logout_request(subject.name_id, subject.name_id_format,
                                      subject.session_index, "relay-2")
    assert request.url.startswith(f"{saml_idp.url}/slo?") and "Signature=" in request.url
    back = await redirected(request.url)
    assert f"{back.scheme}://{back.netloc}{back.path}" == "https://gateway.test/saml/corp/slo"
    assert dict(urllib.parse.parse_qsl(back.query))["RelayState"] == "relay-2"
    assert provider.accept_logout_response(back.query, request_id=request.request_id) is None
    other = provider.accept_logout_response(back.query, request_id="id-other")
    assert isinstance(other, Refused) and "InResponseTo" in other.reason


async def test_a_logout_response_with_a_broken_signature_is_refused(saml_idp: SamlPeer) -> None:
    subject = await signed_in(saml_idp)
    provider = await saml_idp.source().get()
    request = provider.logout_request(subject.name_id, None, None, "relay-3")
    back = await redirected(request.url)
    forged = back.query.replace("RelayState=relay-3", "RelayState=relay-4")
    refused = provider.accept_logout_response(forged, request_id=request.request_id)
    assert isinstance(refused, Refused) and "does not verify" in refused.reason
    unsigned = "&".join(part for part in back.query.split("&")
                        if not part.startswith(("Signature=", "SigAlg=")))
    refused = provider.accept_logout_response(unsigned, request_id=request.request_id)
    assert isinstance(refused, Refused) and "no signed SAMLResponse" in refused.reason


async def test_the_idp_ends_a_session_by_single_logout(saml_idp: SamlPeer) -> None:
    subject = await signed_in(saml_idp)
    provider = await saml_idp.source().get()
    query = urllib.parse.urlencode({
        "sp": provider.entity_id, "name_id": subject.name_id,
        "session_index": subject.session_index, "RelayState": "idp-relay"})
    back = await redirected(f"{saml_idp.url}/logout-user?{query}")
    order = provider.accept_logout_request(back.query)
    assert not isinstance(order, Refused), order
    assert order.name_id == "alice"
    assert order.session_indexes == (subject.session_index,)
    assert order.relay_state == "idp-relay"
    answer = provider.logout_response(order)
    async with httpx.AsyncClient(timeout=20) as http:
        confirmed = await http.get(answer.url)
    assert confirmed.status_code == 200, confirmed.text
    assert confirmed.text == f"logged out: {order.request_id}"
