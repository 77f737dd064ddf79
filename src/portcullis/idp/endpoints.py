"""The OpenID provider's HTTP endpoints: discovery, JWKS, authorize, token, userinfo,
revocation (RFC 7009) and RP-initiated logout, as Starlette routes a node mounts.

Why not Authlib's authorization server: its grants call their storage hooks
(`query_authorization_code`, `authenticate_refresh_token`, ...) synchronously from inside
`create_token_response`, while our stores are asynchronous (Redis, PostgreSQL), and it
has no Starlette integration, only Flask and Django. Adapting it would mean blocking the
event loop or bouncing from threads back into it. So this is a small endpoint layer of
our own over joserfc (JOSE: ES256 keys, JWS, claim checks), clearly scoped: the
authorization code grant with PKCE S256, refresh tokens, nothing else (no implicit or
hybrid flows, no dynamic registration, no request objects).

Which user is signed in is the portal's answer: the session cookie read through the
session manager (`SESSION_COOKIE`, `SessionManager.validate`). Without a session the
browser goes to the portal's `/login?next=<this authorize URL>` and comes back.

A user outside the application's groups is sent back to the application with
`error=access_denied` (RFC 6749 §4.1.2.1): the client and its redirect URI are verified
by then, so this is no open redirect, and the application learns that the sign-in
ended, instead of waiting for a browser that stays at the gateway. An unknown client or
an unregistered redirect URI gets an error page here and never a redirect.

Every refusal is audited with its reason; applications get only the OAuth error code,
and the reasons of request-shape errors (which tell nothing about users).
"""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

import structlog
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.templating import Jinja2Templates

from portcullis.audit import AuditTrail
from portcullis.config.idp import OidcClient
from portcullis.config.model import Settings
from portcullis.errors import ConfigError, StoreError
from portcullis.identity.sessions import SESSION_COOKIE, Session, SessionManager
from portcullis.idp.decisions import (
    AuthorizeRequest,
    Refused,
    after_fresh_sign_in,
    check_authorize,
    may_use,
    stale_sign_in,
)
from portcullis.idp.keys import ALGORITHM, KeyRing
from portcullis.idp.provider import OpenIdProvider, TokenRefused
from portcullis.store import DurableStore, EphemeralStore
from portcullis.tokens import TokenHasher

log = structlog.get_logger("portcullis.idp")

HERE = Path(__file__).parent
DISCOVERY = "/.well-known/openid-configuration"
AUTHORIZE = "/oauth2/authorize"
TOKEN = "/oauth2/token"
USERINFO = "/oauth2/userinfo"
JWKS = "/oauth2/jwks"
REVOKE = "/oauth2/revoke"
LOGOUT = "/oauth2/logout"
NO_STORE = {"cache-control": "no-store", "pragma": "no-cache"}
MIN_SECRET = 16


@dataclass(frozen=True)
class IdpDeps:
    settings: Settings
    sessions: SessionManager
    durable: DurableStore
    ephemeral: EphemeralStore
    hasher: TokenHasher
    audit: AuditTrail
    clock: Callable[[], float] = time.time


def client_secrets(settings: Settings) -> dict[str, bytes]:
    """SHA-256 of each confidential client's secret, read from its file once."""
    digests: dict[str, bytes] = {}
    for index, client in enumerate(settings.oidc.clients):
        if client.secret_file is None:
            continue
        key = f"oidc.clients[{index}].secret_file"
        try:
            secret = settings.path(client.secret_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read the client secret of {client.id}: {exc}",
                              key=key) from None
        if len(secret) < MIN_SECRET:
            raise ConfigError(f"the client secret of {client.id} is shorter than "
                              f"{MIN_SECRET} characters; make a long random one", key=key)
        digests[client.id] = hashlib.sha256(secret.encode()).digest()
    return digests


def routes(deps: IdpDeps) -> list[BaseRoute]:
    """The provider's routes, to mount at the root of the app that serves the portal
    (they read the portal's session cookie). Raises ConfigError for unreadable secrets."""
    settings = deps.settings
    issuer = settings.gateway.public_url
    keys = KeyRing(deps.durable, deps.hasher, settings.oidc.signing_key_rotation_days,
                   clock=deps.clock)
    provider = OpenIdProvider(settings.oidc, issuer, deps.sessions, deps.ephemeral, keys,
                              deps.hasher, deps.audit, client_secrets(settings),
                              clock=deps.clock)
    return OidcEndpoints(deps, provider).routes()


