"""Federated sign-in: the relying-party side of OpenID Connect.

What the identity provider said is checked here and handed back as plain verified claims
(a dict): mapping them into a Portcullis user is `portcullis.identity`'s job, so this
package never imports it. Every connection to a provider goes through the httpx client
the caller builds over the node's Dialer.
"""
