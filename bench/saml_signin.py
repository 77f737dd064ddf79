"""SAML sign-in rate at the gateway's side: the SAML factor's verify() of a signed
Response (the XML gate, pysaml2, xmlsec1 checking the signature, the replay cache, claim
mapping) and redirect() (a signed AuthnRequest), beside the same pysaml2 work done
directly (`Saml2Client.parse_authn_request_response`, its own defaults) — and, apart,
what the IdP (pysaml2's IdP side, the tests' peer) spends making the signed Responses.

The factor is driven in this process (the portal's callback route adds an HTTP request);
responses are made beforehand by the IdP so its cost is not counted in the factor's.
"""

from __future__ import annotations

import asyncio
import base64
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from bench.launch_rate import CONCURRENCY, measure
from bench.report import Report, Table

SIGN_INS = 200
PUBLIC_URL = "https://gateway.bench"
CALLBACK = f"{PUBLIC_URL}/login/callback/corp"

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from peers.saml import USERS  # noqa: E402
from peers.saml_idp import idp_server  # noqa: E402


def run() -> Report:
    return asyncio.run(_run())


async def _run() -> Report:
    from saml2 import BINDING_HTTP_POST, BINDING_HTTP_REDIRECT
    from saml2.metadata import create_metadata_string
    from saml2.saml import NAMEID_FORMAT_UNSPECIFIED, NameID
    from saml2.xmldsig import DIGEST_SHA256, SIG_RSA_SHA256

    from portcullis.config.federation import SamlProvider
    from portcullis.federation.saml import ServiceProviderSource
    from portcullis.identity.conditions import LoginContext
    from portcullis.identity.factors.saml import SamlFactor
    from portcullis.identity.flow import Attempt, FlowState
    from portcullis.pki import create_signing_pair, write_pair
    from portcullis.store import MemoryStore

    with tempfile.TemporaryDirectory(prefix="bench-saml-") as tmp:
        directory = Path(tmp)
        cert, key = write_pair(directory, "idp", create_signing_pair("bench-idp"))
        config = {"port": 9, "key_file": str(key), "cert_file": str(cert),
                  "sp_metadata_file": str(directory / "sp.xml"), "users": USERS}
        (directory / "sp.xml").write_text(
            '<md:EntitiesDescriptor xmlns:md="urn:oasis:names:tc:SAML:2.0:metadata"/>')
        (directory / "idp.xml").write_bytes(
            create_metadata_string(None, idp_server(config).config, sign=False))
        provider = SamlProvider.model_validate({
            "type": "saml", "name": "corp", "idp_metadata_file": str(directory / "idp.xml")})
        source = ServiceProviderSource(provider, public_url=PUBLIC_URL,
                                       pki_dir=directory / "pki", resolve=Path)
        sp = await source.get()
        (directory / "sp.xml").write_bytes(sp.metadata())
        idp = idp_server(config)
        context = LoginContext("192.0.2.7")

        async def admit(_: str) -> bool:
            return True

        attempt = Attempt(context, admit)
        factor = SamlFactor(provider, source, MemoryStore())

        # redirect(): a signed AuthnRequest per sign-in; the IdP answers each.
        states: list[FlowState] = []
        redirect_times: list[float] = []
        for _ in range(SIGN_INS):
            state = FlowState(flow="default")
            started = time.perf_counter()
            redirect = await factor.redirect(state, context, CALLBACK, "relay")
            redirect_times.append(time.perf_counter() - started)
            states.append(state)
            state.data["query"] = urlsplit(redirect.url).query
        idp_cpu = time.process_time()
        idp_wall = time.perf_counter()
        answers: list[dict[str, str]] = []
        for state in states:
            query = {name: values[0] for name, values in parse_qs(state.data.pop("query")).items()}
            request = idp.parse_authn_request(query["SAMLRequest"], BINDING_HTTP_REDIRECT,
                                              relay_state=query.get("RelayState"),
                                              sigalg=query.get("SigAlg"),
                                              signature=query.get("Signature"))
            response = idp.create_authn_response(
                identity=USERS["alice"]["attributes"], in_response_to=request.message.id,
                destination=CALLBACK, sp_entity_id=sp.entity_id,
                name_id=NameID(format=NAMEID_FORMAT_UNSPECIFIED, text="alice"),
                sign_response=True, sign_assertion=True, sign_alg=SIG_RSA_SHA256,
                digest_alg=DIGEST_SHA256,
                authn={"class_ref": "urn:oasis:names:tc:SAML:2.0:ac:classes:Password"})
            answers.append({"SAMLResponse": base64.b64encode(str(response).encode()).decode(),
                            "RelayState": "relay"})
        idp_per_response = (time.perf_counter() - idp_wall) / SIGN_INS
        idp_cpu_per_response = (time.process_time() - idp_cpu) / SIGN_INS

        def next_of(items: list[Any]) -> Any:
            iterator = iter(items)
            return lambda: next(iterator)

        take_factor = next_of(list(zip(states, answers, strict=True)))

        async def through_factor() -> float:
            state, answer = take_factor()
            started = time.perf_counter()
            outcome = await factor.verify(state, answer, attempt)
            if not outcome.ok:
                raise RuntimeError(outcome.reason)
            return time.perf_counter() - started

        client = sp._client
        take_direct = next_of(list(zip(states, answers, strict=True)))

        def parse_directly(state: FlowState, answer: dict[str, str]) -> None:
            response = client.parse_authn_request_response(
                answer["SAMLResponse"], BINDING_HTTP_POST,
                outstanding={state.data["saml_request_id"]: CALLBACK})
            if response is None or response.assertion is None:
                raise RuntimeError("pysaml2 refused the response")

        async def directly() -> float:
            state, answer = take_direct()
            started = time.perf_counter()
            await asyncio.to_thread(parse_directly, state, answer)
            return time.perf_counter() - started

        factor_run = await measure("factor verify()", through_factor, SIGN_INS, {},
                                   concurrency=CONCURRENCY)
        direct_run = await measure("pysaml2 directly", directly, SIGN_INS, {},
                                   concurrency=CONCURRENCY)

    redirect_ms = sorted(redirect_times)[len(redirect_times) // 2] * 1000
    columns = ["setup", "done", "errors", "wall s", "sign-ins/s", "p50 ms", "p90 ms",
               "p99 ms", "client CPU", "server CPU"]
    ratio = factor_run.rate / direct_run.rate if direct_run.rate else float("nan")
    return Report(
        name="saml_signin",
        tables=[Table(f"SAML Responses verified (concurrency {CONCURRENCY})", columns,
                      [factor_run.row(), direct_run.row()])],
        verdicts=[f"SAML factor: {factor_run.rate:.1f} sign-ins/s, p50 "
                  f"{factor_run.percentile_ms(50):.0f} ms (pysaml2 directly: "
                  f"{direct_run.rate:.1f}/s; ratio {ratio:.2f}x)",
                  f"redirect() (signed AuthnRequest): p50 {redirect_ms:.1f} ms",
                  f"IdP apart: {idp_per_response * 1000:.1f} ms per signed Response "
                  f"({idp_cpu_per_response * 1000:.1f} ms CPU in this process, xmlsec1 "
                  "not counted)"],
        notes=[f"{os.cpu_count()} cores; xmlsec1 runs as a subprocess per signature "
               "(pysaml2's backend): most of either path's cost",
               "factor = XML gate + pysaml2 + exactly-one-assertion, Destination, Issuer, "
               "InResponseTo checks + replay cache (memory) + claim mapping"],
        data={"factor": factor_run.as_json(), "direct": direct_run.as_json(),
              "redirect_p50_ms": redirect_ms, "idp_ms_per_response": idp_per_response * 1000})
