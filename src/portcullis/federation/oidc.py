"""The OpenID Connect relying party: authorization code flow with PKCE, for one provider.

`RelyingParty` does the I/O (discovery, keys, token endpoint, userinfo); the checks are
pure functions that return the reason they refuse, or None:

- `check_callback`: the authorization response (state, error, RFC 9207 `iss`, code);
- `check_header`: the ID token's JOSE header (algorithm allow-list; never `none`, never
  HMAC; no key or key URL taken from the token itself);
- `check_claims`: iss, aud, azp, exp, iat, nbf, nonce, sub, with the clock skew allowed.

It also does the device authorization grant (RFC 8628), for a CLI whose browser cannot
reach its loopback: `device_authorization` begins one, `poll_device` asks the token
endpoint once whether the user has signed in; its ID token is checked as the code flow's,
except for the nonce (the grant has none).

The ID token's signature is verified by joserfc with the key from the provider's JWKS
only. Nothing here logs a code, a token or a client secret.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import quote, urlencode, urlsplit

import httpx
from joserfc import jws
from joserfc.errors import JoseError

from portcullis.errors import FederationError
from portcullis.federation.discovery import (
    ProviderMetadata,
    discovery_url,
    endpoint_problem,
    parse_metadata,
)
from portcullis.federation.http import JsonAnswer, get_json, parse_json, post_form
from portcullis.federation.jwks import ALGORITHM_KEYS, SigningKeys

# Header parameters that carry a key or say where to get one: a token must never choose
# the key it is checked with.
KEY_HEADERS = ("jwk", "jku", "x5u", "x5c")
MAX_CODE = 2048
MAX_ID_TOKEN = 64 * 1024
MAX_SUBJECT = 255          # OpenID Connect Core 2: sub is at most 255 ASCII characters
# How long a discovery document is trusted before it is read again.
METADATA_TTL = 3600.0
DEVICE_CODE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
# RFC 8628 3.2 and 3.5: the interval when the provider names none, and what slow_down adds.
DEVICE_INTERVAL = 5
SLOW_DOWN = 5
MAX_DEVICE_FIELD = 2048


@dataclass(frozen=True)
class Registration:
    """This gateway as a client of one provider."""

    issuer: str
    client_id: str
    client_secret: str | None          # None: a public client, PKCE only
    client_auth: Literal["client_secret_basic", "client_secret_post"] = "client_secret_basic"
    scopes: tuple[str, ...] = ("openid", "profile", "email")
    algorithms: tuple[str, ...] = ("RS256", "PS256", "ES256")
    clock_skew: float = 60.0
    userinfo: bool = True
    # Added to the authorization request (prompt, domain_hint, login_hint...).
    extra_params: Mapping[str, str] = field(default_factory=dict)
    jwks_refetch_interval: float = 60.0


@dataclass(frozen=True)
class AuthorizationRequest:
    url: str
    nonce: str
    verifier: str                       # the PKCE code verifier, kept until the callback


@dataclass(frozen=True)
class DeviceGrant:
    """A device authorization response (RFC 8628 3.2), checked."""

    device_code: str
    user_code: str
    verification_uri: str
    verification_uri_complete: str | None
    expires_in: int
    interval: int


@dataclass(frozen=True)
class DevicePending:
    """The user has not signed in yet; `slow_down`: the provider asks for a longer
    interval."""

    slow_down: bool


@dataclass(frozen=True)
class ClaimExpectations:
    issuer: str
    client_id: str
    # None only for the device grant, which has no nonce (RFC 8628); the code flow always
    # sends one and requires it back.
    nonce: str | None
    clock_skew: float


def pkce_challenge(verifier: str) -> str:
    """RFC 7636 S256: BASE64URL(SHA256(ASCII(verifier))), without padding."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def check_callback(answers: Mapping[str, str], expected_state: str, issuer: str,
                   issuer_required: bool) -> str | None:
    """Why an authorization response's code must not be redeemed, or None."""
    state = answers.get("state", "")
    if not hmac.compare_digest(state.encode(), expected_state.encode()):
        return "the callback's state does not match the sign-in's"
    iss = answers.get("iss")
    if iss is not None and iss != issuer:
        return f"the callback comes from issuer {iss[:200]!r}, not {issuer!r}"
    if iss is None and issuer_required:
        return "the callback lacks the iss parameter its provider promises (RFC 9207)"
    error = answers.get("error")
    if error is not None:
        description = answers.get("error_description", "")
        return (f"the provider answered error={error[:64]!r}"
                + (f": {description[:200]!r}" if description else ""))
    code = answers.get("code", "")
    if not code:
        return "the callback carries no code"
    if len(code) > MAX_CODE:
        return f"the callback's code is longer than {MAX_CODE} characters"
    return None


