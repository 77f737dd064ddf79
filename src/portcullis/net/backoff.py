"""How long a connection that keeps itself up (a relay or a shadow agent dialling out)
waits before its next attempt: full jitter, so that after a restart the peers that lost
their connections together do not all come back at the same moment."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol, TypeVar

from portcullis.net.muxsession import MuxSession, StreamOpenHandler
from portcullis.net.websocket import WebSocketMux
from portcullis.proto.mux import MuxConnection, Reason


def backoff_delay(attempt: int, low: float, high: float,
                  draw: Callable[[float, float], float] = random.uniform) -> float:
    """Full jitter: uniform over [0, min(high, low * 2^attempt)]."""
    return draw(0.0, min(high, low * 2 ** min(attempt, 32)))


class Slot(Protocol):
    """One of the K connections a dialling side keeps (its live session, if any)."""

    session: MuxSession | None


S = TypeVar("S", bound=Slot)


async def keep_slots(slots: Sequence[S], keep: Callable[[S], Awaitable[None]],
                     stopping: str) -> None:
    """Run `keep(slot)` for every slot until cancelled; then close the live sessions,
    telling the far side why (`stopping`), so that it need not wait for a timeout."""
    tasks = [asyncio.ensure_future(keep(slot)) for slot in slots]
    try:
        # wait, not gather: a cancelled gather waits for its children, and on Python 3.11
        # a child inside asyncio.wait_for can lose its cancellation (the timed call
        # finishing at that moment) and go on for ever. Each child is cancelled here,
        # again, and the caller is not kept waiting.
        await asyncio.wait(tasks)
    finally:
        for task in tasks:
            task.cancel()
        for slot in slots:
            if slot.session is not None:
                slot.session.close(Reason.SHUTDOWN, stopping)


async def greeted_session(carrier: WebSocketMux, hello: dict[str, object],
                          on_open: StreamOpenHandler,
                          timeout: float) -> tuple[MuxSession, dict[str, object] | None]:
    """The dialling side's mux session on a fresh carrier (it is the "client": the far
    side opens the streams): our HELLO sent, the far side's awaited. None for the HELLO
    when the far side refused (its GOAWAY says why: `session.end_reason()`) or said
    nothing in time; the session is then closed."""
    codec = MuxConnection("client")
    codec.send_hello(hello)
    session = MuxSession(codec, on_open=on_open)
    carrier.attach(session)
    answer = await session.hello_within(timeout)
    if answer is None:
        session.close(Reason.TIMED_OUT, "no HELLO in time")
    return session, answer
