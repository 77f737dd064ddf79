"""Portcullis: a self-hosted secure remote-access gateway."""

__version__ = "0.1.0"
