"""How a gateway session reaches an application's host without its cookie going there.

The portal (on the gateway's host) issues a one-time code bound to the resource and the
gateway session; the browser carries it to the application's host, which redeems it
once (`take`) and sets a cookie of its own holding an opaque app-session token. The
token names a record bound to the same resource and session: it is worth nothing on
another host, and nothing once the gateway session ends (every request checks it).

Both live in the ephemeral store under keyed hashes, sealed; never logs a code or token.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from portcullis.audit import AuditTrail
from portcullis.store import EphemeralStore, SealedRecords
from portcullis.tokens import TokenHasher, new_token

CODE_LIFETIME = 60.0
# An app session idles out after this; a navigation then fetches a new one from the
# portal (at once, while the gateway session lasts). Each request restarts it.
APP_SESSION_IDLE = 900.0
MAX_TOKEN = 256


@dataclass(frozen=True)
class Binding:
    """What a code or an app-session token stands for."""

    resource: str
    session_handle: str


class Handoff:
    def __init__(self, ephemeral: EphemeralStore, hasher: TokenHasher,
                 audit: AuditTrail | None = None, *,
                 code_lifetime: float = CODE_LIFETIME,
                 app_session_idle: float = APP_SESSION_IDLE) -> None:
        self._codes = SealedRecords(ephemeral, hasher, "web-code", audit)
        self._apps = SealedRecords(ephemeral, hasher, "web-app", audit)
        self._ephemeral = ephemeral
        self._hasher = hasher
        self._code_lifetime = code_lifetime
        self._idle = app_session_idle

    async def issue_code(self, binding: Binding) -> str:
        code = new_token()
        await self._codes.put(self._key("web-code", code), _encode(binding),
                              self._code_lifetime)
        return code

    async def redeem_code(self, code: str) -> Binding | None:
        """What the code was issued for, once; None for a used, expired or unknown one."""
        if not code or len(code) > MAX_TOKEN:
            return None
        return _decode(await self._codes.take(self._key("web-code", code)))

    async def open_app_session(self, binding: Binding) -> str:
        token = new_token()
        await self._apps.put(self._key("web-app", token), _encode(binding), self._idle)
        return token

    async def app_session(self, token: str | None) -> Binding | None:
        """What an app cookie's token is bound to (its idle time restarts), or None."""
        if not token or len(token) > MAX_TOKEN:
            return None
        key = self._key("web-app", token)
        binding = _decode(await self._apps.get(key))
        if binding is not None:
            await self._ephemeral.touch(key, self._idle)
        return binding

    def _key(self, kind: str, token: str) -> str:
        return f"{kind}:{self._hasher.digest(kind, token)}"


def _encode(binding: Binding) -> bytes:
    return json.dumps({"resource": binding.resource,
                       "session": binding.session_handle}).encode()


def _decode(raw: bytes | None) -> Binding | None:
    if raw is None:
        return None
    record = json.loads(raw)
    return Binding(record["resource"], record["session"])