def check_header(header: Mapping[str, Any], algorithms: tuple[str, ...]) -> str | None:
    alg = header.get("alg")
    if not isinstance(alg, str):
        return "the ID token's header names no algorithm"
    if alg.lower() == "none":
        return "the ID token is not signed (alg none)"
    if alg.upper().startswith("HS"):
        return (f"the ID token is signed with HMAC ({alg}): refused, a provider signs "
                "with its private key")
    if alg not in algorithms or alg not in ALGORITHM_KEYS:
        return f"the ID token's algorithm {alg} is not one of this provider's {list(algorithms)}"
    for name in KEY_HEADERS:
        if name in header:
            return f"the ID token's header carries its own key ({name}): refused"
    kid = header.get("kid")
    if kid is not None and not isinstance(kid, str):
        return "the ID token's key id is not a string"
    if "crit" in header:
        return f"the ID token's header has critical extensions {header['crit']!r}"
    return None


def _number(value: Any) -> float | None:
    # bool is an int in Python; a JSON true is no time.
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def check_claims(claims: Mapping[str, Any], expect: ClaimExpectations,
                 now: float) -> str | None:
    """Why an ID token's claims are refused (OpenID Connect Core 3.1.3.7), or None."""
    iss = claims.get("iss")
    if not isinstance(iss, str):
        return "the ID token names no issuer (iss)"
    if iss != expect.issuer:
        return f"the ID token was issued by {iss[:200]!r}, not {expect.issuer!r}"
    aud = claims.get("aud")
    audiences = [aud] if isinstance(aud, str) else aud
    if not isinstance(audiences, list) or not all(isinstance(a, str) for a in audiences):
        return "the ID token's audience is missing or malformed"
    if expect.client_id not in audiences:
        return f"the ID token is for {audiences[:5]!r}, not for client {expect.client_id!r}"
    azp = claims.get("azp")
    if len(audiences) > 1 and azp is None:
        return "the ID token has several audiences and no azp"
    if azp is not None and azp != expect.client_id:
        return f"the ID token was issued to {str(azp)[:200]!r} (azp), not {expect.client_id!r}"
    exp = _number(claims.get("exp"))
    if exp is None:
        return "the ID token has no expiry (exp)"
    if now >= exp + expect.clock_skew:
        return f"the ID token expired {now - exp:.0f} s ago"
    iat = _number(claims.get("iat"))
    if iat is None:
        return "the ID token has no issue time (iat)"
    if iat > now + expect.clock_skew:
        return f"the ID token was issued {iat - now:.0f} s in the future (check the clocks)"
    nbf = claims.get("nbf")
    if nbf is not None:
        not_before = _number(nbf)
        if not_before is None or not_before > now + expect.clock_skew:
            return "the ID token is not valid yet (nbf)"
    nonce = claims.get("nonce")
    if expect.nonce is not None and (
            not isinstance(nonce, str)
            or not hmac.compare_digest(nonce.encode(), expect.nonce.encode())):
        return "the ID token's nonce is not this sign-in's"
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub or len(sub) > MAX_SUBJECT:
        return "the ID token's subject (sub) is missing or malformed"
    return None


