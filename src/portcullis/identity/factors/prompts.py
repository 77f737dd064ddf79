"""What the password-like factors (local, LDAP, RADIUS) share: one step shape, and the
rule that once a flow knows the user it never asks for (or believes) a typed name again."""

from __future__ import annotations

from collections.abc import Mapping

from portcullis.errors import AuthError
from portcullis.identity.flow import FlowState, Prompt, Step
from portcullis.identity.names import canonical_username

USERNAME = Prompt("username", "User name")
PASSWORD = Prompt("password", "Password", secret=True)


def password_step(state: FlowState, title: str = "Sign in") -> Step:
    if state.username is None:
        return Step(kind="password", title=title, prompts=(USERNAME, PASSWORD))
    return Step(kind="password", title=title, prompts=(PASSWORD,),
                message=f"Signing in as {state.username}")


def typed_username(state: FlowState, answers: Mapping[str, str]) -> str | None:
    """The flow's user if known, else the typed name in canonical form (None if malformed)."""
    if state.username is not None:
        return state.username
    try:
        return canonical_username(answers.get("username", ""))
    except AuthError:
        return None
