"""The provider's decisions, pure: is this authorization request acceptable, may this
user use this application, does this code redemption match its code; and which claims a
token carries. Each refusal says why (the audit trail gets the reason; the application
gets only the OAuth error code).

No I/O, no clock, no store: the endpoints call these once per request.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from portcullis.config.idp import OidcClient, OidcSettings
from portcullis.identity.claims import Claims

# RFC 7636 §4.1: 43-128 unreserved characters; an S256 challenge is 32 bytes, base64url.
_VERIFIER = re.compile(r"[A-Za-z0-9._~-]{43,128}")
_S256_CHALLENGE = re.compile(r"[A-Za-z0-9_-]{43}")
# RFC 6749 §3.1: a parameter sent twice is an invalid request (which one would we obey?).
_SINGLE = ("client_id", "redirect_uri", "response_type", "scope", "state", "nonce",
           "code_challenge", "code_challenge_method", "prompt", "max_age")
# After the fresh sign-in an application asked for (prompt=login, a max_age the session
# is older than), the request goes on with max_age at least this: the new sign-in
# satisfies it, and asking again does not loop.
FRESH_WINDOW = 120


@dataclass(frozen=True)
class AuthorizeRequest:
    client_id: str
    redirect_uri: str
    response_type: str
    scopes: tuple[str, ...]
    state: str | None
    nonce: str | None
    code_challenge: str | None
    code_challenge_method: str | None
    prompt: str | None
    max_age: str | None = None           # seconds, as the application wrote it
    repeated: tuple[str, ...] = ()       # parameters given more than once
    request_object: bool = False         # `request` / `request_uri` (not supported)

    @classmethod
    def from_params(cls, items: Iterable[tuple[str, str]]) -> AuthorizeRequest:
        values: dict[str, list[str]] = {}
        for name, value in items:
            values.setdefault(name, []).append(value)

        def one(name: str) -> str | None:
            given = values.get(name)
            return given[0] if given else None

        return cls(
            client_id=one("client_id") or "", redirect_uri=one("redirect_uri") or "",
            response_type=one("response_type") or "",
            scopes=tuple((one("scope") or "").split()), state=one("state"),
            nonce=one("nonce"), code_challenge=one("code_challenge"),
            code_challenge_method=one("code_challenge_method"), prompt=one("prompt"),
            max_age=one("max_age"),
            repeated=tuple(name for name in _SINGLE if len(values.get(name, ())) > 1),
            request_object="request" in values or "request_uri" in values)


@dataclass(frozen=True)
class Refused:
    error: str            # the OAuth 2.0 error code the application may be told
    reason: str           # why, for the audit trail and the administrator
    # The client and its redirect URI are known good, so the browser may be sent back
    # to the application with the error. Otherwise it must not go anywhere: sending it
    # to an unchecked URI would make the gateway an open redirector.
    redirectable: bool


@dataclass(frozen=True)
class Accepted:
    client: OidcClient
    scopes: tuple[str, ...]   # what the application gets: asked for and allowed
    reason: str


def check_authorize(settings: OidcSettings, request: AuthorizeRequest) -> Accepted | Refused:
    """Whether an authorization request may go on to the user's sign-in."""
    client = settings.client(request.client_id) if request.client_id else None
    if {"client_id", "redirect_uri"} & set(request.repeated):
        return Refused("invalid_request", "client_id or redirect_uri given twice", False)
    if client is None:
        return Refused("invalid_request", f"unknown client {request.client_id!r}", False)
    if request.redirect_uri not in client.redirect_uris:
        # Exact comparison only: a URI sharing a prefix, a path or a host is another URI.
        return Refused("invalid_request", f"redirect_uri {request.redirect_uri!r} is not "
                       f"registered for client {client.id}", False)
    if request.repeated:
        return Refused("invalid_request", f"{request.repeated[0]} given twice", True)
    if request.request_object:
        return Refused("request_not_supported", "request objects are not supported", True)
    if request.response_type != "code":
        return Refused("unsupported_response_type", f"response_type "
                       f"{request.response_type!r}: only 'code' is supported", True)
    if "openid" not in request.scopes:
        return Refused("invalid_scope", "the scope does not include 'openid'", True)
    if request.code_challenge is None:
        return Refused("invalid_request", "no PKCE code_challenge (PKCE with S256 is "
                       "required of every client)", True)
    if request.code_challenge_method != "S256":
        return Refused("invalid_request", f"code_challenge_method "
                       f"{request.code_challenge_method or 'plain'!r}: only S256 is "
                       "accepted", True)
    if not _S256_CHALLENGE.fullmatch(request.code_challenge):
        return Refused("invalid_request", "the code_challenge is not an S256 challenge", True)
    scopes = tuple(scope for scope in dict.fromkeys(request.scopes) if scope in client.scopes)
    return Accepted(client, scopes, f"client {client.id}, redirect URI registered, PKCE S256")


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    reason: str


