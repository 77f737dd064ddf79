"""A provider's signing keys (its JWKS), cached, refreshed when the provider rotates.

Keys come only from the provider's `jwks_uri`, never from a token (`jwk`, `jku`, `x5u`,
`x5c` headers are refused by `oidc.check_header` before a key is looked for). Only the
public members of asymmetric keys are imported: a symmetric ("oct") key in a JWKS is
dropped, so no token can be checked with HMAC over something public.

An ID token naming a key id the cache does not hold makes one refetch (the provider has
rotated), at most once per `refetch_interval` seconds: a stream of tokens with made-up key
ids cannot make the gateway hammer the provider.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import structlog
from joserfc import jwk
from joserfc.errors import JoseError

from portcullis.errors import FederationError

# The members that make up each key type's public key (RFC 7518 section 6).
PUBLIC_MEMBERS = {"RSA": ("n", "e"), "EC": ("crv", "x", "y"), "OKP": ("crv", "x")}
# Which key each signature algorithm needs (and, for EC, on which curve).
ALGORITHM_KEYS: dict[str, tuple[str, str | None]] = {
    **{f"{family}{bits}": ("RSA", None) for family in ("RS", "PS") for bits in (256, 384, 512)},
    "ES256": ("EC", "P-256"), "ES384": ("EC", "P-384"), "ES512": ("EC", "P-521"),
    "EdDSA": ("OKP", None), "Ed25519": ("OKP", "Ed25519"),
}
MAX_KEYS = 64
log = structlog.get_logger("portcullis.federation.jwks")


def parse_jwks(document: Mapping[str, Any]) -> dict[str, jwk.Key]:
    """The signing keys of a JWKS document by key id ("" for a key without one)."""
    members = document.get("keys")
    if not isinstance(members, list):
        raise FederationError("the provider's JWKS has no 'keys' list", unavailable=True)
    keys: dict[str, jwk.Key] = {}
    for member in members[:MAX_KEYS]:
        if not isinstance(member, dict) or member.get("use", "sig") != "sig":
            continue
        kty = member.get("kty")
        if kty not in PUBLIC_MEMBERS:
            continue       # "oct" among them: never a key to check signatures with here
        public = {name: member[name] for name in ("kty", "kid", "alg", *PUBLIC_MEMBERS[kty])
                  if name in member}
        try:
            key = jwk.import_key(public)
        except (JoseError, ValueError, TypeError) as exc:
            # One key this library cannot read (a new type, a typo) must not stop the
            # sign-ins that the provider's other keys sign.
            log.warning("JWKS key skipped", kid=member.get("kid"), error=str(exc))
            continue
        keys[str(member.get("kid", ""))] = key
    return keys


def select_key(keys: Mapping[str, jwk.Key], kid: str | None, alg: str) -> jwk.Key | None:
    """The key a token with this `kid` and `alg` must verify with, or None. A token
    without a key id matches only when exactly one key suits its algorithm."""
    suited = {name: key for name, key in keys.items() if key_suits(key, alg)}
    if kid is not None:
        return suited.get(kid)
    return next(iter(suited.values())) if len(suited) == 1 else None


def key_suits(key: jwk.Key, alg: str) -> bool:
    kty, curve = ALGORITHM_KEYS.get(alg, ("", None))
    if key.key_type != kty:
        return False
    if curve is not None and key.get("crv") != curve:
        return False
    declared = key.get("alg")
    return declared is None or declared == alg


class SigningKeys:
    """The cached key set of one provider; `fetch` returns its JWKS document."""

    def __init__(self, fetch: Callable[[], Awaitable[Mapping[str, Any]]], *,
                 refetch_interval: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._fetch = fetch
        self._interval = refetch_interval
        self._clock = clock
        self._keys: dict[str, jwk.Key] | None = None
        self._refetched_at: float | None = None
        # One fetch at a time: sign-ins that meet the same new key wait for one refetch.
        self._lock = asyncio.Lock()

    def _select(self, kid: str | None, alg: str) -> jwk.Key | None:
        return None if self._keys is None else select_key(self._keys, kid, alg)

    async def key_for(self, kid: str | None, alg: str) -> jwk.Key:
        key = self._select(kid, alg)
        if key is not None:
            return key
        async with self._lock:
            if self._keys is None:
                self._keys = parse_jwks(await self._fetch())
                key = self._select(kid, alg)
                if key is None:
                    raise FederationError(f"the ID token names key {kid!r} ({alg}), which "
                                          "the provider's JWKS does not hold")
                return key
            # Another sign-in may have refetched while this one waited.
            key = self._select(kid, alg)
            if key is not None:
                return key
            now = self._clock()
            if self._refetched_at is not None and now - self._refetched_at < self._interval:
                raise FederationError(f"the ID token names key {kid!r} ({alg}), which the "
                                      "provider's JWKS does not hold (not refetched: the last "
                                      f"refetch was {now - self._refetched_at:.0f} s ago, at "
                                      f"most one every {self._interval:.0f} s)")
            # Counted before the fetch: a refetch that fails also waits for the interval.
            self._refetched_at = now
            self._keys = parse_jwks(await self._fetch())
            key = self._select(kid, alg)
            if key is None:
                raise FederationError(f"the ID token names key {kid!r} ({alg}), which the "
                                      "provider's JWKS does not hold, even refetched")
            return key
