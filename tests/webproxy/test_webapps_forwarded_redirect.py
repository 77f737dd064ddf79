"""Found with DokuWiki (tests/e2e/test_web_applications.py): an application that honours
the `X-Forwarded-Proto: https` the gateway sends, but builds its absolute URLs from the
Host it was sent (the upstream's), redirects to https://UPSTREAM-HOST:UPSTREAM-PORT/...
(DokuWiki without `baseurl`, Django's SECURE_PROXY_SSL_HEADER without
USE_X_FORWARDED_HOST, Flask's ProxyFix(x_proto=1)). That is the upstream with the scheme
the gateway told it: the redirect goes to the resource's public origin, not refused as an
internal address."""

from __future__ import annotations

from portcullis.config.model import Resource
from portcullis.webproxy.rewrite import rewrite_location
from portcullis.webproxy.sites import Sites

GATEWAY = "https://localhost:8443"


def test_a_redirect_to_the_upstream_with_the_forwarded_scheme_goes_to_the_public_origin(
        ) -> None:
    sites = Sites([Resource(name="wiki", title="Wiki", kind="web",
                            upstream="http://127.0.0.1:8080", host="wiki.localhost")], GATEWAY)
    site = sites.all[0]
    verdict = rewrite_location(b"https://127.0.0.1:8080/doku.php?id=start", site, sites.all,
                               sites.is_public)
    assert verdict.value == b"https://wiki.localhost:8443/doku.php?id=start", verdict.reason
