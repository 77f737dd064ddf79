"""`portcullis ping HOST`: ICMP echo through the tunnel, performed by the gateway."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable

from portcullis.client.state import ClientState
from portcullis.client.tunnel import TunnelClient
from portcullis.errors import ClientError
from portcullis.proto import mux

ECHO_DATA = bytes(range(56))
REPLY_WAIT = 5.0


async def run_ping(state: ClientState, tls: ssl.SSLContext, host: str, *, count: int,
                   interval: float, say: Callable[[str], None]) -> int:
    """Send `count` echoes; return how many were answered."""
    tunnel = TunnelClient(state.url, state.token, tls, say=say, carriers=1)   # echoes only
    runner = asyncio.ensure_future(tunnel.run())
    try:
        while tunnel.current is None and not runner.done():
            await asyncio.sleep(0.01)
        session = tunnel.current
        if session is None:
            await runner   # raises the connection error, if there was one
            raise ClientError(f"the tunnel did not open: {tunnel.ended}")
        replies: dict[int, asyncio.Future[bytes]] = {}
        refused: list[str] = []

        def deliver(answer: bytes) -> None:
            waiting = replies.get(int.from_bytes(answer[:2], "big"))
            if waiting is not None and not waiting.done():
                waiting.set_result(answer[2:])

        session.on_refused = lambda reason, message: refused.append(
            f"{message} ({reason.name.lower()})")
        flow = session.open_flow(host, 0, deliver, idle_timeout=count * interval + 30,
                                 protocol=mux.Protocol.ICMP)
        answered = 0
        for sequence in range(1, count + 1):
            replies[sequence] = asyncio.get_running_loop().create_future()
            flow.send(sequence.to_bytes(2, "big") + ECHO_DATA)
            try:
                answer = await asyncio.wait_for(replies[sequence], REPLY_WAIT)
            except TimeoutError:
                if refused:
                    raise ClientError(f"the gateway refused: {refused[0]}") from None
                say(f"seq={sequence}: no reply")
                continue
            rtt_ms = int.from_bytes(answer[:4], "big") / 1000
            intact = "" if answer[4:] == ECHO_DATA else " (data differs)"
            say(f"{len(answer) - 4} bytes from {host}: seq={sequence} time={rtt_ms:.3f} ms"
                f"{intact}")
            answered += 1
            if sequence < count:
                await asyncio.sleep(interval)
        return answered
    finally:
        tunnel.stop()
        runner.cancel()
