"""Secure shadowing (issue 13): the device agent and its device proxy, the console proxy,
the byte relay between them, and the agent's client of the shadow hub.

Neither VNC program knows TLS: the two proxies carry the viewer's bytes over mutual TLS
on the VNC port. Nothing here decides who may shadow what; the hub does, and the device
asks it about every request before it opens anything.
"""
