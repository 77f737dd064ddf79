"""Who the user is, told to the application: the `X-Portcullis-Assertion` JWT.

ES256, signed with the deployment's signing key (the OpenID provider's key ring,
`idp.keys.KeyRing`, which exists whether or not the provider is enabled); its public
keys at `https://GATEWAY/.well-known/jwks.json`. Claims: iss = the gateway's public URL,
aud = the resource's public origin (https://NAME[:PORT], what the application is
reached at), sub, username, email, groups, iat, exp (at most 60 s later). A fresh
assertion goes with every request, so a change of groups shows at once.

Never logs an assertion.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from joserfc import jwt

from portcullis.identity.claims import Claims
from portcullis.idp.keys import ALGORITHM, KeyRing
from portcullis.webproxy.rewrite import ASSERTION_HEADER, Headers
from portcullis.webproxy.sites import Site

LIFETIME = 60
JWKS_PATH = "/.well-known/jwks.json"


def assertion_claims(claims: Claims, site: Site, issuer: str, now: int) -> dict[str, Any]:
    return {"iss": issuer, "aud": site.public_origin, "sub": claims.sub,
            "username": claims.username, "email": claims.email,
            "groups": list(claims.groups), "iat": now, "exp": now + LIFETIME}


def identity_headers(claims: Claims) -> Headers:
    """The plain X-Forwarded-User/-Email/-Groups an application may ask for."""
    headers = [(b"x-forwarded-user", claims.username.encode())]
    if claims.email:
        headers.append((b"x-forwarded-email", claims.email.encode()))
    headers.append((b"x-forwarded-groups", ",".join(claims.groups).encode()))
    return headers


class Asserter:
    def __init__(self, keys: KeyRing, issuer: str, *,
                 clock: Callable[[], float] = time.time) -> None:
        self._keys = keys
        self._issuer = issuer
        self._clock = clock

    async def headers(self, claims: Claims, site: Site) -> Headers:
        active = await self._keys.active()
        token = jwt.encode({"alg": ALGORITHM, "kid": active.signing.kid, "typ": "JWT"},
                           assertion_claims(claims, site, self._issuer, int(self._clock())),
                           active.signing)
        headers = [(ASSERTION_HEADER, token.encode())]
        if site.resource.identity_headers:
            headers += identity_headers(claims)
        return headers

    async def jwks(self) -> dict[str, object]:
        return (await self._keys.active()).jwks
