"""Secrets never leave the service: responses and log lines show `user:***@host`, and `***` for
our callback token.

A notify_hook may carry its receiver's Basic auth password (`https://user:pass@host/x`). It is kept and
sent, but everything that shows a hook URL (task, delivery and event routes, error details, logs)
passes it through mask_credentials() first. A relay told to call us back names our callback route,
token and all, in its answers and callbacks: mask_secret() takes it out of what we keep or pass on.
"""

from __future__ import annotations

import re
from collections.abc import MutableMapping
from typing import Any

import msgspec

# scheme://user:password@ -- the user up to the first ':', the password up to the authority's last '@'
# (as yarl, and so aiohttp, split them). Works on a bare URL and on URLs inside any text.
_PASSWORD = re.compile(r"(?P<keep>[A-Za-z][A-Za-z0-9+.-]*://[^/?#:]*:)[^/?#]*@")
MASK = "***"


def mask_credentials(text: str) -> str:
    """`text` with the password of every URL in it replaced by ***."""
    if "@" not in text:
        return text
    return _PASSWORD.sub(rf"\g<keep>{MASK}@", text)


def mask_json(value: Any, *, secret: str | None = None) -> Any:
    """A JSON-like value with mask_credentials() applied to every string in it, and `secret`, if
    given, replaced by *** wherever it appears."""
    if isinstance(value, str):
        masked = mask_credentials(value)
        return masked.replace(secret, MASK) if secret else masked
    if isinstance(value, dict):
        return {key: mask_json(item, secret=secret) for key, item in value.items()}
    if isinstance(value, list):
        return [mask_json(item, secret=secret) for item in value]
    return value


def mask_secret(raw: bytes, secret: str) -> bytes:
    """JSON bytes with `secret`, as written or as JSON escapes it, replaced by ***."""
    for form in {secret.encode(), msgspec.json.encode(secret)[1:-1]}:
        raw = raw.replace(form, MASK.encode())
    return raw


def mask_log_credentials(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: every value of a log line masked (after format_exc_info, so tracebacks too)."""
    for key, value in event_dict.items():
        if isinstance(value, str | dict | list):
            event_dict[key] = mask_json(value)
    return event_dict
