"""Password hashes for the web UI's users: scrypt (RFC 7914), from the standard library.

Why scrypt: it is memory-hard (each guess needs 128 * N * r bytes, here 32 MiB), so a
stolen store is slow to attack on GPUs as well as CPUs; it is in hashlib (OpenSSL), so no
native dependency is added; and OWASP's password storage guidance lists it with Argon2id.
The parameters are stored with each hash, so they can be raised later without breaking the
hashes already stored. Each user has a random 16-byte salt; hashes are compared in
constant time."""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import secrets

SCRYPT_N = 2**15  # CPU/memory cost: 32 MiB and about 0.1 s per hash
SCRYPT_R = 8
SCRYPT_P = 1
KEY_BYTES = 32
MIN_PASSWORD_LENGTH = 12


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p,
                          maxmem=256 * n * r + 1024 * 1024, dklen=KEY_BYTES)


def hash_password(password: str) -> str:
    """``scrypt$N$r$p$salt$key`` (salt and key in base64)."""
    salt = secrets.token_bytes(16)
    key = _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(key)}"


def verify_password(password: str, stored: str) -> bool:
    """Whether ``password`` matches the stored hash (False for a malformed one)."""
    try:
        scheme, n, r, p, salt, key = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(key)
        given = _scrypt(password, base64.b64decode(salt), int(n), int(r), int(p))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(given, expected)


@functools.cache
def dummy_hash() -> str:
    """Checked against when a name is no user, so that a wrong name costs as long as a
    wrong password and timing does not tell which names exist."""
    return hash_password(secrets.token_urlsafe(16))
