"""Standard Webhooks signatures: HMAC-SHA256 of `id.timestamp.body`, one per configured secret."""

from __future__ import annotations

import base64
import hmac
from collections.abc import Sequence

from pydantic import SecretStr


def secret_keys(secrets: Sequence[SecretStr]) -> tuple[bytes, ...]:
    """HMAC keys from whsec_ secrets, decoded the way the standardwebhooks package decodes them."""
    keys = []
    for secret in secrets:
        raw = secret.get_secret_value().removeprefix("whsec_")
        keys.append(base64.b64decode(raw + "=="))
    return tuple(keys)


def signature_header(keys: Sequence[bytes], webhook_id: str, timestamp: int, body: bytes) -> str:
    """`v1,<sig>` per key, space separated: receivers accept a message if any signature matches."""
    signed = f"{webhook_id}.{timestamp}.".encode() + body
    return " ".join("v1," + base64.b64encode(hmac.digest(key, signed, "sha256")).decode() for key in keys)
