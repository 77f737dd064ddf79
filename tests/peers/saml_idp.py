"""A real SAML 2.0 identity provider for the SAML tests: pysaml2's IdP side
(`saml2.server.Server`, signing with the xmlsec1 program) behind a small WSGI app on a
free port of 127.0.0.1, with its own key pair made by the test.

    python saml_idp.py CONFIG.json

CONFIG.json: {"port", "key_file", "cert_file", "sp_metadata_file", "users":
{name: {"password", "attributes": {claim: [values]}}}}. The IdP's entity id is
http://127.0.0.1:PORT/idp and its metadata is served at /metadata.

- GET /sso/redirect?SAMLRequest=...&RelayState=... (HTTP-Redirect) or POST /sso/post
  (HTTP-POST): the AuthnRequest is read and checked (its signature too) and a sign-in
  form is answered, carrying the request in hidden fields.
- POST /login (the form: username, password, and how to answer, as a test asks):
  the Response goes back as an auto-submitting HTML form that POSTs SAMLResponse and
  RelayState to the request's AssertionConsumerServiceURL.
- GET /initiate?sp=&acs=: the IdP's own start page for an IdP-initiated sign-in, a
  sign-in form that POSTs to /unsolicited.
- POST /unsolicited (username, password, sp, acs): an IdP-initiated Response.
- GET /slo (HTTP-Redirect, signed): a LogoutRequest, answered by a signed LogoutResponse
  in a redirect to the SP's single logout endpoint; or the SP's LogoutResponse to ours.
- GET /logout-user?sp=&name_id=[&session_index=]: IdP-initiated single logout, a signed
  LogoutRequest in a redirect to the SP's single logout endpoint (without a session
  index it ends every session of the NameID).

How the answer is made, the form's fields a test sets: `sign` = response | assertion |
both | none; `encrypt` = 1 to encrypt the assertion for the SP; `audience` = another SP's
entity id, put in the AudienceRestriction; `expired` = 1: valid until 20 minutes ago;
`sha1` = 1: signed with RSA-SHA1 (the IdP signs with RSA-SHA256 otherwise).
"""

from __future__ import annotations

import base64
import html
import json
import sys
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIRequestHandler, make_server

from saml2 import BINDING_HTTP_POST, BINDING_HTTP_REDIRECT
from saml2.attribute_converter import AttributeConverter
from saml2.config import IdPConfig
from saml2.metadata import create_metadata_string
from saml2.saml import NAMEID_FORMAT_UNSPECIFIED, Assertion, NameID
from saml2.server import Server
from saml2.time_util import a_while_ago
from saml2.xmldsig import DIGEST_SHA1, DIGEST_SHA256, SIG_RSA_SHA1, SIG_RSA_SHA256

Environ = dict[str, Any]
StartResponse = Callable[[str, list[tuple[str, str]]], Any]

# Attribute names go out as the users' files give them (ADFS claim URIs, plain names):
# pysaml2 would otherwise translate the names it knows into urn:oid: names.
NAME_FORMAT = "urn:oasis:names:tc:SAML:2.0:attrname-format:unspecified"


class ShapingServer(Server):
    """pysaml2's IdP, with a hook that changes an assertion before it is signed: how a
    test gets a correctly signed assertion for another audience, or an expired one."""

    shape: Callable[[Assertion], None] | None = None

    def setup_assertion(self, *args: Any, **kwargs: Any) -> Assertion:
        assertion = super().setup_assertion(*args, **kwargs)
        if self.shape is not None:
            self.shape(assertion)
        return assertion


def shaper(form: dict[str, str]) -> Callable[[Assertion], None] | None:
    audience, expired = form.get("audience"), form.get("expired") == "1"
    if not audience and not expired:
        return None

    def shape(assertion: Assertion) -> None:
        if audience:
            assertion.conditions.audience_restriction[0].audience[0].text = audience
        if expired:
            assertion.conditions.not_before = a_while_ago(minutes=30)
            assertion.conditions.not_on_or_after = a_while_ago(minutes=20)
            for confirmation in assertion.subject.subject_confirmation:
                confirmation.subject_confirmation_data.not_on_or_after = a_while_ago(minutes=20)

    return shape


