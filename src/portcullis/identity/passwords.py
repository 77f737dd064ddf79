"""Password hashing with argon2id (argon2-cffi), and a constant-work check for unknown users."""

from __future__ import annotations

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

# RFC 9106's second recommended option (64 MiB, t=3, p=4): memory-hard enough to make
# offline guessing of a stolen database expensive. Measured (bench login_rate): ~150 ms
# per verification on one core of the 2-core test machine, ~6 sign-ins/s per core: that
# is the price, and the reason directory sign-ins (LDAP: ~270/s per core) scale further.
_HASHER = PasswordHasher(time_cost=3, memory_cost=64 * 1024, parallelism=4)
# Verified against when the user does not exist, so that an unknown name costs the same.
_DUMMY_HASH = _HASHER.hash("portcullis-dummy-password")

MAX_PASSWORD = 1024


def hash_password(password: str) -> str:
    if not password or len(password) > MAX_PASSWORD:
        raise ValueError("a password must be 1-1024 characters")
    return _HASHER.hash(password)


def verify_password(stored_hash: str | None, password: str) -> bool:
    """True if `password` matches; does the same work when there is no stored hash."""
    if len(password) > MAX_PASSWORD:
        password = password[:MAX_PASSWORD]
    try:
        return _HASHER.verify(stored_hash or _DUMMY_HASH, password) and stored_hash is not None
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False
