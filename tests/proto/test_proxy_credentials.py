"""The local proxies' secret: what it admits and how a Basic header is read."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portcullis.proto.proxyauth import ProxyCredentials, basic_credentials

SECRET = ProxyCredentials("portcullis", "s3cret")


def test_only_the_exact_user_and_password_are_admitted() -> None:
    assert SECRET.admits(b"portcullis", b"s3cret")
    assert not SECRET.admits(b"portcullis", b"s3cret ")
    assert not SECRET.admits(b"Portcullis", b"s3cret")
    assert not SECRET.admits(b"", b"")


@given(user=st.binary(max_size=40), password=st.binary(max_size=40))
def test_nothing_but_the_secret_is_admitted(user: bytes, password: bytes) -> None:
    assert SECRET.admits(user, password) == ((user, password) == (b"portcullis", b"s3cret"))


def test_the_password_is_not_in_the_repr() -> None:
    assert "s3cret" not in repr(SECRET)


@pytest.mark.parametrize(("user", "password"), [("", "x"), ("a:b", "x"), ("u", ""),
                                                ("u", "tab\there"), ("u", "é")])
def test_a_secret_that_cannot_travel_in_both_protocols_is_a_value_error(
        user: str, password: str) -> None:
    with pytest.raises(ValueError):
        ProxyCredentials(user, password)


@pytest.mark.parametrize(
    ("value", "pair"),
    [(b"Basic " + base64.b64encode(b"u:p"), (b"u", b"p")),
     (b"basic  " + base64.b64encode(b"u:p:q"), (b"u", b"p:q")),
     (b"Basic " + base64.b64encode(b":"), (b"", b"")),
     (b"Basic " + base64.b64encode(b"up"), None),
     (b"Basic ???", None), (b"Digest u=p", None), (b"", None)])
def test_a_basic_value_is_read_as_user_and_password(
        value: bytes, pair: tuple[bytes, bytes] | None) -> None:
    assert basic_credentials(value) == pair


@given(st.binary(max_size=100))
def test_any_authorization_value_is_a_pair_or_none(value: bytes) -> None:
    result = basic_credentials(value)
    assert result is None or len(result) == 2
