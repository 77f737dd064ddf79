"""Every kind of sign-in step a browser is shown, drawn by the portal's templates, works
without JavaScript: a form that posts its answers with a submit button, every input with
a label, or (a redirect step) a link or a button to the identity provider. The one script
only spares the click."""

from __future__ import annotations

import html.parser
from typing import Any, get_args

import pytest

from portcullis.identity.flow import Prompt, Redirect, Step, StepKind
from portcullis.portal.pages import TEMPLATES

PROMPTS = {"password": (Prompt("username", "User name"), Prompt("password", "Password", True)),
           "challenge": (Prompt("code", "Answer", True),), "certificate": ()}
ENROLMENT = {"secret": "JBSWY3DPEHPK3PXP", "qr_svg": "data:image/svg+xml;base64,PHN2Zy8+",
             "recovery_codes": ["aaaaa-bbbbb"]}
SHOWN_AS_FORMS = [kind for kind in get_args(StepKind) if kind not in ("redirect", "device")]


class Controls(html.parser.HTMLParser):
    """The page's forms, inputs, labels, links and buttons, as a browser without scripts
    would use them."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, Any]]] = []
        self.label_depth = 0
        self.labelled: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag == "label":
            self.label_depth += 1
        if tag == "input" and self.label_depth:
            self.labelled.append(str(dict(attrs).get("name")))

    def handle_endtag(self, tag: str) -> None:
        if tag == "label":
            self.label_depth -= 1

    def all(self, tag: str) -> list[dict[str, Any]]:
        return [attrs for name, attrs in self.tags if name == tag]


def controls_of(template: str, **context: Any) -> Controls:
    parsed = Controls()
    parsed.feed(TEMPLATES.get_template(template).render(**context))
    return parsed


@pytest.mark.parametrize("kind", SHOWN_AS_FORMS)
def test_a_step_shown_as_a_form_posts_its_answers_without_scripts(kind: str) -> None:
    prompts = PROMPTS.get(kind, (Prompt("code", "Code"),))
    step = Step(kind=kind, title="Sign in", prompts=prompts,  # type: ignore[arg-type]
                enrolment=ENROLMENT if kind == "totp-enrol" else None)
    page = controls_of("login.html", step=step, handle="h", csrf="c", next="/",
                       error=None, restarted=False)
    [form] = page.all("form")
    assert (form["method"], form["action"]) == ("post", "/login")
    assert any(button.get("type") == "submit" for button in page.all("button"))
    visible = [i["name"] for i in page.all("input") if i.get("type") != "hidden"]
    assert visible == [prompt.name for prompt in prompts]
    assert page.labelled == visible   # every input the user fills has its label
    assert not page.all("script")


def test_a_redirect_step_is_a_link_or_a_button_to_the_identity_provider() -> None:
    by_get = controls_of("redirect.html", step=Step(
        kind="redirect", title="Sign in with corp", redirect=Redirect("https://idp/authorize")))
    assert [a["href"] for a in by_get.all("a")] == ["#main", "https://idp/authorize"]
    by_post = controls_of("redirect.html", step=Step(
        kind="redirect", title="Sign in with corp",
        redirect=Redirect("https://idp/sso", {"SAMLRequest": "x"})))
    [form] = by_post.all("form")
    assert (form["method"], form["action"]) == ("post", "https://idp/sso")
    assert by_post.all("button")
