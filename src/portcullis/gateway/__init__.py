"""The gateway role: the edge listener, launch and (later) tunnel endpoints."""
