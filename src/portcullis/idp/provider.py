"""The provider's state: codes, grants, refresh and access tokens, and the tokens it signs.

Everything lives in the ephemeral store, sealed (`SealedRecords`, kind "oidc"), keyed
by the keyed hash of the secret it stands for (codes, refresh tokens) or a random id:

    oidc-code:H          an authorization code (IssuedCode), taken atomically once
    oidc-code-used:H     a redeemed code -> its grant, so a second use revokes the grant
    oidc-grant:G         a grant: client, gateway session, scopes; every token of the
                         grant dies with it (revocation, reuse of its code or of a spent
                         refresh token)
    oidc-refresh:H       the grant's one live refresh token -> G; spent on use
    oidc-refresh-used:H  a spent refresh token -> G: presented again, it revokes G
    oidc-access:J        an access token (jti J) -> G, so RFC 7009 can revoke it

A grant is only as alive as the gateway session it came from: every refresh and every
userinfo call asks the session manager, so signing out of the gateway, an administrator
ending the session, or a disabled account stops the application's tokens at once.

Never logs or audits a code or a token, only who, which client and why.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwt import JWTClaimsRegistry

from portcullis.audit import AuditTrail
from portcullis.config.idp import OidcClient, OidcSettings
from portcullis.identity.sessions import Session, SessionManager
from portcullis.idp.decisions import (
    Accepted,
    AuthorizeRequest,
    IssuedCode,
    check_redemption,
    claims_for,
)
from portcullis.idp.keys import ALGORITHM, KeyRing
from portcullis.store import EphemeralStore, SealedRecords
from portcullis.tokens import TokenHasher, new_token


@dataclass(frozen=True)
class Tokens:
    access_token: str
    id_token: str
    refresh_token: str
    expires_in: int
    scope: str
    user: str            # who, for the audit trail; not part of the answer

    def to_json(self) -> dict[str, Any]:
        answer = {**asdict(self), "token_type": "Bearer"}
        del answer["user"]
        return answer


@dataclass(frozen=True)
class TokenRefused:
    error: str       # the OAuth error code for the application
    reason: str      # for the audit trail


@dataclass(frozen=True)
class Grant:
    client_id: str
    session: str              # the gateway session's handle
    scopes: tuple[str, ...]


class OpenIdProvider:
    def __init__(self, settings: OidcSettings, issuer: str, sessions: SessionManager,
                 ephemeral: EphemeralStore, keys: KeyRing, hasher: TokenHasher,
                 audit: AuditTrail, client_secrets: Mapping[str, bytes], *,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.issuer = issuer
        self.keys = keys
        self._sessions = sessions
        self._records = SealedRecords(ephemeral, hasher, "oidc", audit)
        self._ephemeral = ephemeral
        self._hasher = hasher
        self._audit = audit
        # SHA-256 of each confidential client's secret: compared in constant time.
        self._secrets = client_secrets
        self._clock = clock

    # -- clients and sessions ------------------------------------------------------
    def client_authenticated(self, client: OidcClient, secret: str | None) -> bool:
        """A confidential client proves its secret; a public one must not send any."""
        expected = self._secrets.get(client.id)
        if expected is None:
            return secret is None
        presented = hashlib.sha256((secret or "").encode()).digest()
        return secret is not None and hmac.compare_digest(presented, expected)

    def session_id(self, session_handle: str) -> str:
        """The OpenID `sid` of a gateway session: stable for the session, the same for
        every application, and not the handle itself (which administrators see)."""
        return self._hasher.digest("oidc-sid", session_handle)[:32]

    # -- authorization codes -------------------------------------------------------
    async def issue_code(self, accepted: Accepted, request: AuthorizeRequest,
                         session: Session) -> str:
        code = new_token()
        issued = IssuedCode(accepted.client.id, request.redirect_uri,
                            request.code_challenge or "", accepted.scopes, request.nonce,
                            session.handle)
        await self._records.put(f"oidc-code:{self._hasher.digest('oidc-code', code)}",
                                json.dumps(asdict(issued)).encode(),
                                self.settings.code_lifetime)
        return code

    async def redeem_code(self, client: OidcClient, code: str, redirect_uri: str | None,
                          verifier: str | None) -> Tokens | TokenRefused:
        digest = self._hasher.digest("oidc-code", code)
        raw = await self._records.take(f"oidc-code:{digest}")
        if raw is None:
            used = await self._records.get(f"oidc-code-used:{digest}")
            if used is not None:
                # RFC 6749 §4.1.2: a code used twice revokes what it gave; the first
                # redemption may have been the attacker's.
                await self._end_grant(used.decode())
                return TokenRefused("invalid_grant", "authorization code used twice: "
                                    "the tokens issued for it are revoked")
            return TokenRefused("invalid_grant", "unknown or expired authorization code")
        fields = json.loads(raw)
        issued = IssuedCode(**{**fields, "scopes": tuple(fields["scopes"])})
        grant_id = secrets.token_hex(16)
        await self._records.put(f"oidc-code-used:{digest}", grant_id.encode(),
                                self.settings.refresh_token_lifetime)
        verdict = check_redemption(issued, client.id, redirect_uri, verifier)
        if not verdict.allowed:
            return TokenRefused("invalid_grant", verdict.reason)
        session = await self._live_session(issued.session)
        if session is None:
            return TokenRefused("invalid_grant", "the gateway session has ended")
        grant = Grant(client.id, session.handle, issued.scopes)
        return await self._issue(grant_id, grant, session, client, nonce=issued.nonce)

    # -- refresh tokens --------------------------------------------------------------
    async def refresh(self, client: OidcClient, token: str) -> Tokens | TokenRefused:
        digest = self._hasher.digest("oidc-refresh", token)
        raw = await self._records.take(f"oidc-refresh:{digest}")
        if raw is None:
            spent = await self._records.get(f"oidc-refresh-used:{digest}")
            if spent is not None:
                # Rotation's point: a spent token back means two parties hold the grant.
                await self._end_grant(spent.decode())
                return TokenRefused("invalid_grant", "a spent refresh token was used "
                                    "again: its grant is revoked")
            return TokenRefused("invalid_grant", "unknown or expired refresh token")
        grant_id = raw.decode()
        await self._records.put(f"oidc-refresh-used:{digest}", raw,
                                self.settings.refresh_token_lifetime)
        grant = await self._grant(grant_id)
        if grant is None:
            return TokenRefused("invalid_grant", "the grant was revoked")
        if grant.client_id != client.id:
            await self._end_grant(grant_id)
            return TokenRefused("invalid_grant", f"client {client.id} presented client "
                                f"{grant.client_id}'s refresh token: grant revoked")
        session = await self._live_session(grant.session)
        if session is None:
            await self._end_grant(grant_id)
            return TokenRefused("invalid_grant", "the gateway session has ended")
        return await self._issue(grant_id, grant, session, client, nonce=None)

    # -- access tokens ---------------------------------------------------------------
    async def userinfo(self, access_token: str) -> dict[str, Any] | str:
        """The claims an access token may read, or why it may not."""
        claims = await self._verified(access_token, "at+jwt")
        if claims is None:
            return "not a valid access token of this provider"
        raw = await self._records.get(f"oidc-access:{claims.get('jti')}")
        grant = await self._grant(raw.decode()) if raw is not None else None
        if grant is None:
            return "the access token or its grant was revoked"
        session = await self._live_session(grant.session)
        if session is None:
            return "the gateway session has ended"
        return claims_for(session.claims, grant.scopes, self.session_id(session.handle))

    async def revoke(self, client: OidcClient, token: str) -> str:
        """RFC 7009: revoke a refresh token (its grant) or an access token of `client`.
        Returns what was done, for the audit trail; the client is told 200 whatever."""
        digest = self._hasher.digest("oidc-refresh", token)
        raw = await self._records.get(f"oidc-refresh:{digest}")
        if raw is not None:
            grant = await self._grant(raw.decode())
            if grant is not None and grant.client_id == client.id:
                await self._ephemeral.delete(f"oidc-refresh:{digest}")
                await self._end_grant(raw.decode())
                return "refresh token revoked with its grant"
            return "another client's refresh token: nothing revoked"
        claims = await self._verified(token, "at+jwt")
        if claims is not None and claims.get("client_id") == client.id:
            await self._ephemeral.delete(f"oidc-access:{claims.get('jti')}")
            return "access token revoked"
        return "not a token of this client: nothing revoked"

    async def id_token_hint(self, hint: str) -> dict[str, Any] | None:
        """The claims of an ID token this provider signed, expired or not (RP-initiated
        logout sends old ones); None if it is not one."""
        return await self._verified(hint, "JWT", check_expiry=False)

    # -- internals -------------------------------------------------------------------
    async def _issue(self, grant_id: str, grant: Grant, session: Session, client: OidcClient,
                     *, nonce: str | None) -> Tokens:
        now = int(self._clock())
        settings = self.settings
        session_left = self._sessions.absolute_end(session) - now
        grant_ttl = max(1.0, min(settings.refresh_token_lifetime, session_left))
        await self._records.put(f"oidc-grant:{grant_id}", json.dumps(asdict(grant)).encode(),
                                grant_ttl)
        refresh_token = new_token()
        await self._records.put(
            f"oidc-refresh:{self._hasher.digest('oidc-refresh', refresh_token)}",
            grant_id.encode(), grant_ttl)
        jti = secrets.token_urlsafe(16)
        await self._records.put(f"oidc-access:{jti}", grant_id.encode(),
                                settings.access_token_lifetime)
        user = claims_for(session.claims, grant.scopes, self.session_id(session.handle))
        active = await self.keys.active()
        scope = " ".join(grant.scopes)
        access = jwt.encode(
            {"alg": ALGORITHM, "kid": active.signing.kid, "typ": "at+jwt"},
            {**user, "iss": self.issuer, "aud": client.id, "client_id": client.id,
             "iat": now, "exp": now + int(settings.access_token_lifetime), "jti": jti,
             "scope": scope}, active.signing)
        id_claims = {**user, "iss": self.issuer, "aud": client.id, "azp": client.id,
                     "iat": now, "exp": now + int(settings.id_token_lifetime)}
        if nonce is not None:
            id_claims["nonce"] = nonce
        id_token = jwt.encode({"alg": ALGORITHM, "kid": active.signing.kid, "typ": "JWT"},
                              id_claims, active.signing)
        return Tokens(access, id_token, refresh_token, int(settings.access_token_lifetime),
                      scope, session.username)

    async def _verified(self, token: str, typ: str, *,
                        check_expiry: bool = True) -> dict[str, Any] | None:
        if len(token) > 8192:
            return None
        active = await self.keys.active()
        try:
            decoded = jwt.decode(token, active.verifying, algorithms=[ALGORITHM])
            if decoded.header.get("typ") != typ:
                return None
            options: dict[str, Any] = {"iss": {"essential": True, "value": self.issuer}}
            if check_expiry:
                options["exp"] = {"essential": True}
            JWTClaimsRegistry(now=lambda: int(self._clock()), **options).validate(
                decoded.claims)
        except (JoseError, ValueError):
            return None
        return dict(decoded.claims)

    async def _grant(self, grant_id: str) -> Grant | None:
        raw = await self._records.get(f"oidc-grant:{grant_id}")
        if raw is None:
            return None
        fields = json.loads(raw)
        return Grant(**{**fields, "scopes": tuple(fields["scopes"])})

    async def _end_grant(self, grant_id: str) -> None:
        await self._ephemeral.delete(f"oidc-grant:{grant_id}")

    async def _live_session(self, handle: str) -> Session | None:
        standing = await self._sessions.standing(handle)
        return standing if isinstance(standing, Session) else None

