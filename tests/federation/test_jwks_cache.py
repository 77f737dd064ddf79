"""The provider's key set: which keys are taken from a JWKS, which key a token gets, and
the refetch of an unknown key id (once, then not again within the interval). Time is the
test's own clock; `fetch` hands out the JWKS documents a provider would serve."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from joserfc.jwk import ECKey, OctKey, OKPKey, RSAKey

from portcullis.errors import FederationError
from portcullis.federation.jwks import SigningKeys, parse_jwks, select_key

RSA = RSAKey.generate_key(2048, {"kid": "r1", "use": "sig"})
EC = ECKey.generate_key("P-256", {"kid": "e1"})


def jwks(*keys: Any) -> dict[str, Any]:
    return {"keys": [key.as_dict(private=True) if hasattr(key, "as_dict") else key
                     for key in keys]}


class Provider:
    """Serves `documents` in turn, counting the fetches."""

    def __init__(self, *documents: dict[str, Any]) -> None:
        self.documents = list(documents)
        self.fetches = 0

    async def fetch(self) -> dict[str, Any]:
        await asyncio.sleep(0)           # as a real fetch, it lets other sign-ins run
        document = self.documents[min(self.fetches, len(self.documents) - 1)]
        self.fetches += 1
        return document


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_only_public_members_of_asymmetric_signing_keys_are_taken() -> None:
    hmac_key = OctKey.generate_key(256, {"kid": "o1"})
    encryption = RSAKey.generate_key(2048, {"kid": "enc", "use": "enc"})
    keys = parse_jwks(jwks(RSA, EC, hmac_key, encryption))
    assert sorted(keys) == ["e1", "r1"]
    assert all(not key.is_private for key in keys.values())


def test_a_jwks_without_keys_list_is_refused() -> None:
    with pytest.raises(FederationError, match="no 'keys' list"):
        parse_jwks({"keys": "none"})


def test_an_unreadable_key_is_skipped_and_the_others_still_serve() -> None:
    keys = parse_jwks({"keys": [{"kty": "RSA", "kid": "bad", "n": "!!", "e": 3},
                                *jwks(RSA)["keys"]]})
    assert sorted(keys) == ["r1"]


def test_key_is_chosen_by_id_and_must_suit_the_algorithm() -> None:
    keys = parse_jwks(jwks(RSA, EC))
    assert select_key(keys, "r1", "PS256") is keys["r1"]
    assert select_key(keys, "r1", "ES256") is None
    assert select_key(keys, "e1", "ES384") is None      # P-256, not P-384
    assert select_key(keys, "e1", "ES256") is keys["e1"]


def test_a_token_without_key_id_matches_only_a_single_suitable_key() -> None:
    keys = parse_jwks(jwks(RSA, EC))
    assert select_key(keys, None, "ES256") is keys["e1"]
    two = parse_jwks(jwks(RSA, RSAKey.generate_key(2048, {"kid": "r2"})))
    assert select_key(two, None, "RS256") is None


def test_a_key_declaring_its_algorithm_is_used_only_with_it() -> None:
    keys = parse_jwks(jwks(RSAKey.generate_key(2048, {"kid": "r", "alg": "PS256"})))
    assert select_key(keys, "r", "RS256") is None
    assert select_key(keys, "r", "PS256") is not None


def test_an_okp_key_serves_eddsa() -> None:
    keys = parse_jwks(jwks(OKPKey.generate_key("Ed25519", {"kid": "d"})))
    assert select_key(keys, "d", "EdDSA") is not None


async def test_an_unknown_key_id_refetches_once_and_finds_the_rotated_key() -> None:
    provider = Provider(jwks(RSA), jwks(EC, RSA))
    keys = SigningKeys(provider.fetch, refetch_interval=60, clock=Clock())
    assert await keys.key_for("r1", "RS256") is not None
    assert await keys.key_for("e1", "ES256") is not None
    assert provider.fetches == 2
    assert await keys.key_for("e1", "ES256") is not None
    assert provider.fetches == 2


async def test_sign_ins_meeting_a_rotated_key_together_share_one_refetch() -> None:
    provider = Provider(jwks(RSA), jwks(EC, RSA))
    keys = SigningKeys(provider.fetch, refetch_interval=60, clock=Clock())
    await keys.key_for("r1", "RS256")
    found = await asyncio.gather(*(keys.key_for("e1", "ES256") for _ in range(5)))
    assert all(key is found[0] for key in found)
    assert provider.fetches == 2


async def test_a_key_id_missing_from_the_first_fetch_is_not_fetched_again_at_once() -> None:
    provider = Provider(jwks(RSA))
    keys = SigningKeys(provider.fetch, refetch_interval=60, clock=Clock())
    with pytest.raises(FederationError, match=r"does not hold$"):
        await keys.key_for("made-up", "RS256")
    assert provider.fetches == 1


async def test_unknown_key_ids_refetch_at_most_once_per_interval() -> None:
    provider = Provider(jwks(RSA))
    clock = Clock()
    keys = SigningKeys(provider.fetch, refetch_interval=60, clock=clock)
    await keys.key_for("r1", "RS256")
    with pytest.raises(FederationError, match="does not hold, even refetched"):
        await keys.key_for("made-up-1", "RS256")
    assert provider.fetches == 2            # the first fetch, one refetch
    clock.now += 59
    for kid in ("made-up-2", "made-up-3"):
        with pytest.raises(FederationError) as refused:
            await keys.key_for(kid, "RS256")
        assert "not refetched: the last refetch was 59 s ago, at most one every 60 s" in str(
            refused.value)
    assert provider.fetches == 2
    clock.now += 1
    with pytest.raises(FederationError, match="even refetched"):
        await keys.key_for("made-up-4", "RS256")
    assert provider.fetches == 3