def may_use(client: OidcClient, claims: Claims) -> Verdict:
    """Whether the signed-in user may use `client`: a member of one of its groups."""
    shared = sorted(set(client.groups) & set(claims.groups))
    if shared:
        return Verdict(True, f"member of group {shared[0]}")
    return Verdict(False, f"{claims.username} is in none of the groups {client.groups} "
                   f"of client {client.id}")


def s256(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


@dataclass(frozen=True)
class IssuedCode:
    """What an authorization code stands for, as issued."""

    client_id: str
    redirect_uri: str
    code_challenge: str
    scopes: tuple[str, ...]
    nonce: str | None
    session: str          # the gateway session's handle


def check_redemption(code: IssuedCode, client_id: str, redirect_uri: str | None,
                     verifier: str | None) -> Verdict:
    """Whether a token request may redeem `code` (RFC 6749 §4.1.3, RFC 7636 §4.6)."""
    if code.client_id != client_id:
        return Verdict(False, f"the code was issued to client {code.client_id}, "
                       f"not {client_id}")
    if redirect_uri != code.redirect_uri:
        return Verdict(False, "redirect_uri differs from the authorization request's")
    if verifier is None or not _VERIFIER.fullmatch(verifier):
        return Verdict(False, "no valid PKCE code_verifier")
    if not hmac.compare_digest(s256(verifier), code.code_challenge):
        return Verdict(False, "the PKCE code_verifier does not match the code_challenge")
    return Verdict(True, "client, redirect URI and PKCE verifier match")


def claims_for(claims: Claims, scopes: Sequence[str], sid: str) -> dict[str, Any]:
    """The broker's claims as ID token, access token and userinfo claims, by scope.

    `sid` is the OpenID session id (Front-Channel / Back-Channel Logout), so the
    directory's security identifier goes as `onprem_sid`, the name Azure AD uses.
    """
    out: dict[str, Any] = {"sub": claims.sub, "auth_time": int(claims.auth_time),
                           "amr": list(claims.amr), "idp": claims.idp, "sid": sid}
    if "profile" in scopes:
        out.update(preferred_username=claims.username, name=claims.display_name,
                   upn=claims.upn, onprem_sid=claims.sid, guid=claims.guid)
    if "email" in scopes:
        out["email"] = claims.email
    if "groups" in scopes:
        out["groups"] = list(claims.groups)
    return {name: value for name, value in out.items() if value is not None}


def stale_sign_in(asked: AuthorizeRequest, auth_time: float, now: float) -> str | None:
    """Why the application wants the user to sign in again before it gets a code
    (OpenID Connect Core 3.1.2.1: prompt=login, max_age), or None."""
    if "login" in (asked.prompt or "").split():
        return "the application asked for a fresh sign-in (prompt=login)"
    if asked.max_age is not None:
        if not asked.max_age.isdigit():
            return f"max_age {asked.max_age[:20]!r} is not a number of seconds: sign in again"
        if now - auth_time > int(asked.max_age):
            return (f"the sign-in is {now - auth_time:.0f} s old, more than the "
                    f"application's max_age {asked.max_age}")
    return None


def after_fresh_sign_in(items: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The authorization request to go on with once the user has signed in again: no
    prompt=login, max_age at least FRESH_WINDOW."""
    kept = [(name, value) for name, value in items if name not in ("prompt", "max_age")]
    asked = dict(items)
    prompts = [p for p in asked.get("prompt", "").split() if p != "login"]
    if prompts:
        kept.append(("prompt", " ".join(prompts)))
    given = asked.get("max_age", "")
    kept.append(("max_age", str(max(int(given) if given.isdigit() else 0, FRESH_WINDOW))))
    return kept
