"""The SAML service provider's own routes beside the portal: its metadata and single logout.

- `GET /saml/{provider}/metadata`: what the IdP needs to know of the gateway.
- `GET /saml/{provider}/slo?SAMLRequest=…`: the IdP ends a user's sign-in (IdP-initiated
  single logout). Every session of the user the NameID signed in as ends (`revoke_user`:
  the gateways then end what those sessions opened), and the browser goes back to the IdP
  with a signed LogoutResponse. The session cookie is `SameSite=Strict`, so this
  cross-site request cannot name the browser's session: the NameID is what names whom.
- `GET /saml/{provider}/slo?SAMLResponse=…`: the IdP's answer to the LogoutRequest the
  gateway sent when the user signed out of the portal (`sign_out_at_idp`); its RelayState
  is a one-time token that finds the request it must answer.

Messages are checked by `portcullis.federation.saml` (signature by the IdP metadata's
certificate, from the raw query string). Never logs a SAML message or a NameID outside
the audit trail.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path

import structlog
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates

from portcullis.audit import AuditTrail
from portcullis.config.federation import SamlProvider
from portcullis.config.model import Settings
from portcullis.errors import ConfigError
from portcullis.federation.saml import Refused, ServiceProvider, metadata_endpoint
from portcullis.identity.endings import Ending
from portcullis.identity.flow import Redirect, Step
from portcullis.identity.login import CALLBACK_PATH
from portcullis.identity.providers import IdentityProviders
from portcullis.identity.sessions import Session, SessionManager
from portcullis.portal.redirects import callback_body_limit
from portcullis.store import EphemeralStore
from portcullis.tokens import TokenHasher, new_token
from portcullis.web.security import LargerBodies

NAMESPACE = "saml-logout"
# The IdP answers a LogoutRequest at once; a user who lingers there finds the gateway's
# side already signed out.
LOGOUT_LIFETIME = 600.0
MAX_RELAY = 256
HERE = Path(__file__).parent
log = structlog.get_logger("portcullis.portal.saml")


@dataclass
class SamlEndpoints:
    providers: IdentityProviders
    sessions: SessionManager
    ephemeral: EphemeralStore
    hasher: TokenHasher
    audit: AuditTrail

    def __post_init__(self) -> None:
        self._templates = Jinja2Templates(directory=str(HERE / "templates"))

    def routes(self) -> list[Route]:
        return [Route("/saml/{provider}/metadata", metadata_endpoint(self._published)),
                Route("/saml/{provider}/slo", self.single_logout, methods=["GET"])]

    async def provider(self, name: str) -> ServiceProvider | None:
        """The service provider of the SAML provider `name` (None: there is none)."""
        settings = self.providers.settings.auth.all_providers().get(name)
        if not isinstance(settings, SamlProvider):
            return None
        return await self.providers.saml(settings).get()

    async def _published(self, name: str) -> ServiceProvider | None:
        """The provider whose metadata to serve; one that cannot be set up (its IdP's
        metadata unreadable) is not served, and the log says why."""
        try:
            return await self.provider(name)
        except ConfigError as exc:
            log.warning("SAML metadata not served: the provider cannot be set up",
                        provider=name, error=str(exc))
            return None

    async def single_logout(self, request: Request) -> Response:
        name = str(request.path_params["provider"])
        client = request.client.host if request.client else "unknown"
        try:
            provider = await self.provider(name)
        except ConfigError as exc:
            self.audit.record("saml.logout_failed", factor=name, client=client,
                              reason=f"the SAML provider is unavailable: {exc}")
            return Response("temporarily unavailable", 503, media_type="text/plain")
        if provider is None:
            return Response("not found", 404, media_type="text/plain")
        # The signature covers the query string as the IdP encoded it, not as parsed.
        query = request.scope["query_string"].decode("latin-1")
        if "SAMLRequest" in request.query_params:
            return await self._ordered(name, provider, query, client)
        if "SAMLResponse" in request.query_params:
            return await self._answered(request, name, provider, query, client)
        return Response("bad request", 400, media_type="text/plain")

    async def _ordered(self, name: str, provider: ServiceProvider, query: str,
                       client: str) -> Response:
        """The IdP's LogoutRequest: end the user's sessions, answer with a LogoutResponse."""
        order = await asyncio.to_thread(provider.accept_logout_request, query)
        if isinstance(order, Refused):
            self.audit.record("saml.logout_failed", factor=name, client=client,
                              reason=f"LogoutRequest refused: {order.reason}")
            return Response("denied", 400, media_type="text/plain")
        username = await self.sessions.saml_subject_user(name, order.name_id)
        ended = (await self.sessions.revoke_user(username, Ending.IDP_SIGNED_OUT)
                 if username is not None else 0)
        self.audit.record("saml.logout", factor=name, user=username, initiated_by="idp",
                          sessions=ended, client=client)
        answer = await asyncio.to_thread(provider.logout_response, order)
        return RedirectResponse(answer.url, 303)

    async def _answered(self, request: Request, name: str, provider: ServiceProvider,
                        query: str, client: str) -> Response:
        """The IdP's LogoutResponse to the LogoutRequest `sign_out_at_idp` sent."""
        relay = request.query_params.get("RelayState", "")
        raw = (await self.ephemeral.take(self._key(relay))
               if 0 < len(relay) <= MAX_RELAY else None)
        sent = json.loads(raw) if raw is not None else None
        if sent is None or sent["provider"] != name:
            refusal: str | None = "unknown, used or expired logout state"
        else:
            refused = await asyncio.to_thread(provider.accept_logout_response, query,
                                              request_id=sent["request_id"])
            refusal = None if refused is None else f"LogoutResponse refused: {refused.reason}"
        user = sent["user"] if sent is not None else None
        if refusal is not None:
            self.audit.record("saml.logout_failed", factor=name, user=user, client=client,
                              reason=refusal)
        else:
            self.audit.record("saml.logout", factor=name, user=user, initiated_by="gateway",
                              client=client)
        # The gateway's session ended before the browser left; only the IdP's may remain.
        return self._templates.TemplateResponse(request, "signed_out.html",
                                                {"confirmed": refusal is None})

    async def sign_out_at_idp(self, request: Request, session: Session) -> Response | None:
        """After `session` was signed out of the portal: if a SAML IdP signed it in, the
        page that takes the browser to the IdP with a signed LogoutRequest."""
        subject = session.claims.saml
        if subject is None:
            return None
        try:
            provider = await self.provider(subject.provider)
        except ConfigError:
            provider = None
        if provider is None:
            return None
        relay = new_token()
        message = await asyncio.to_thread(provider.logout_request, subject.name_id,
                                          subject.name_id_format, subject.session_index, relay)
        await self.ephemeral.put(self._key(relay), json.dumps({
            "provider": subject.provider, "request_id": message.request_id,
            "user": session.username}).encode(), LOGOUT_LIFETIME)
        self.audit.record("saml.logout_requested", factor=subject.provider,
                          user=session.username, client=session.client_address)
        # A page, not a redirect: the sign-out was a form post, and the portal's
        # `form-action 'self'` would stop a redirect of it to the IdP.
        step = Step(kind="redirect", title=f"Signing out of {subject.provider}",
                    redirect=Redirect(message.url))
        return self._templates.TemplateResponse(request, "redirect.html", {"step": step})

    def _key(self, relay: str) -> str:
        return f"{NAMESPACE}:{self.hasher.digest(NAMESPACE, relay)}"


def saml_callback_bodies(settings: Settings) -> LargerBodies | None:
    """The body limit of the SAML providers' ACS: a signed Response with its certificates
    and a user's many groups is often larger than `limits.max_request_body`, which every
    other request keeps. Only POSTs to those callback paths get the larger limit, the
    largest `max_response_bytes` in form encoding (None: no SAML provider)."""
    saml = [provider for provider in settings.auth.all_providers().values()
            if isinstance(provider, SamlProvider)]
    if not saml:
        return None
    return LargerBodies(frozenset(f"{CALLBACK_PATH}{provider.name}" for provider in saml),
                        callback_body_limit(max(provider.max_response_bytes
                                                for provider in saml)))
