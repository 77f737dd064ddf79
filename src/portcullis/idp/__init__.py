"""The gateway as an OpenID Connect provider for other applications (`[oidc]`).

A role above `identity` and beside `portal`: applications send their users here, the
users sign in through the gateway's own login flows (the portal's pages), and the
applications get ID and access tokens carrying the broker's claims. Nothing below this
package imports it; `routes()` in `idp.endpoints` is what a node mounts.
"""
