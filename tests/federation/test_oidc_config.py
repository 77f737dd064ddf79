"""`[[auth.providers]]` entries of type "oidc": what is refused when the file is read."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from portcullis.config.model import Settings

BASE = {"type": "oidc", "name": "entra", "client_id": "app",
        "issuer": "https://login.microsoftonline.com/tenant-id/v2.0"}


def auth(**keys: Any) -> dict[str, Any]:
    return {"providers": [{**BASE, **keys}],
            "flows": [{"name": "default", "steps": [{"provider": "entra"}]}]}


def test_an_oidc_step_names_the_user_in_a_flow() -> None:
    settings = Settings.model_validate({"auth": auth(client_secret_file="secrets/entra")})
    assert settings.auth.realm_of(settings.auth.flows[0]) == "entra"


@pytest.mark.parametrize(("keys", "message"), [
    ({"algorithms": ["HS256"]}, "HS256 is never accepted"),
    ({"algorithms": ["none"]}, "none is never accepted"),
    ({"algorithms": ["RSA-OAEP"]}, "algorithms.0"),
    ({"issuer": "http://idp.example.test"}, "must be an https URL"),
    ({"issuer": "https://idp.example.test/?tenant=1"}, "is not an issuer URL"),
    ({"scopes": ["profile"]}, "the scopes must include 'openid'"),
    ({"extra_params": {"nonce": "x"}}, "'nonce' is set by the sign-in itself"),
    ({"extra_params": {"prompt": "login"}}, "use the provider's 'prompt' key"),
    ({"client_auth": "client_secret_post"}, "client_auth needs client_secret_file"),
    ({"required_claims": ["shoe_size"]}, "required_claims.0"),
    ({"preset": "google"}, "preset"),
    ({"clock_skew": 3600}, "clock_skew"),
])
def test_a_bad_oidc_provider_is_refused(keys: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as refused:
        Settings.model_validate({"auth": auth(**keys)})
    assert message in str(refused.value)


def test_http_issuer_is_allowed_on_loopback_for_a_lab() -> None:
    Settings.model_validate({"auth": auth(issuer="http://127.0.0.1:8080")})