def idp_server(config: dict[str, Any]) -> ShapingServer:
    base = f"http://127.0.0.1:{config['port']}"
    idp_config = IdPConfig()
    idp_config.load({
        "entityid": f"{base}/idp",
        "key_file": config["key_file"],
        "cert_file": config["cert_file"],
        "metadata": {"local": [config["sp_metadata_file"]]},
        "service": {"idp": {
            "endpoints": {
                "single_sign_on_service": [(f"{base}/sso/redirect", BINDING_HTTP_REDIRECT),
                                           (f"{base}/sso/post", BINDING_HTTP_POST)],
                "single_logout_service": [(f"{base}/slo", BINDING_HTTP_REDIRECT)],
            },
            "policy": {"default": {"lifetime": {"minutes": 5},
                                   "name_form": NAME_FORMAT}},
            "name_id_format": [NAMEID_FORMAT_UNSPECIFIED],
            # AuthnRequests and LogoutRequests alike: the XML signature (HTTP-POST) or
            # the query string's (HTTP-Redirect).
            "want_authn_requests_signed": True,
        }},
    })
    passthrough = AttributeConverter(NAME_FORMAT)
    passthrough.from_dict({"identifier": NAME_FORMAT, "fro": {}, "to": {}})
    idp_config.attribute_converters = [passthrough]
    return ShapingServer(config=idp_config)


