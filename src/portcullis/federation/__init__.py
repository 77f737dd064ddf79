"""Federated sign-in protocols: the relying party of OpenID Connect and the service
provider of SAML 2.0.

What the identity provider said is checked here and handed back as plain verified claims:
mapping them into a Portcullis user is `portcullis.identity`'s job, so this package never
imports it. Every connection to a provider goes through an httpx client built over the
node's Dialer.
"""
