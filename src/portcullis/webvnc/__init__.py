"""VNC in the browser: the portal's viewer page (noVNC) and the gateway's WebSocket
endpoint that carries its RFB bytes to the desktop's server (docs/webvnc.md)."""