class OidcEndpoints:
    def __init__(self, deps: IdpDeps, provider: OpenIdProvider) -> None:
        self._deps = deps
        self._provider = provider
        self._settings = deps.settings.oidc
        self._issuer = provider.issuer
        self._audit = deps.audit
        self._templates = Jinja2Templates(directory=str(HERE / "templates"))

    def routes(self) -> list[BaseRoute]:
        guarded = _unavailable_on_store_error
        return [
            Route(DISCOVERY, guarded(self.discovery), methods=["GET"]),
            Route(JWKS, guarded(self.jwks), methods=["GET"]),
            Route(AUTHORIZE, guarded(self.authorize), methods=["GET", "POST"]),
            Route(TOKEN, guarded(self.token), methods=["POST"]),
            Route(USERINFO, guarded(self.userinfo), methods=["GET", "POST"]),
            Route(REVOKE, guarded(self.revoke), methods=["POST"]),
            Route(LOGOUT, guarded(self.logout), methods=["GET", "POST"]),
        ]

    # -- metadata --------------------------------------------------------------------
    async def discovery(self, request: Request) -> Response:
        issuer = self._issuer
        return JSONResponse({
            "issuer": issuer,
            "authorization_endpoint": issuer + AUTHORIZE,
            "token_endpoint": issuer + TOKEN,
            "userinfo_endpoint": issuer + USERINFO,
            "jwks_uri": issuer + JWKS,
            "revocation_endpoint": issuer + REVOKE,
            "end_session_endpoint": issuer + LOGOUT,
            "response_types_supported": ["code"],
            "response_modes_supported": ["query"],
            "grant_types_supported": ["authorization_code", "refresh_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": [ALGORITHM],
            "token_endpoint_auth_methods_supported": ["client_secret_basic",
                                                      "client_secret_post", "none"],
            "revocation_endpoint_auth_methods_supported": ["client_secret_basic",
                                                           "client_secret_post", "none"],
            "code_challenge_methods_supported": ["S256"],
            "scopes_supported": ["openid", "profile", "email", "groups"],
            "claims_supported": ["sub", "iss", "aud", "exp", "iat", "auth_time", "nonce",
                                 "amr", "idp", "sid", "preferred_username", "name", "upn",
                                 "onprem_sid", "guid", "email", "groups"],
            "authorization_response_iss_parameter_supported": True,
            "request_parameter_supported": False,
            "request_uri_parameter_supported": False,
        }, headers={"cache-control": "public, max-age=3600"})

    async def jwks(self, request: Request) -> Response:
        active = await self._provider.keys.active()
        # New keys are published a day before they sign: an hour's caching is safe.
        return JSONResponse(active.jwks, headers={"cache-control": "public, max-age=3600"})

    # -- authorization -----------------------------------------------------------------
    async def authorize(self, request: Request) -> Response:
        items = await _parameters(request)
        asked = AuthorizeRequest.from_params(items)
        decision = check_authorize(self._settings, asked)
        client_address = _client_of(request)
        if isinstance(decision, Refused):
            self._audit.record("oidc.authorize_refused", client_id=asked.client_id,
                               reason=decision.reason, client=client_address)
            if not decision.redirectable:
                return self._page(request, "Sign-in not possible", "This application's "
                                  "sign-in request is not valid. Tell its administrator.",
                                  400)
            return self._back(asked, {"error": decision.error,
                                      "error_description": decision.reason})
        session = await self._session(request)
        if session is None:
            if _cross_site(request):
                return self._same_site_again(request)
            if asked.prompt == "none":
                return self._back(asked, {"error": "login_required"})
            here = AUTHORIZE + "?" + urlencode(items)
            return RedirectResponse("/login?next=" + quote(here, safe=""), 303)
        stale = stale_sign_in(asked, session.claims.auth_time, time.time())
        if stale is not None:
            self._audit.record("oidc.sign_in_again", client_id=decision.client.id,
                               user=session.username, reason=stale, client=client_address)
            if "none" in (asked.prompt or "").split():
                return self._back(asked, {"error": "login_required"})
            onward = AUTHORIZE + "?" + urlencode(after_fresh_sign_in(items))
            return RedirectResponse("/login?fresh=1&next=" + quote(onward, safe=""), 303)
        verdict = may_use(decision.client, session.claims)
        if not verdict.allowed:
            self._audit.record("oidc.access_denied", client_id=decision.client.id,
                               user=session.username, reason=verdict.reason,
                               client=client_address)
            return self._back(asked, {"error": "access_denied"})
        code = await self._provider.issue_code(decision, asked, session)
        self._audit.record("oidc.authorized", client_id=decision.client.id,
                           user=session.username, scopes=list(decision.scopes),
                           reason=verdict.reason, client=client_address)
        return self._back(asked, {"code": code})

    def _back(self, asked: AuthorizeRequest, answer: dict[str, str]) -> Response:
        """To the application's (verified) redirect URI, with `state` and `iss`."""
        fields = {**answer, "iss": self._issuer}
        if asked.state is not None:
            fields["state"] = asked.state
        parts = urlsplit(asked.redirect_uri)
        query = "&".join(filter(None, [parts.query, urlencode(fields)]))
        return RedirectResponse(urlunsplit(parts._replace(query=query)), 303,
                                headers={"cache-control": "no-store"})

    # -- token, userinfo, revocation -----------------------------------------------------
    async def token(self, request: Request) -> Response:
        form = await _form(request)
        if form is None:
            self._audit.record("oidc.token_refused", reason="not a form, or a field "
                               "given twice", client=_client_of(request))
            return _oauth_error("invalid_request", 400)
        client = await self._client(request, form, "token")
        if client is None:
            return _oauth_error("invalid_client", 401, basic=True)
        grant_type = form.get("grant_type")
        if grant_type == "authorization_code":
            result = await self._provider.redeem_code(
                client, form.get("code", ""), form.get("redirect_uri"),
                form.get("code_verifier"))
        elif grant_type == "refresh_token":
            result = await self._provider.refresh(client, form.get("refresh_token", ""))
        else:
            result = TokenRefused("unsupported_grant_type",
                                  f"grant_type {grant_type!r} is not supported")
        if isinstance(result, TokenRefused):
            self._audit.record("oidc.token_refused", client_id=client.id,
                               grant_type=grant_type, reason=result.reason,
                               client=_client_of(request))
            return _oauth_error(result.error, 400)
        self._audit.record("oidc.token_issued", client_id=client.id, grant_type=grant_type,
                           user=result.user, scopes=result.scope.split(),
                           client=_client_of(request))
        return JSONResponse(result.to_json(), headers=NO_STORE)

    async def userinfo(self, request: Request) -> Response:
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header[:7].lower() == "bearer " else ""
        claims = await self._provider.userinfo(token) if token else "no Bearer token"
        if isinstance(claims, str):
            self._audit.record("oidc.userinfo_refused", reason=claims,
                               client=_client_of(request))
            return Response(status_code=401, headers={
                "www-authenticate": 'Bearer error="invalid_token"', **NO_STORE})
        return JSONResponse(claims, headers=NO_STORE)

    async def revoke(self, request: Request) -> Response:
        form = await _form(request)
        if form is None:
            self._audit.record("oidc.revoke_refused", reason="not a form, or a field "
                               "given twice", client=_client_of(request))
            return _oauth_error("invalid_request", 400)
        client = await self._client(request, form, "revoke")
        if client is None:
            return _oauth_error("invalid_client", 401, basic=True)
        done = await self._provider.revoke(client, form.get("token", ""))
        self._audit.record("oidc.revoked", client_id=client.id, outcome=done,
                           client=_client_of(request))
        return Response(status_code=200, headers=NO_STORE)

    async def _client(self, request: Request, form: dict[str, str],
                      endpoint: str) -> OidcClient | None:
        """The authenticated client of a token or revocation request (RFC 6749 §2.3.1:
        HTTP Basic, or client_id and client_secret in the body; a public client sends
        its client_id alone), or None, audited."""
        identified = _client_credentials(request.headers.get("authorization", ""), form)
        client = self._settings.client(identified[0]) if identified else None
        if client is not None and identified is not None and \
                self._provider.client_authenticated(client, identified[1]):
            return client
        self._audit.record("oidc.client_refused", endpoint=endpoint,
                           client_id=identified[0] if identified else None,
                           reason="unknown client" if client is None else
                           "wrong or missing client secret", client=_client_of(request))
        return None

    # -- logout --------------------------------------------------------------------------
    async def logout(self, request: Request) -> Response:
        """RP-initiated logout: with a valid `id_token_hint` the gateway session it names
        ends too, and the browser goes to the exact registered post-logout URI."""
        params = dict(await _parameters(request))
        token = request.cookies.get(SESSION_COOKIE)
        if token is None and _cross_site(request):
            return self._same_site_again(request)
        hint = params.get("id_token_hint")
        claims = await self._provider.id_token_hint(hint) if hint else None
        client_id = params.get("client_id") or (claims or {}).get("aud")
        client = self._settings.client(client_id) if isinstance(client_id, str) else None
        target = params.get("post_logout_redirect_uri")
        if (claims is not None and claims.get("aud") != client_id) or (
                target is not None and (client is None
                                        or target not in client.post_logout_redirect_uris)):
            self._audit.record("oidc.logout_refused", client_id=client_id,
                               reason="post_logout_redirect_uri not registered for the "
                               "client, or the hint is another client's",
                               client=_client_of(request))
            return self._page(request, "Sign-out not possible", "This application's "
                              "sign-out request is not valid. Tell its administrator.", 400)
        if claims is None:
            # Without proof of which session the application means, a link on any page
            # could sign users out: leave that to the portal's own button.
            return self._page(request, "Sign out", "To sign out of the gateway too, use "
                              "Sign out in the portal.", 200, portal=True)
        session = await self._session(request)
        ended = session is not None and \
            self._provider.session_id(session.handle) == claims.get("sid")
        if ended and token is not None:
            await self._deps.sessions.end(token)
        self._audit.record("oidc.logout", client_id=client_id, user=claims.get("sub"),
                           gateway_session_ended=ended, client=_client_of(request))
        if target is not None:
            state = params.get("state")
            parts = urlsplit(target)
            query = "&".join(filter(None, [parts.query,
                                           urlencode({"state": state}) if state else ""]))
            response: Response = RedirectResponse(urlunsplit(parts._replace(query=query)),
                                                  303)
        else:
            response = self._page(request, "Signed out", "You are signed out.", 200,
                                  portal=True)
        if ended:
            response.delete_cookie(SESSION_COOKIE, secure=True, httponly=True,
                                   samesite="strict")
        return response

    # -- shared --------------------------------------------------------------------------
    async def _session(self, request: Request) -> Session | None:
        token = request.cookies.get(SESSION_COOKIE)
        return await self._deps.sessions.validate(token) if token else None

    def _same_site_again(self, request: Request) -> Response:
        """The session cookie is SameSite=Strict, so a browser arriving from another
        site does not send it. Ask the same URL again from a page of ours: that request
        is same-site and carries it (it has Sec-Fetch-Site: same-origin, so no loop)."""
        again = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        if request.method != "GET":
            again = request.url.path   # a POST's parameters are not repeated in a URL
        return self._page(request, "Continuing", "Continuing to the gateway...", 200,
                          again=again)

    def _page(self, request: Request, title: str, text: str, status: int, *,
              again: str | None = None, portal: bool = False) -> Response:
        response = self._templates.TemplateResponse(
            request, "message.html", {"title": title, "text": text, "again": again,
                                      "portal": portal}, status_code=status)
        response.headers.update(NO_STORE)
        return response


def _unavailable_on_store_error(
        endpoint: Callable[[Request], Awaitable[Response]]
) -> Callable[[Request], Awaitable[Response]]:
    async def guarded(request: Request) -> Response:
        try:
            return await endpoint(request)
        except StoreError as exc:
            log.error("store unavailable", path=request.url.path, error=str(exc))
            return JSONResponse({"error": "temporarily_unavailable"}, 503)
    return guarded


def _cross_site(request: Request) -> bool:
    return request.headers.get("sec-fetch-site") == "cross-site"


def _client_of(request: Request) -> str:
    return request.client.host if request.client else "unknown"


async def _parameters(request: Request) -> list[tuple[str, str]]:
    if request.method == "POST":
        form = await request.form()
        return [(name, value) for name, value in form.multi_items() if isinstance(value, str)]
    return parse_qsl(request.url.query, keep_blank_values=True)


async def _form(request: Request) -> dict[str, str] | None:
    """A token or revocation request's form; None if not one, or a field is repeated."""
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/x-www-form-urlencoded":
        return None
    items = parse_qsl((await request.body()).decode("utf-8", "replace"),
                      keep_blank_values=True)
    form = dict(items)
    return form if len(form) == len(items) else None


def _client_credentials(authorization: str, form: dict[str, str]) -> tuple[str,
                                                                           str | None] | None:
    """(client_id, secret or None) from HTTP Basic or the body; None if absent or both."""
    if authorization[:6].lower() == "basic ":
        if "client_secret" in form:
            return None
        try:
            decoded = base64.b64decode(authorization[6:].strip(), validate=True).decode()
        except ValueError:
            return None
        client_id, colon, secret = decoded.partition(":")
        if not colon:
            return None
        # RFC 6749 §2.3.1: both are form-urlencoded before they are joined.
        return unquote(client_id.replace("+", " ")), unquote(secret.replace("+", " "))
    named = form.get("client_id")
    return (named, form.get("client_secret")) if named else None


def _oauth_error(error: str, status: int, *, basic: bool = False) -> Response:
    headers: dict[str, Any] = dict(NO_STORE)
    if basic:
        headers["www-authenticate"] = 'Basic realm="portcullis"'
    return JSONResponse({"error": error}, status, headers=headers)
