"""Federated sign-in protocols (SAML 2.0, OpenID Connect); never imports identity."""
