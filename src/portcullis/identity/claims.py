"""The one normalised claim set every provider's answer becomes, kept with the session.

Each provider reports what it knows as `Attributes`; the broker (`merge`) folds them in
the order the factors passed: groups accumulate, and a value a provider did not know is
filled by a later one. The user name and subject are fixed by the flow, never by a
provider's attribute, so a later factor cannot change who signed in.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any


@dataclass(frozen=True)
class SamlSubject:
    """Whom a SAML IdP signed in, as its single logout must name them: the NameID as sent
    (with its format) and the IdP's session index."""

    provider: str
    name_id: str
    name_id_format: str | None = None
    session_index: str | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> SamlSubject | None:
        return cls(**data) if data else None


@dataclass(frozen=True)
class Attributes:
    """What one provider says about the user."""

    groups: tuple[str, ...] = ()
    # Where the groups came from (the source of truth group decisions rest on): the
    # providers, or "directory NAME" for a federated identity linked to its account.
    groups_from: tuple[str, ...] = ()
    display_name: str | None = None
    email: str | None = None
    upn: str | None = None
    sid: str | None = None
    guid: str | None = None
    certificate: str | None = None       # the client certificate's subject
    saml: SamlSubject | None = None      # a SAML provider's subject, for single logout

    def merge(self, later: Attributes) -> Attributes:
        filled = {f.name: getattr(self, f.name) or getattr(later, f.name)
                  for f in fields(self) if f.name not in LISTS}
        return replace(self, groups=tuple(dict.fromkeys(self.groups + later.groups)),
                       groups_from=tuple(dict.fromkeys(self.groups_from + later.groups_from)),
                       **filled)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Attributes:
        return cls(**{**data, **{name: tuple(data.get(name, ())) for name in LISTS},
                      "saml": SamlSubject.from_json(data.get("saml"))})


LISTS = ("groups", "groups_from")


@dataclass(frozen=True)
class Claims:
    sub: str                          # realm:username, unique across providers
    username: str
    groups: tuple[str, ...] = ()
    groups_from: tuple[str, ...] = ()
    idp: str = "local"                # the realm: the provider whose namespace the name is in
    amr: tuple[str, ...] = ()         # the providers passed, in order
    auth_time: float = field(default_factory=time.time)
    display_name: str | None = None
    email: str | None = None
    upn: str | None = None
    sid: str | None = None
    guid: str | None = None
    certificate: str | None = None
    saml: SamlSubject | None = None

    @classmethod
    def build(cls, realm: str, username: str, attributes: Attributes,
              amr: tuple[str, ...], auth_time: float) -> Claims:
        return cls(sub=f"{realm}:{username}", username=username, idp=realm, amr=amr,
                   auth_time=auth_time, **{f.name: getattr(attributes, f.name)
                                           for f in fields(attributes)})

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Claims:
        known = {f.name for f in fields(cls)}
        return cls(**{**{k: v for k, v in data.items() if k in known},
                      **{name: tuple(data.get(name, ())) for name in (*LISTS, "amr")},
                      "saml": SamlSubject.from_json(data.get("saml"))})