class IdentityProvider:
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.server = idp_server(config)

    def __call__(self, environ: Environ, start: StartResponse) -> Iterable[bytes]:
        path = environ["PATH_INFO"]
        if environ["REQUEST_METHOD"] == "POST":
            size = int(environ.get("CONTENT_LENGTH") or 0)
            fields = parse_qs(environ["wsgi.input"].read(size).decode())
        else:
            fields = parse_qs(environ.get("QUERY_STRING", ""))
        form = {name: values[0] for name, values in fields.items()}
        try:
            if path == "/metadata":
                body = create_metadata_string(None, self.server.config, sign=False)
                return _answer(start, "200 OK", body, "application/samlmetadata+xml")
            if path in ("/sso/redirect", "/sso/post"):
                binding = BINDING_HTTP_REDIRECT if path == "/sso/redirect" else BINDING_HTTP_POST
                return _answer(start, "200 OK", self.login_page(form, binding).encode())
            if path == "/login":
                return _answer(start, "200 OK", self.sign_in(form).encode())
            if path == "/initiate":
                return _answer(start, "200 OK", _sign_in_form("/unsolicited", {
                    "sp": form["sp"], "acs": form["acs"]}).encode())
            if path == "/unsolicited":
                return _answer(start, "200 OK", self.sign_in(form).encode())
            if path == "/slo" and "SAMLResponse" in form:
                return _answer(start, "200 OK", self.logged_out(form).encode())
            if path == "/slo":
                return _redirect(start, self.logout(form))
            if path == "/logout-user":
                return _redirect(start, self.logout_user(form))
        except Exception as exc:   # a test reads the reason in the body
            traceback.print_exc()
            return _answer(start, "400 Bad Request", f"{type(exc).__name__}: {exc}".encode())
        return _answer(start, "404 Not Found", b"not found")

    def login_page(self, form: dict[str, str], binding: str) -> str:
        request = self.server.parse_authn_request(
            form["SAMLRequest"], binding, relay_state=form.get("RelayState"),
            sigalg=form.get("SigAlg"), signature=form.get("Signature"))
        message = request.message
        # As a real IdP: the ACS asked for must be one of the SP's metadata.
        answer_to = self.server.response_args(message, [BINDING_HTTP_POST])
        return _sign_in_form("/login", {
            "request_id": message.id, "sp": answer_to["sp_entity_id"],
            "acs": answer_to["destination"], "RelayState": form.get("RelayState", ""),
            "signed": "1" if message.signature is not None else "0"})

    def sign_in(self, form: dict[str, str]) -> str:
        user = self.config["users"].get(form["username"])
        if user is None or user["password"] != form["password"]:
            raise PermissionError("wrong user name or password")
        sign = form.get("sign", "both")
        server = self.server
        server.shape = shaper(form)   # one request at a time: wsgiref serves them in turn
        response = server.create_authn_response(
            identity=user["attributes"], in_response_to=form.get("request_id"),
            destination=form["acs"], sp_entity_id=form["sp"],
            name_id=NameID(format=NAMEID_FORMAT_UNSPECIFIED,
                           text=user.get("name_id", form["username"])),
            sign_response=sign in ("response", "both"),
            sign_assertion=sign in ("assertion", "both"),
            encrypt_assertion=form.get("encrypt") == "1",
            encrypt_cert_assertion=None,
            sign_alg=SIG_RSA_SHA1 if form.get("sha1") == "1" else SIG_RSA_SHA256,
            digest_alg=DIGEST_SHA1 if form.get("sha1") == "1" else DIGEST_SHA256,
            authn={"class_ref": "urn:oasis:names:tc:SAML:2.0:ac:classes:Password"},
        )
        xml = str(response).encode()
        fields = {"SAMLResponse": base64.b64encode(xml).decode(),
                  "RelayState": form.get("RelayState", "")}
        inputs = "".join(f'<input type="hidden" name="{name}" value="{html.escape(value)}">'
                         for name, value in fields.items())
        # Without scripts, a button does what the script does (as real IdPs offer).
        return (f'<form method="post" action="{html.escape(form["acs"])}">{inputs}'
                '<button>Continue to the service</button></form>'
                '<script>document.forms[0].submit()</script>')


    def logout(self, form: dict[str, str]) -> str:
        request = self.server.parse_logout_request(
            form["SAMLRequest"], BINDING_HTTP_REDIRECT, relay_state=form.get("RelayState"),
            sigalg=form.get("SigAlg"), signature=form.get("Signature"))
        response = self.server.create_logout_response(request.message, [BINDING_HTTP_REDIRECT],
                                                      sign=False)
        info = self.server.apply_binding(BINDING_HTTP_REDIRECT, str(response),
                                         response.destination, form.get("RelayState", ""),
                                         response=True, sign=True, sigalg=SIG_RSA_SHA256)
        return str(dict(info["headers"])["Location"])


    def logged_out(self, form: dict[str, str]) -> str:
        response = self.server.parse_logout_request_response(form["SAMLResponse"],
                                                             BINDING_HTTP_REDIRECT)
        response.status_ok()
        return f"logged out: {response.response.in_response_to}"

    def logout_user(self, form: dict[str, str]) -> str:
        sp = form["sp"]
        destination = self.server.metadata.single_logout_service(
            sp, BINDING_HTTP_REDIRECT, "spsso")[0]["location"]
        _, request = self.server.create_logout_request(
            destination, sp, name_id=NameID(format=NAMEID_FORMAT_UNSPECIFIED,
                                            text=form["name_id"]),
            session_indexes=[form["session_index"]] if form.get("session_index") else None,
            sign=False)
        info = self.server.apply_binding(BINDING_HTTP_REDIRECT, str(request), destination,
                                         form.get("RelayState", ""), sign=True,
                                         sigalg=SIG_RSA_SHA256)
        return str(dict(info["headers"])["Location"])


def _sign_in_form(action: str, hidden: dict[str, str]) -> str:
    inputs = "".join(f'<input type="hidden" name="{name}" value="{html.escape(value)}">'
                     for name, value in hidden.items())
    return (f'<form method="post" action="{action}">' + inputs +
            '<input name="username"><input name="password" type="password">'
            '<button>Sign in</button></form>')


def _redirect(start: StartResponse, location: str) -> list[bytes]:
    start("303 See Other", [("Location", location), ("Content-Length", "0")])
    return [b""]


def _answer(start: StartResponse, status: str, body: bytes,
            content_type: str = "text/html; charset=utf-8") -> list[bytes]:
    start(status, [("Content-Type", content_type), ("Content-Length", str(len(body)))])
    return [body]


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        sys.stderr.write("idp: " + format % args + "\n")


def main() -> None:
    config = json.loads(Path(sys.argv[1]).read_text())
    httpd = make_server("127.0.0.1", config["port"], IdentityProvider(config),
                        handler_class=_Quiet)
    print(f"listening on {config['port']}", flush=True)
    httpd.serve_forever()


if __name__ == "__main__":
    main()
