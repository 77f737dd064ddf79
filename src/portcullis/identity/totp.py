"""TOTP (RFC 6238) and its lifecycle: enrolment, verification, re-enrolment, reset.

- One secret per identity (realm:user), sealed with AES-GCM under a key derived from
  the deployment's token key, the identity bound in as associated data (a sealed secret
  copied onto another user's row does not open).
- The secret is shown only during enrolment, as an otpauth URI and a QR code, and is
  stored only once the user proves it works with a correct code; re-enrolment replaces
  it (and the recovery codes) in one transaction, so old devices stop working.
- A code is accepted within ±`window` steps and at most once per identity: the used
  time-step goes into the ephemeral store (shared by every node) with put-if-absent.
- Recovery codes are one-time, random (50 bits), stored as keyed hashes.
- Enrolment codes (`auth.totp.enrolment = "code"`) have the same shape and storage; one
  per identity, issued by an administrator, spent by the enrolment they allow, expiring.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import secrets
import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import quote

import pyotp
import segno
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from portcullis.audit import AuditTrail
from portcullis.config.auth import TotpProvider
from portcullis.errors import AuthError
from portcullis.store import DurableStore, EphemeralStore, SealedRecords, TotpRecord
from portcullis.tokens import TokenHasher, new_token

_DIGESTS = {"sha1": hashlib.sha1, "sha256": hashlib.sha256, "sha512": hashlib.sha512}
_RECOVERY_ALPHABET = "abcdefghjkmnpqrstuvwxyz23456789"   # no 0/o, 1/l/i
SECRET_BYTES = 20     # 160 bits, what RFC 4226 recommends for HMAC-SHA-1


@dataclass(frozen=True)
class Enrolment:
    """A secret not yet confirmed: shown to the user, stored only after a correct code."""

    secret: str                       # base32
    recovery_codes: tuple[str, ...]
    uri: str

    def qr_svg_data_uri(self) -> str:
        return str(segno.make(self.uri, error="m").svg_data_uri(scale=4))

    def qr_text(self) -> str:
        out = io.StringIO()
        segno.make(self.uri, error="m").terminal(out=out, compact=True)
        return out.getvalue()


@dataclass(frozen=True)
class CodeCheck:
    ok: bool
    reason: str


class SecretBox:
    """AES-GCM sealing of small secrets, bound to the identity they belong to."""

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    def seal(self, identity: str, plaintext: bytes) -> bytes:
        nonce = secrets.token_bytes(12)
        return nonce + self._aead.encrypt(nonce, plaintext, identity.encode())

    def open(self, identity: str, sealed: bytes) -> bytes:
        try:
            return self._aead.decrypt(sealed[:12], sealed[12:], identity.encode())
        except (InvalidTag, ValueError):
            raise AuthError(f"the TOTP secret of {identity} does not open with this "
                            "deployment's token key (was secrets/token.key replaced?)") from None


class TotpService:
    def __init__(self, settings: TotpProvider, durable: DurableStore, ephemeral: EphemeralStore,
                 hasher: TokenHasher, *, clock: Callable[[], float] = time.time,
                 spend_recovery_codes: bool = True) -> None:
        self.settings = settings
        self._durable = durable
        self._ephemeral = ephemeral
        self._hasher = hasher
        self._box = SecretBox(hasher.derived_key("totp-secrets"))
        self._clock = clock
        self._spend_recovery_codes = spend_recovery_codes   # False: `auth test`

    def totp(self, secret: str) -> pyotp.TOTP:
        settings = self.settings
        return pyotp.TOTP(secret, digits=settings.digits, interval=settings.period,
                          digest=_DIGESTS[settings.algorithm])

    def new_enrolment(self, username: str) -> Enrolment:
        secret = pyotp.random_base32(length=32)   # 32 base32 characters = 160 bits
        codes = tuple(_recovery_code() for _ in range(self.settings.recovery_codes))
        return Enrolment(secret, codes, self._uri(secret, username))

    def _uri(self, secret: str, username: str) -> str:
        settings = self.settings
        label = quote(f"{settings.issuer}:{username}", safe="@:")
        query = (f"secret={secret}&issuer={quote(settings.issuer)}"
                 f"&algorithm={settings.algorithm.upper()}&digits={settings.digits}"
                 f"&period={settings.period}")
        return f"otpauth://totp/{label}?{query}"

    def seal_enrolment(self, identity: str, enrolment: Enrolment) -> str:
        """The pending enrolment as text for the login-flow state (sealed: that state sits
        in Redis, which must not learn a secret)."""
        plain = json.dumps([enrolment.secret, list(enrolment.recovery_codes), enrolment.uri])
        return self._box.seal(identity, plain.encode()).hex()

    def open_enrolment(self, identity: str, sealed: str) -> Enrolment:
        secret, codes, uri = json.loads(self._box.open(identity, bytes.fromhex(sealed)))
        return Enrolment(secret, tuple(codes), uri)

    async def record(self, identity: str) -> TotpRecord | None:
        return await self._durable.get_totp(identity)

    async def confirm(self, identity: str, enrolment: Enrolment, code: str) -> CodeCheck:
        """Store the enrolment if `code` is right for its secret (replacing any old one)."""
        check = await self._check_code(identity, enrolment.secret, code)
        if not check.ok:
            return check
        await self._durable.set_totp(
            identity, self._box.seal(identity, enrolment.secret.encode()),
            [self._recovery_hash(identity, c) for c in enrolment.recovery_codes])
        return CodeCheck(True, "enrolled")

    async def verify(self, identity: str, record: TotpRecord, answer: str) -> CodeCheck:
        """A code from the app, or one of the recovery codes."""
        answer = _normalised(answer)
        if answer.isascii() and answer.isdigit():
            secret = self._box.open(identity, record.sealed_secret).decode()
            return await self._check_code(identity, secret, answer)
        normalised = answer.lower().replace("-", "")
        if len(normalised) == 10 and await self._durable.use_recovery_code(
                identity, self._recovery_hash(identity, normalised),
                spend=self._spend_recovery_codes):
            return CodeCheck(True, "recovery code used")
        return CodeCheck(False, "wrong code")

    async def reset(self, identity: str) -> bool:
        return await self._durable.delete_totp(identity)

    async def _check_code(self, identity: str, secret: str, code: str) -> CodeCheck:
        code = _normalised(code)
        if len(code) != self.settings.digits or not (code.isascii() and code.isdigit()):
            return CodeCheck(False, "malformed code")
        totp = self.totp(secret)
        now_step = totp.timecode(self._clock())
        window = self.settings.window
        # Every candidate is computed and compared, so timing does not tell which matched.
        matched = [step for step in range(now_step - window, now_step + window + 1)
                   if hmac.compare_digest(totp.generate_otp(step), code)]
        if not matched:
            return CodeCheck(False, "wrong code")
        ttl = (2 * window + 2) * self.settings.period
        # Per secret too: a new app's first code may fall in the step the old one used.
        secret_id = self._hasher.digest("totp-secret", secret)[:16]
        used = f"totp-used:{identity}:{secret_id}:{matched[0]}"
        if not await self._ephemeral.put_new(used, b"1", ttl):
            return CodeCheck(False, "code already used")
        return CodeCheck(True, "code verified")

    async def issue_enrolment_code(self, identity: str, lifetime: float) -> tuple[str, datetime]:
        """A new single-use enrolment code for `identity` (replacing an earlier one) and
        when it expires; only its keyed hash is stored."""
        code = _recovery_code()
        expires = datetime.fromtimestamp(self._clock(), UTC) + timedelta(seconds=lifetime)
        await self._durable.set_enrolment_code(identity, self._enrolment_hash(identity, code),
                                               expires)
        return code, expires

    async def redeem_enrolment_code(self, identity: str, answer: str) -> CodeCheck:
        typed = _normalised(answer).lower().replace("-", "")
        outcome = await self._durable.use_enrolment_code(
            identity, self._enrolment_hash(identity, typed),
            datetime.fromtimestamp(self._clock(), UTC))
        reasons = {"used": "enrolment code accepted", "none": "no enrolment code issued",
                   "wrong": "wrong enrolment code", "expired": "enrolment code expired"}
        return CodeCheck(outcome == "used", reasons[outcome])

    def _enrolment_hash(self, identity: str, code: str) -> str:
        return self._hasher.digest("totp-enrolment-code", f"{identity}\0{code.replace('-', '')}")

    def _recovery_hash(self, identity: str, code: str) -> str:
        return self._hasher.digest("recovery-code", f"{identity}\0{code.replace('-', '')}")


def _normalised(answer: str) -> str:
    """Full-width digits become ASCII (NFKC); other scripts' digits stay non-ASCII and are
    refused (str.isdigit() accepts them, hmac.compare_digest does not)."""
    return unicodedata.normalize("NFKC", answer).strip().replace(" ", "")


def _recovery_code() -> str:
    chars = "".join(secrets.choice(_RECOVERY_ALPHABET) for _ in range(10))
    return f"{chars[:5]}-{chars[5:]}"


class SelfEnrolment:
    """A signed-in user replaces their authenticator app (a new phone): a new secret is
    shown, kept sealed in the ephemeral store under a one-time handle, and replaces the
    old one (and its recovery codes) only when a correct code for it is typed. The whole
    record (owner and secret) is sealed to its key too (`SealedRecords`)."""

    def __init__(self, service: TotpService, ephemeral: EphemeralStore, hasher: TokenHasher,
                 ttl: float, *, audit: AuditTrail | None = None) -> None:
        self._service = service
        self._ephemeral = ephemeral
        self._records = SealedRecords(ephemeral, hasher, "totp-enrolment", audit)
        self._hasher = hasher
        self._ttl = ttl

    def _key(self, handle: str) -> str:
        return f"totp-enrolment:{self._hasher.digest('totp-enrolment', handle)}"

    async def enrolled(self, identity: str) -> bool:
        return await self._service.record(identity) is not None

    async def begin(self, identity: str, username: str) -> tuple[str, Enrolment]:
        enrolment = self._service.new_enrolment(username)
        handle = new_token()
        record = json.dumps([identity, self._service.seal_enrolment(identity, enrolment)])
        await self._records.put(self._key(handle), record.encode(), self._ttl)
        return handle, enrolment

    async def pending(self, identity: str, handle: str) -> Enrolment | None:
        """The enrolment begun under `handle` by `identity` (no one else's), if any."""
        if len(handle) > 256:
            return None
        raw = await self._records.get(self._key(handle))
        if raw is None:
            return None
        owner, sealed = json.loads(raw)
        return self._service.open_enrolment(identity, sealed) if owner == identity else None

    async def finish(self, identity: str, handle: str, enrolment: Enrolment,
                     code: str) -> CodeCheck:
        check = await self._service.confirm(identity, enrolment, code)
        if check.ok:
            await self._ephemeral.delete(self._key(handle))
        return check
