"""Redirect steps in the browser: to the identity provider, and back to the flow.

A redirect step (OIDC, SAML) leaves the portal. Before it does, the browser gets a login
cookie holding the flow's handle, so the callback can tell that the provider's answer came
back to the browser that started the sign-in (a sign-in link sent to someone else finishes
nothing), and the page to return to. The provider answers at `/login/callback/{provider}`
— GET for OIDC, a cross-site POST for SAML, which is why the login cookie is
`SameSite=None` (it holds only the flow handle, spent at the callback) and why the callback
needs no CSRF token: the relay token and the login cookie together are the proof.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from portcullis.config.federation import MAX_SAML_RESPONSE
from portcullis.identity.login import CALLBACK_CODE, NextStep, relay_of
from portcullis.portal.pages import page

LOGIN_COOKIE = "__Host-portcullis-login"
NEXT_COOKIE = "__Host-portcullis-next"


def safe_next(target: str | None) -> str:
    """Only same-origin relative paths: '/x' yes; '//evil', '/\\evil', 'https://…' no."""
    if (not target or not target.startswith("/") or target.startswith("//")
            or "\\" in target or any(ord(c) < 0x20 for c in target)):
        return "/"
    return target


def to_identity_provider(request: Request, step: NextStep, target: str,
                         lifetime: float) -> Response:
    """Send the browser on; from a GET a plain redirect, otherwise a page (a redirect that
    answers a form post would fall under the portal's `form-action 'self'`)."""
    redirect = step.step.redirect
    assert redirect is not None, "a redirect step carries where to go"
    response: Response
    if redirect.form is None and request.method == "GET":
        response = RedirectResponse(redirect.url, 303)
    else:
        response = page(request, "redirect.html", step=step.step)
        if redirect.form is not None:
            parts = urlsplit(redirect.url)
            response.headers["content-security-policy"] = (
                "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
                f"object-src 'none'; form-action {parts.scheme}://{parts.netloc}")
    age = int(lifetime)
    response.set_cookie(LOGIN_COOKIE, step.handle, max_age=age, path="/", secure=True,
                        httponly=True, samesite="none")
    # SameSite=None too: a SAML answer arrives by a cross-site POST, which a Lax cookie
    # would miss (the user would land on / instead of the page asked for).
    response.set_cookie(NEXT_COOKIE, target, max_age=age, path="/", secure=True,
                        httponly=True, samesite="none")
    return response


def callback_body_limit(max_response_bytes: int) -> int:
    """The largest form a SAML Response of `max_response_bytes` can arrive in: base64 (4
    characters for 3 bytes), each character percent-encoded at worst, and a RelayState."""
    return (max_response_bytes + 2) // 3 * 4 * 3 + 4096


async def callback_answers(request: Request) -> tuple[str, dict[str, str]]:
    """The relay token and the provider's parameters (query for GET, form for POST)."""
    if request.method == "POST":
        # Starlette's own bound on a field is 1 MiB; the body as a whole was bounded
        # before (web/security.py), by the largest SAML response a provider allows.
        form = await request.form(max_part_size=callback_body_limit(MAX_SAML_RESPONSE))
        answers = {key: value for key, value in form.items() if isinstance(value, str)}
    else:
        answers = dict(request.query_params)
    answers.pop(CALLBACK_CODE, None)   # only a CLI's loopback hands that in
    return relay_of(answers), answers


def forget_login(response: Response) -> Response:
    response.delete_cookie(LOGIN_COOKIE, path="/", secure=True, httponly=True,
                           samesite="none")
    response.delete_cookie(NEXT_COOKIE, path="/", secure=True, httponly=True,
                           samesite="none")
    return response


def loopback_return_to(url: object) -> str | None:
    """`url` if it is a loopback redirect a CLI may listen on (RFC 8252 §7.3: http, an IP
    literal, a port), else None: the one-time code must reach only this machine."""
    if not isinstance(url, str) or len(url) > 512:
        return None
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    loopback = parts.hostname in ("127.0.0.1", "::1")
    if (parts.scheme != "http" or not loopback or port is None or parts.username is not None
            or parts.password is not None or parts.fragment
            or any(ord(c) < 0x21 for c in url)):
        return None
    return url
