"""`portcullis connect`: the tunnel plus its local listeners, until stopped."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from portcullis.client import proxyauth
from portcullis.client.httpproxy import HttpProxyInbound
from portcullis.client.proxies import (
    HANDSHAKE_TIMEOUT,
    ForwardInbound,
    ProxySettings,
    SocksInbound,
    UdpForward,
)
from portcullis.client.state import ClientState
from portcullis.client.transparent import (
    Capture,
    DnsForwarder,
    Rules,
    TransparentInbound,
    TransparentUdp,
    system_resolver,
)
from portcullis.client.tunnel import DEFAULT_CARRIERS, STATUS_FILE, TunnelClient
from portcullis.errors import ClientError
from portcullis.proto.mux import Reason


@dataclass(frozen=True)
class Listen:
    kind: Literal["socks", "http", "forward", "udp"]
    host: str
    port: int
    to_host: str = ""
    to_port: int = 0

    def describe(self) -> str:
        if self.kind == "forward":
            return f"forward to {self.to_host}:{self.to_port}"
        if self.kind == "udp":
            return f"UDP forward to {self.to_host}:{self.to_port}"
        return {"socks": "SOCKS5 proxy", "http": "HTTP CONNECT proxy"}[self.kind]


def describe_refusal(host: str, port: int, reason: Reason, message: str) -> str:
    """The line `connect` prints for a stream the gateway refused."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    # The gateway's words go to a terminal: no control characters from the far side.
    words = "".join(c if c.isprintable() else "?" for c in message) or reason.name.lower()
    return f"refused {where}: {words}"


async def run_connect(state: ClientState, tls: ssl.SSLContext, listens: list[Listen], *,
                      home: Path, say: Callable[[str], None],
                      on_listening: Callable[[Listen, str, int, str | None], None],
                      transparent: bool = False, proxy_auth: bool | None = None,
                      handshake_timeout: float = HANDSHAKE_TIMEOUT,
                      carriers: int = DEFAULT_CARRIERS) -> str:
    """Serve until Ctrl-C/SIGTERM ("stopped") or the tunnel ends for good (its reason).

    ``proxy_auth`` None applies ``proxyauth.proxy_auth_default`` to this machine;
    ``on_listening`` gets, for a proxy that requires it, the URL with the secret.
    """
    tunnel = TunnelClient(state.url, state.token, tls, say=say,
                          status_file=home / STATUS_FILE, carriers=carriers)
    if proxy_auth is None and any(listen.kind in ("socks", "http") for listen in listens):
        decision = proxyauth.this_machine_default()
        proxy_auth = decision.required
        say(f"proxy authentication {'on' if decision.required else 'off'}: "
            f"{decision.reason}")
    credentials = proxyauth.new_credentials() if proxy_auth else None
    settings = ProxySettings(
        handshake_timeout=handshake_timeout, credentials=credentials,
        on_refused=lambda *refusal: say(describe_refusal(*refusal)))
    credentials_file: Path | None = None
    loop = asyncio.get_running_loop()
    servers: list[asyncio.Server] = []
    endpoints: list[asyncio.DatagramTransport] = []
    closers: list[Callable[[], None]] = []

    def factory(listen: Listen) -> Callable[[], asyncio.Protocol]:
        if listen.kind == "socks":
            return lambda: SocksInbound(tunnel, settings)
        if listen.kind == "http":
            return lambda: HttpProxyInbound(tunnel, settings)
        return lambda: ForwardInbound(tunnel, listen.to_host, listen.to_port, settings)

    def udp_factory(listen: Listen) -> Callable[[], UdpForward]:
        return lambda: UdpForward(tunnel, listen.to_host, listen.to_port)

    async def open_listener(listen: Listen) -> tuple[str, int]:
        if listen.kind == "udp":
            udp, _ = await loop.create_datagram_endpoint(
                udp_factory(listen), local_addr=(listen.host, listen.port))
            endpoints.append(udp)
            host, port = udp.get_extra_info("sockname")[:2]
        else:
            server = await loop.create_server(factory(listen), listen.host, listen.port)
            servers.append(server)
            host, port = server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    def connected(client: TunnelClient) -> None:
        config = client.config
        say(f"tunnel up as {client.hello.get('user')}: networks {config.get('networks')}, "
            f"split tunnel {config.get('split_tunnel')}")

    rules = Rules() if transparent else None
    if rules is not None:
        for table in rules.remove_leftovers():
            say(f"removed the rules a stopped client left behind ({table})")
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, tunnel.stop)
    runner = asyncio.ensure_future(tunnel.run(connected))
    try:
        # Listen only once the first connection worked: a wrong URL or session fails fast.
        while tunnel.connected_since is None and not runner.done():
            await asyncio.sleep(0.02)
        if runner.done():
            return await runner
        urls: dict[str, str] = {}
        for listen in listens:
            try:
                host, port = await open_listener(listen)
            except OSError as exc:
                raise ClientError(f"cannot listen on {listen.host}:{listen.port} for the "
                                  f"{listen.describe()}: {exc.strerror}") from None
            url = None   # shown with the secret in it, to paste into applications
            if credentials is not None and listen.kind in ("socks", "http"):
                url = urls[listen.kind] = proxyauth.proxy_url(listen.kind, host, port,
                                                              credentials)
            on_listening(listen, host, port, url)
        if credentials is not None and urls:
            credentials_file = proxyauth.write_credentials(home, credentials, urls)
            say(f"proxy credentials for scripts: {credentials_file}")
        if rules is not None:
            await capture(rules, tunnel, state.url, servers, endpoints, closers, say)
        return await runner
    finally:
        try:
            if rules is not None:
                rules.remove()
        finally:
            for close in closers:
                close()
        if credentials_file is not None:
            credentials_file.unlink(missing_ok=True)   # the secret dies with the run
        for server in servers:
            server.close()
        for endpoint in endpoints:
            endpoint.close()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        if not runner.done():
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner


async def capture(rules: Rules, tunnel: TunnelClient, url: str, servers: list[asyncio.Server],
                  endpoints: list[asyncio.DatagramTransport],
                  closers: list[Callable[[], None]], say: Callable[[str], None]) -> None:
    """Start the transparent listeners and install the rules for the pushed networks."""
    loop = asyncio.get_running_loop()
    config = tunnel.config
    server = await loop.create_server(lambda: TransparentInbound(tunnel), "127.0.0.1", 0)
    servers.append(server)
    tcp_port = server.sockets[0].getsockname()[1]
    dns = config.get("dns") if isinstance(config.get("dns"), dict) else {}
    assert isinstance(dns, dict)
    dns_port = None
    if dns.get("servers") and dns.get("suffixes"):
        forwarder, _ = await loop.create_datagram_endpoint(
            lambda: DnsForwarder(tunnel, list(dns["servers"]), list(dns["suffixes"]),
                                 system_resolver()), local_addr=("127.0.0.1", 0))
        endpoints.append(forwarder)
        dns_port = forwarder.get_extra_info("sockname")[1]
    udp = TransparentUdp(tunnel)
    closers.append(udp.close)
    gateway_host = urlsplit(url).hostname or ""
    infos = await loop.getaddrinfo(gateway_host, None, type=socket.SOCK_STREAM)
    networks = config.get("networks")
    rules.install(Capture(
        split_tunnel=str(config.get("split_tunnel", "on")),
        networks=tuple(str(n) for n in networks) if isinstance(networks, list) else (),
        exclude=tuple(sorted({str(info[4][0]) for info in infos})),
        tcp_port=tcp_port, dns_port=dns_port, udp_port=udp.port, udp_mark=rules.udp_mark,
        families=("ip",)))
    mode = str(config.get("split_tunnel", "on"))
    scope = {"on": f"TCP and UDP to {networks}", "reverse": f"TCP to all but {networks}",
             "off": "all TCP"}.get(mode, f"TCP to {networks}")
    say(f"transparent: {scope} through the tunnel"
        + (f"; DNS for {dns['suffixes']} inside" if dns_port else "")
        + f" (nftables table {rules.table})")


def read_status(home: Path) -> dict[str, Any] | None:
    """The running tunnel's last status, or None if none is running."""
    try:
        current: dict[str, Any] = json.loads((home / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None
    try:
        os.kill(int(current["pid"]), 0)
    except (OSError, KeyError, ValueError):
        return None
    return current
