"""Someone with write access to the deployment's Redis, but not its token key, edits the
session record of a signed-in user: the running gateway refuses the session at the next
API call and the audit trail says so (`store.tampered`)."""

from __future__ import annotations

import asyncio
import json
import secrets
import ssl
from pathlib import Path
from typing import Any

import httpx
import redis

from conftest import Deployment
from peers.stores import REDIS_URL, answering_redis_url
from portcullis.identity.claims import Claims
from portcullis.store import RecordSeal
from portcullis.tokens import TokenHasher

PASSWORD = "correct horse battery staple"


def audit_events(deployment: Deployment, event: str) -> list[dict[str, Any]]:
    path = deployment.directory / "audit.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [entry for entry in map(json.loads, lines) if entry["event"] == event]


def test_a_session_record_edited_in_redis_is_refused_by_the_gateway_and_audited(
        deployment: Deployment, echo_server, start_process, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    asyncio.run(answering_redis_url())
    prefix = f"pc-sealing-{secrets.token_hex(4)}:"
    deployment.set("store", "ephemeral", f'"{REDIS_URL}?prefix={prefix}"')
    deployment.add_resource("console", echo_server.address, ["admins"], "Admin console")
    deployment.add_user("alice", PASSWORD, ["staff"])
    gateway = start_process("up", "--dir", str(deployment.directory), name="up")
    gateway.wait_for("Portal: https://")
    store = redis.Redis.from_url(REDIS_URL)
    tls = ssl.create_default_context(cafile=str(deployment.ca))
    try:
        with httpx.Client(verify=tls, timeout=30) as client:

            def sign_in(user: str, password: str) -> tuple[dict[str, str], bytes]:
                """A bearer header, and the Redis key of the session record it made."""
                before = set(store.scan_iter(match=f"{prefix}session:*"))
                answer = client.post(f"{deployment.url}/api/v1/login", json={
                    "answers": {"username": user, "password": password}})
                assert answer.json()["status"] == "authenticated", answer.text
                [key] = set(store.scan_iter(match=f"{prefix}session:*")) - before
                return {"authorization": f"Bearer {answer.json()['token']}"}, key

            def resources(headers: dict[str, str]) -> httpx.Response:
                return client.get(f"{deployment.url}/api/v1/resources", headers=headers)

            admin, admin_key = sign_in("admin", deployment.admin_password)
            assert "console" in resources(admin).text
            promoted = Claims(sub="local:alice", username="alice", groups=("staff", "admins"))
            record = json.dumps({"claims": promoted.to_json(), "client_address": "127.0.0.1",
                                 "created_at": 4_000_000_000.0}).encode()
            attackers_key = RecordSeal.for_kind(TokenHasher(b"m" * 32), "session")
            edits = {
                "the record in clear with a group added": lambda key: record,
                "resealed under another key": lambda key: attackers_key.seal(
                    key.decode().removeprefix(prefix), record),
                "the administrator's record copied": lambda key: store.get(admin_key),
            }
            for edit in edits.values():
                alice, key = sign_in("alice", PASSWORD)
                assert resources(alice).status_code == 200
                assert "console" not in resources(alice).text
                ttl = store.pttl(key)
                store.set(key, edit(key), px=ttl)
                refused = resources(alice)
                assert refused.status_code == 401, refused.text
                assert not store.exists(key)          # deleted, not just ignored
                launch = client.post(f"{deployment.url}/api/v1/resources/console/launch",
                                     headers=alice)
                assert launch.status_code == 401
            # The administrator's own session, and new sign-ins, are untouched.
            assert "console" in resources(admin).text
            assert resources(sign_in("alice", PASSWORD)[0]).status_code == 200
        tampered = audit_events(deployment, "store.tampered")
        assert len(tampered) == len(edits)
        assert {(e["kind"], e["namespace"]) for e in tampered} == {("session", "session")}
        print(f"store.tampered lines: {[e['reason'] for e in tampered]}")
        assert "failed its integrity check" in gateway.output()   # and a warning in the log
    finally:
        keys = list(store.scan_iter(match=f"{prefix}*"))
        if keys:
            store.delete(*keys)
        store.close()
