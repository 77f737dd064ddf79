"""What the tunnel benchmarks share: a deployment whose access policy lets our user reach
loopback ports, `portcullis connect` with -L/-U forwards, and a wire-level tunnel client.

The wire-level client (`WireTunnel`) is `bench.wire_launch.WireLaunch` with the session
token in HELLO instead of a ticket and any number of streams: it uses the client's own
WebSocket carrier and mux codec, so a benchmark driving it costs what `portcullis
connect` costs per stream minus the local socket. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
import time
from collections import deque
from collections.abc import Iterable
from contextlib import ExitStack
from pathlib import Path

from bench.deployment import PORTCULLIS, Deployment, Process, start_process
from bench.wire_launch import STEP_TIMEOUT, LaunchFailed, WireLaunch
from portcullis.net import websocket
from portcullis.proto import mux

POLICY = """
[[policies]]
name = "bench"
action = "allow"
groups = ["staff"]
networks = ["127.0.0.0/8"]
ports = ["1024-65535"]
protocols = ["tcp", "udp"]
"""


def start_tunnel_gateway(stack: ExitStack, logs: Path) -> tuple[Deployment, Process]:
    """A deployment (made as bench.deployment does) that allows our user into loopback
    ports 1024-65535 over TCP and UDP, running under `stack`."""
    deployment = Deployment.create(logs)
    with (deployment.directory / "portcullis.toml").open("a") as handle:
        handle.write(POLICY)
    return deployment, deployment.start(stack, logs)


def tunnel_url(deployment: Deployment) -> str:
    return websocket.websocket_url(deployment.url, "/api/v1/tunnel")


def udp_forward_available() -> bool:
    """Whether this portcullis has `connect -U` (the UDP forward)."""
    import subprocess

    result = subprocess.run([PORTCULLIS, "connect", "--help"], capture_output=True,
                            text=True, timeout=60)
    return re.search(r"^\s*-U\b", result.stdout, re.MULTILINE) is not None


def free_port_both() -> int:
    """A loopback port free for TCP and for UDP (iperf3 -u uses both on one port)."""
    for _ in range(100):
        with socket.socket() as tcp, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            tcp.bind(("127.0.0.1", 0))
            port = int(tcp.getsockname()[1])
            try:
                udp.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("found no port free for both TCP and UDP in 100 tries")


def wait_for_udp_bound(port: int, process: Process, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open("/proc/net/udp") as handle:
            next(handle)
            if any(int(line.split()[1].rsplit(":", 1)[1], 16) == port for line in handle):
                return
        if process.popen.poll() is not None:
            raise RuntimeError(f"{process.name} exited {process.popen.returncode}:\n"
                               f"{process.output()[-2000:]}")
        time.sleep(0.02)
    raise RuntimeError(f"nothing bound UDP port {port} after {timeout} s")


def wait_time_wait_drained(limit: int = 2000, timeout: float = 75) -> float:
    """Wait (bounded) until at most `limit` loopback TCP sockets are in TIME_WAIT; returns
    the seconds waited.

    A benchmark that closes thousands of connections leaves their ports in TIME_WAIT for
    60 s. connect() may reuse them on loopback (tcp_tw_reuse), bind() may not: the next
    benchmark's `free_port_run` would find no three free ports in a row, as connect()
    takes the even ports and bind(0) the odd ones."""
    started = time.monotonic()
    deadline = started + timeout
    while time.monotonic() < deadline:
        with open("/proc/net/tcp") as handle:
            next(handle)
            waiting = sum(1 for line in handle if line.split()[3] == "06")
        if waiting <= limit:
            break
        time.sleep(0.5)
    return time.monotonic() - started


def start_connect(stack: ExitStack, logs: Path, env: dict[str, str], *,
                  forwards: Iterable[str] = (), fixed_forwards: Iterable[tuple[int, str]] = (),
                  udp_forwards: Iterable[tuple[int, str]] = (),
                  name: str = "portcullis connect") -> tuple[Process, dict[str, int]]:
    """`portcullis connect` (no proxies) with a -L forward on a free port for each target
    in `forwards` ("HOST:PORT"), plus -L / -U forwards on given local ports. Returns the
    process once the tunnel is up and every forward listens, and target -> local port of
    `forwards`. `name` names the process and its log (several may run side by side)."""
    forwards, fixed_forwards = list(forwards), list(fixed_forwards)
    udp_forwards = list(udp_forwards)
    argv = [PORTCULLIS, "connect", "--socks", "off", "--http", "off"]
    for target in forwards:
        argv += ["-L", f"127.0.0.1:0:{target}"]
    for port, target in fixed_forwards:
        argv += ["-L", f"127.0.0.1:{port}:{target}"]
    for port, target in udp_forwards:
        argv += ["-U", f"127.0.0.1:{port}:{target}"]
    process = start_process(stack, argv, logs / f"{name.replace(' ', '-')}.log",
                            env={**env, "PYTHONUNBUFFERED": "1"}, name=name)
    process.wait_for(r"tunnel up as ")
    ports = {target: int(process.wait_for(
        rf"(?m)^forward to {re.escape(target)}: listening on [\d.]+:(\d+)").group(1))
        for target in forwards}
    for port, target in fixed_forwards:
        process.wait_for(rf"(?m)^forward to {re.escape(target)}: listening on [\d.]+:{port}")
    for port, _ in udp_forwards:
        wait_for_udp_bound(port, process)
    return process, ports


class _Stream:
    __slots__ = ("events", "waiter")

    def __init__(self) -> None:
        self.events: deque[mux.Event] = deque()
        self.waiter: asyncio.Future[None] | None = None


class WireTunnel(WireLaunch):
    """One tunnel at the wire level: WebSocket, HELLO {"session": TOKEN}, the gateway's
    HELLO and CONFIG; then any number of streams, each with its own event queue."""

    def __init__(self, carrier: websocket.WebSocketMux) -> None:
        super().__init__(carrier)
        self.loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[dict[str, object]] = self.loop.create_future()
        self.streams: dict[int, _Stream] = {}
        self._flush_scheduled = False

    @classmethod
    async def connect(cls, url: str, token: str, tls: ssl.SSLContext) -> WireTunnel:
        async with asyncio.timeout(STEP_TIMEOUT):
            carrier = await websocket.connect(url, tls)
            tunnel = cls(carrier)
            carrier.attach(tunnel)  # type: ignore[arg-type]
            try:
                tunnel.codec.send_hello({"version": 1, "session": token})
                tunnel.flush()
                await tunnel.ready
            except BaseException:
                tunnel.close()
                raise
        return tunnel

    # -- what the carrier calls ----------------------------------------------------------
    def receive_message(self, message: bytes) -> None:
        codec = self.codec
        codec.receive_data(message, time.monotonic())
        for event in codec.events_received():
            if isinstance(event, mux.DataReceived):
                codec.consumed(event.stream_id, len(event.data))
                self._deliver(event.stream_id, event)
            elif isinstance(event, mux.StreamAccepted | mux.StreamEnded | mux.StreamRefused
                            | mux.StreamReset):
                self._deliver(event.stream_id, event)
            elif isinstance(event, mux.ConfigReceived):
                if not self.ready.done():
                    self.ready.set_result(event.config)
            elif isinstance(event, mux.GoAwayReceived):
                self._gone(f"gateway: {event}")
        self.flush_soon()  # WINDOW updates

    def carrier_closed(self) -> None:
        self._gone("the gateway closed the connection")

    # -- driving it ----------------------------------------------------------------------
    def flush_soon(self) -> None:
        """Once per loop iteration, like MuxSession: concurrent streams share messages."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self.gone:
            self.flush()

    def open_stream(self, port: int, host: str = "127.0.0.1") -> int:
        stream_id = self.codec.open_stream(mux.Protocol.TCP, host, port)
        self.streams[stream_id] = _Stream()
        self.flush_soon()
        return stream_id

    def send(self, stream_id: int, data: bytes, *, fin: bool = False) -> None:
        self.codec.send_data(stream_id, data, fin=fin)
        self.flush_soon()

    async def expect(self, stream_id: int, kind: type[mux.Event]) -> mux.Event:
        """The stream's next event, which must be a `kind` (bounded by STEP_TIMEOUT)."""
        stream = self.streams[stream_id]
        async with asyncio.timeout(STEP_TIMEOUT):
            while not stream.events:
                if self.gone:
                    raise LaunchFailed("the tunnel is gone")
                stream.waiter = self.loop.create_future()
                await stream.waiter
        event = stream.events.popleft()
        if not isinstance(event, kind):
            raise LaunchFailed(f"stream {stream_id}: expected {kind.__name__}, got {event}")
        return event

    async def echo_stream(self, port: int, *, fin: bool) -> int:
        """Open a stream to 127.0.0.1:port, wait for ACCEPT, send one byte (with FIN if
        `fin`), wait for it to come back; returns the stream id."""
        stream_id = self.open_stream(port)
        try:
            await self.expect(stream_id, mux.StreamAccepted)
            self.send(stream_id, b"x", fin=fin)
            received = await self.expect(stream_id, mux.DataReceived)
            assert isinstance(received, mux.DataReceived)
            if bytes(received.data) != b"x":
                raise LaunchFailed(f"echo answered {bytes(received.data)!r}")
        except BaseException:
            self.abandon(stream_id)
            raise
        return stream_id

    def abandon(self, stream_id: int) -> None:
        """Forget the stream here, resetting it at the gateway if it is still open."""
        self.streams.pop(stream_id, None)
        if not self.gone and not self.codec.closed:
            self.codec.reset_stream(stream_id, mux.Reason.CANCELLED, "benchmark")
            self.flush_soon()

    # -- internals -----------------------------------------------------------------------
    def _deliver(self, stream_id: int, event: mux.Event) -> None:
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        stream.events.append(event)
        if stream.waiter is not None and not stream.waiter.done():
            stream.waiter.set_result(None)

    def _gone(self, why: str) -> None:
        self.gone = True
        if not self.ready.done():
            self.ready.set_exception(LaunchFailed(why))
        for stream in self.streams.values():
            if stream.waiter is not None and not stream.waiter.done():
                stream.waiter.set_result(None)


async def close_tunnels(tunnels: list[WireTunnel]) -> None:
    """GOAWAY + WebSocket close for each, 100 at a time (as idle_memory closes launches)."""
    for start in range(0, len(tunnels), 100):
        for tunnel in tunnels[start:start + 100]:
            tunnel.close()
        await asyncio.sleep(0.05)
    tunnels.clear()
