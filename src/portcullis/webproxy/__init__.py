"""Web applications through the gateway, each at a host name of its own (docs/webproxy.md)."""
