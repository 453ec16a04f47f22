from __future__ import annotations

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st
from yarl import URL

from service.redact import mask_credentials, mask_json, mask_secret


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("https://user:pass@host/x", "https://user:***@host/x"),
        ("https://user:p@ss@host/x", "https://user:***@host/x"),
        ("https://a@b:pw@host:8443/x?q=1", "https://a@b:***@host:8443/x?q=1"),
        ("https://:pw@host/", "https://:***@host/"),
        ("https://user@host/x", "https://user@host/x"),
        ("https://host:8443/x@y", "https://host:8443/x@y"),
        ("http://host:8080?a@b", "http://host:8080?a@b"),
        (
            "POST https://u:p@h/x failed; retry https://v:q@i/y",
            "POST https://u:***@h/x failed; retry https://v:***@i/y",
        ),
        ("no url here: a@b", "no url here: a@b"),
    ],
)
def test_the_password_of_every_url_is_masked(text: str, masked: str) -> None:
    assert mask_credentials(text) == masked


@given(
    user=st.text(max_size=12),
    password=st.text(min_size=1, max_size=12),
    path=st.text(max_size=12),
)
def test_no_password_yarl_would_send_survives_masking(user: str, password: str, path: str) -> None:
    """Whatever the user and password hold, the masked URL carries no password but ***, and the rest
    of the URL reads as before."""
    url = str(URL.build(scheme="https", user=user, password=password, host="example.com", path="/" + path))
    masked = mask_credentials(url)
    assert URL(masked).password == "***"
    assert URL(masked).with_password(None) == URL(url).with_password(None)


def test_json_values_are_masked_in_every_string() -> None:
    detail = {"hooks": ["https://u:p@h/1", {"previous": "https://v:q@h/2"}], "n": 1, "none": None}
    assert mask_json(detail) == {
        "hooks": ["https://u:***@h/1", {"previous": "https://v:***@h/2"}],
        "n": 1,
        "none": None,
    }


def test_a_secret_is_masked_as_written_and_as_json_escapes_it() -> None:
    secret = 'tok"en\\0123456789'
    raw = msgspec.json.encode({"hook": f"https://h/cb/{secret}", "again": secret})
    assert msgspec.json.decode(mask_secret(raw, secret)) == {"hook": "https://h/cb/***", "again": "***"}
    assert mask_json({"hook": [f"https://u:p@h/cb/{secret}"]}, secret=secret) == {
        "hook": ["https://u:***@h/cb/***"]
    }
