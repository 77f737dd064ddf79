"""Tokens: what logs may show of them."""

from __future__ import annotations

import pytest

from portcullis.tokens import mask


def test_a_ticket_mask_keeps_the_sta_and_six_characters_of_the_secret() -> None:
    assert mask("STA01;AbCdEfGhIjKlMnOpQrStUvWx") == "STA01;AbCdEf…"


@pytest.mark.parametrize("hostile", [
    "forged\nline;AbCdEfGhIjKlMnOpQr", "x" * 100 + ";AbCdEfGhIjKlMnOpQr",
    "STA01;\x1b[31mred\x1b[0m-and-more-text", "STA01;résumé-résumé-résumé",
])
def test_a_mask_never_repeats_text_an_attacker_chose(hostile: str) -> None:
    shown = mask(hostile)
    assert "\n" not in shown and "\x1b" not in shown and "forged" not in shown
    assert len(shown) <= 24


def test_a_session_token_mask_shows_six_characters() -> None:
    assert mask("abcdefghijklmnopqrstuvwxyz") == "abcdef…"
