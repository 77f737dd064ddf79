"""Signing-key rotation: the schedule (pure) and the key ring over a real SQLite store,
with time as an argument: a new key is published a day before it signs, and the old one
stays published for a rotation period after it stopped signing."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from joserfc import jwt

from portcullis.idp.keys import DAY, PUBLISH_AHEAD, KeyRing, KeyTimes, plan_keys
from portcullis.store import DurableStore
from portcullis.tokens import TokenHasher

ROTATION = 30 * DAY
T0 = 1_800_000_000.0


def test_the_first_key_signs_at_once() -> None:
    plan = plan_keys([], T0, ROTATION)
    assert plan.signing is None and plan.make_signing_from == T0


def test_the_next_key_is_made_a_day_before_it_signs() -> None:
    keys = [KeyTimes(1, T0)]
    assert plan_keys(keys, T0 + ROTATION - PUBLISH_AHEAD - 1, ROTATION).make_signing_from \
        is None
    plan = plan_keys(keys, T0 + ROTATION - PUBLISH_AHEAD, ROTATION)
    assert plan.signing == 1 and plan.make_signing_from == T0 + ROTATION


def test_a_published_key_signs_only_from_its_time_and_the_old_one_is_kept_a_period() -> None:
    keys = [KeyTimes(1, T0), KeyTimes(2, T0 + ROTATION)]
    assert plan_keys(keys, T0 + ROTATION - 1, ROTATION).signing == 1
    after = plan_keys(keys, T0 + ROTATION, ROTATION)
    assert (after.signing, after.drop, after.make_signing_from) == (2, (), None)
    assert plan_keys(keys, T0 + 2 * ROTATION, ROTATION).drop == (1,)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[DurableStore]:
    durable = await DurableStore.open(f"sqlite:///{tmp_path / 'db'}")
    yield durable
    await durable.close()


async def test_tokens_verify_across_a_rotation_on_every_node(store: DurableStore) -> None:
    now = [T0]
    hasher = TokenHasher(b"k" * 32)
    node_a = KeyRing(store, hasher, 30, clock=lambda: now[0])
    node_b = KeyRing(store, hasher, 30, clock=lambda: now[0])
    first = await node_a.active()
    assert (await node_b.active()).signing.kid == first.signing.kid
    token = jwt.encode({"alg": "ES256", "kid": first.signing.kid}, {"sub": "x"},
                       first.signing)

    now[0] = T0 + ROTATION - PUBLISH_AHEAD + 1
    published = await node_b.active()
    kids = [key["kid"] for key in published.jwks["keys"]]   # type: ignore[index]
    assert len(kids) == 2 and published.signing.kid == first.signing.kid

    now[0] = T0 + ROTATION + 1
    rotated = await node_a.active()
    assert rotated.signing.kid != first.signing.kid and rotated.signing.kid in kids
    assert jwt.decode(token, rotated.verifying, algorithms=["ES256"]).claims == {"sub": "x"}

    now[0] = T0 + 2 * ROTATION + 1
    later = await node_a.active()
    later_kids = [key["kid"] for key in later.jwks["keys"]]  # type: ignore[index]
    assert first.signing.kid not in later_kids and rotated.signing.kid in later_kids
    assert all("d" not in key for key in later.jwks["keys"])  # type: ignore[attr-defined]
