"""Standard Webhooks signatures: HMAC-SHA256 of `id.timestamp.body`, one per configured secret."""

from __future__ import annotations

import base64
import functools
import hmac
from collections.abc import Sequence

from pydantic import SecretStr


def secret_key(secret: str) -> bytes:
    """The HMAC key of a whsec_ secret, decoded the way the standardwebhooks package decodes it."""
    return base64.b64decode(secret.removeprefix("whsec_") + "==")


def secret_keys(secrets: Sequence[SecretStr]) -> tuple[bytes, ...]:
    return tuple(secret_key(secret.get_secret_value()) for secret in secrets)


@functools.lru_cache(maxsize=1024)
def client_keys(current: str, previous: str | None) -> tuple[bytes, ...]:
    """A client's keys: its secret's, and during a rotation's grace period the previous one's."""
    return (secret_key(current),) if previous is None else (secret_key(current), secret_key(previous))


def signature_header(keys: Sequence[bytes], webhook_id: str, timestamp: int, body: bytes) -> str:
    """`v1,<sig>` per key, space separated: receivers accept a message if any signature matches."""
    signed = f"{webhook_id}.{timestamp}.".encode() + body
    return " ".join("v1," + base64.b64encode(hmac.digest(key, signed, "sha256")).decode() for key in keys)