def parse_device_grant(body: Mapping[str, Any], issuer: str) -> DeviceGrant:
    """A device authorization response, checked (RFC 8628 3.2): the URLs shown to the user
    must be web URLs of the provider's kind (https; http on loopback for a loopback
    issuer), the times positive integers."""
    texts: dict[str, str] = {}
    for key in ("device_code", "user_code", "verification_uri"):
        value = body.get(key)
        if not isinstance(value, str) or not 0 < len(value) <= MAX_DEVICE_FIELD:
            raise FederationError(f"the device authorization response's {key} is missing "
                                  "or malformed", unavailable=True)
        texts[key] = value
    complete = body.get("verification_uri_complete")
    if complete is not None and (not isinstance(complete, str)
                                 or len(complete) > MAX_DEVICE_FIELD):
        raise FederationError("the device authorization response's verification_uri_complete "
                              "is malformed", unavailable=True)
    for url in (texts["verification_uri"], complete):
        problem = url and endpoint_problem(url, issuer)
        if problem:
            raise FederationError(f"the device authorization response: {problem}",
                                  unavailable=True)
    expires_in, interval = body.get("expires_in"), body.get("interval", DEVICE_INTERVAL)
    for key, value in (("expires_in", expires_in), ("interval", interval)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise FederationError(f"the device authorization response's {key} is not a "
                                  "positive number of seconds", unavailable=True)
    assert isinstance(expires_in, int) and isinstance(interval, int)
    return DeviceGrant(texts["device_code"], texts["user_code"], texts["verification_uri"],
                       complete, expires_in, interval)


class RelyingParty:
    """One provider, as `registration` describes it; `http` is built over the node's
    Dialer by the caller (and closed by it)."""

    def __init__(self, registration: Registration, http: httpx.AsyncClient, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.registration = registration
        self._http = http
        self._clock = clock
        self._metadata: ProviderMetadata | None = None
        self._metadata_at = 0.0
        self.keys = SigningKeys(self._fetch_jwks,
                                refetch_interval=registration.jwks_refetch_interval)

    async def close(self) -> None:
        await self._http.aclose()

    async def metadata(self) -> ProviderMetadata:
        now = self._clock()
        if self._metadata is None or now - self._metadata_at > METADATA_TTL:
            issuer = self.registration.issuer
            answer = await get_json(self._http, discovery_url(issuer),
                                    what="discovery document")
            if answer.status != 200:
                raise FederationError(f"the discovery document at {discovery_url(issuer)} "
                                      f"answered HTTP {answer.status}", unavailable=True)
            self._metadata = parse_metadata(answer.body, issuer)
            self._metadata_at = now
        return self._metadata

    async def authorization_request(self, callback: str, state: str) -> AuthorizationRequest:
        metadata = await self.metadata()
        nonce = secrets.token_urlsafe(24)
        verifier = secrets.token_urlsafe(48)      # 64 characters (RFC 7636: 43 to 128)
        reg = self.registration
        params = {**reg.extra_params,
                  "response_type": "code", "client_id": reg.client_id,
                  "redirect_uri": callback, "scope": " ".join(reg.scopes),
                  "state": state, "nonce": nonce,
                  "code_challenge": pkce_challenge(verifier), "code_challenge_method": "S256"}
        separator = "&" if urlsplit(metadata.authorization_endpoint).query else "?"
        return AuthorizationRequest(
            metadata.authorization_endpoint + separator + urlencode(params), nonce, verifier)

    async def complete(self, answers: Mapping[str, str], *, state: str, nonce: str,
                       verifier: str, callback: str) -> dict[str, Any]:
        """The verified claims of the callback `answers` (the ID token's, with userinfo's
        added where the ID token has none); FederationError carries the reason."""
        metadata = await self.metadata()
        problem = check_callback(answers, state, metadata.issuer, metadata.issuer_in_response)
        if problem:
            raise FederationError(problem)
        tokens = await self._token(metadata, {
            "grant_type": "authorization_code", "code": answers["code"],
            "redirect_uri": callback, "code_verifier": verifier}, "the code")
        return await self._claims(metadata, tokens, nonce)

    async def device_authorization(self) -> DeviceGrant | None:
        """A new device authorization at the provider, or None if it offers none."""
        metadata = await self.metadata()
        endpoint = metadata.device_authorization_endpoint
        if endpoint is None:
            return None
        form = {"scope": " ".join(self.registration.scopes)}
        answer = await post_form(self._http, endpoint, form, what="device authorization "
                                 "endpoint", headers=self._authenticate(form))
        if answer.status != 200:
            error = str(answer.body.get("error", "?"))[:64]
            raise FederationError(f"the device authorization endpoint refused: {error}",
                                  unavailable=True)
        return parse_device_grant(answer.body, metadata.issuer)

    async def poll_device(self, device_code: str) -> dict[str, Any] | DevicePending:
        """Ask the token endpoint once for the device authorization's tokens: the verified
        claims, or DevicePending; FederationError says why it was refused (access_denied,
        expired_token...)."""
        metadata = await self.metadata()
        form = {"grant_type": DEVICE_CODE_GRANT, "device_code": device_code}
        answer = await post_form(self._http, metadata.token_endpoint, form,
                                 what="token endpoint", headers=self._authenticate(form))
        error = answer.body.get("error") if answer.status == 400 else None
        if error in ("authorization_pending", "slow_down"):
            return DevicePending(slow_down=error == "slow_down")
        tokens = self._tokens_of(answer, "the device code")
        return await self._claims(metadata, tokens, None)

    async def _claims(self, metadata: ProviderMetadata, tokens: dict[str, Any],
                      nonce: str | None) -> dict[str, Any]:
        claims = await self.verify_id_token(tokens.get("id_token"), nonce)
        access_token = tokens.get("access_token")
        if (self.registration.userinfo and metadata.userinfo_endpoint
                and isinstance(access_token, str)):
            extra = await self._userinfo(metadata.userinfo_endpoint, access_token)
            if extra.get("sub") != claims["sub"]:
                raise FederationError("userinfo describes another subject than the ID token")
            claims = {**extra, **claims}
        return claims

    async def verify_id_token(self, token: Any, nonce: str | None) -> dict[str, Any]:
        """The ID token's verified claims; `nonce` None only for the device grant."""
        if not isinstance(token, str) or not token:
            raise FederationError("the token endpoint answered no ID token")
        if len(token) > MAX_ID_TOKEN:
            raise FederationError(f"the ID token is longer than {MAX_ID_TOKEN} characters")
        reg = self.registration
        try:
            unverified = jws.extract_compact(token.encode("ascii"))
        except (JoseError, ValueError, UnicodeEncodeError) as exc:
            raise FederationError(f"the ID token is not a signed JWT: {exc}") from None
        header = unverified.headers()
        problem = check_header(header, reg.algorithms)
        if problem:
            raise FederationError(problem)
        alg = str(header["alg"])
        key = await self.keys.key_for(header.get("kid"), alg)
        try:
            verified = jws.deserialize_compact(token, key, algorithms=[alg])
        except JoseError as exc:
            raise FederationError(f"the ID token's signature does not verify "
                                  f"(key {header.get('kid')!r}, {alg}): {exc}") from None
        try:
            claims = parse_json(verified.payload, "ID token")
        except FederationError:
            raise FederationError("the ID token's payload is not a JSON object") from None
        expect = ClaimExpectations(reg.issuer, reg.client_id, nonce, reg.clock_skew)
        problem = check_claims(claims, expect, self._clock())
        if problem:
            raise FederationError(problem)
        return claims

    def _authenticate(self, form: dict[str, str]) -> dict[str, str]:
        """Add this client's authentication to `form`; the headers that carry it."""
        reg = self.registration
        if reg.client_secret is None:
            form["client_id"] = reg.client_id
        elif reg.client_auth == "client_secret_post":
            form |= {"client_id": reg.client_id, "client_secret": reg.client_secret}
        else:
            # RFC 6749 2.3.1: both are form-encoded before they are joined and encoded.
            pair = f"{quote(reg.client_id, safe='')}:{quote(reg.client_secret, safe='')}"
            return {"Authorization": "Basic " + base64.b64encode(pair.encode()).decode()}
        return {}

    async def _token(self, metadata: ProviderMetadata, form: dict[str, str],
                     what: str) -> dict[str, Any]:
        answer = await post_form(self._http, metadata.token_endpoint, form,
                                 what="token endpoint", headers=self._authenticate(form))
        return self._tokens_of(answer, what)

    @staticmethod
    def _tokens_of(answer: JsonAnswer, what: str) -> dict[str, Any]:
        """The token endpoint's tokens, or FederationError saying why it refused `what`."""
        if answer.status != 200:
            error = str(answer.body.get("error", "?"))[:64]
            description = str(answer.body.get("error_description", ""))[:200]
            raise FederationError(f"the token endpoint refused {what}: {error}"
                                  + (f" ({description})" if description else ""),
                                  unavailable=error == "invalid_client")
        token_type = answer.body.get("token_type")
        if not isinstance(token_type, str) or token_type.lower() != "bearer":
            raise FederationError(f"the token endpoint answered token_type {token_type!r}, "
                                  "not Bearer")
        return answer.body

    async def _userinfo(self, endpoint: str, access_token: str) -> dict[str, Any]:
        answer = await get_json(self._http, endpoint, what="userinfo endpoint",
                                headers={"Authorization": f"Bearer {access_token}"})
        if answer.status != 200:
            raise FederationError(f"the userinfo endpoint answered HTTP {answer.status}",
                                  unavailable=True)
        return answer.body

    async def _fetch_jwks(self) -> dict[str, Any]:
        metadata = await self.metadata()
        answer = await get_json(self._http, metadata.jwks_uri, what="JWKS")
        if answer.status != 200:
            raise FederationError(f"the JWKS at {metadata.jwks_uri} answered HTTP "
                                  f"{answer.status}", unavailable=True)
        return answer.body

