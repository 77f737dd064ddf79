"""The connections of every worker of a node, for the administration API.

Each worker's `ConnectionRegistry` holds only the connections that worker carries, and
an administrator's request reaches one worker. So that it sees and ends the node's, the
worker asks the others through the event bus (channel `node-connections`), as session
endings travel: each worker of the node writes what it carries to the ephemeral store
under the question's id (a short TTL), and the asking worker reads the answers that came
within `ANSWER_WAIT`. Ending a connection another worker holds is one more message on
the bus; the holder ends it as if the request had reached it, and says so in the store,
where the asking worker looks for that within `END_WAIT` before it answers.

A node is its host and its gateway's listening address: the workers behind one port.
A node of one process answers itself, with no question asked.
Never writes a session token; the session handle it writes stays out of the API's answers.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import socket
from collections.abc import Coroutine
from typing import Any

import structlog

from portcullis.errors import StoreError
from portcullis.gateway.connections import ConnectionRegistry
from portcullis.identity.endings import Ending, notice
from portcullis.store import EphemeralStore, EventBus

log = structlog.get_logger("portcullis.gateway.node_connections")

CHANNEL = "node-connections"
# How long the asking worker waits for the others' answers, and how long they are kept.
ANSWER_WAIT = 0.5
ANSWER_TTL = 10.0
ANSWER_POLL = 0.02
# How long the asking worker waits for the holder to say it ended a connection: the
# bus's poll (0.05 s) and a loaded holder's turn, within the second an ending may take.
END_WAIT = 1.0
# Every listed connection says which worker carries it under this key.
WORKER = "worker"


class NodeConnections:
    """This worker's side: answers the other workers, and asks them."""

    def __init__(self, registry: ConnectionRegistry, store: EphemeralStore, events: EventBus,
                 node: str) -> None:
        self._registry = registry
        self._store = store
        self._events = events
        self.node = node
        self.worker = str(os.getpid())
        # How many other workers serve this node (set by the supervisor's worker).
        self.siblings = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        """Answer the other workers' questions until cancelled."""
        await self._events.listen(CHANNEL, self._deliver)

    async def described(self) -> list[dict[str, object]]:
        """Every connection the node's workers carry (this one's now, the others' as they
        answered within `ANSWER_WAIT`), each with the session handle it came from."""
        return (await self._gathered())[0]

    async def _gathered(self) -> tuple[list[dict[str, object]], set[str]]:
        """`described`, and which workers answered (this one included)."""
        found, answered = self._describe(), {self.worker}
        if not self.siblings:
            return found, answered
        question = secrets.token_hex(8)
        await self._events.publish(CHANNEL, json.dumps(
            {"node": self.node, "ask": question, "from": self.worker}).encode())
        answers: set[str] = set()
        for _ in range(int(ANSWER_WAIT / ANSWER_POLL)):
            await asyncio.sleep(ANSWER_POLL)
            answers = await self._store.set_members(self._answers(question))
            if len(answers) >= self.siblings:
                break
        for key in sorted(answers):
            answer = await self._store.get(key)
            if answer is not None:
                found.extend(json.loads(answer))
                answered.add(key.rsplit(":", 1)[1])
        return sorted(found, key=lambda connection: float(str(connection["since"]))), answered

    async def end_elsewhere(self, connection_id: str, holder: str) -> bool:
        """Ask the worker `holder`, which listed `connection_id`, to end it (its session
        stays); whether it said it did within `END_WAIT`, or answers that it no longer
        carries it (its client left meanwhile)."""
        await self._events.publish(CHANNEL, json.dumps(
            {"node": self.node, "end": connection_id}).encode())
        try:
            for _ in range(int(END_WAIT / ANSWER_POLL)):
                await asyncio.sleep(ANSWER_POLL)
                if await self._store.get(self._ended(connection_id)) is not None:
                    return True
            connections, answered = await self._gathered()
            return holder in answered and all(connection["id"] != connection_id
                                              for connection in connections)
        except StoreError as exc:
            log.warning("a connection's end not confirmed by another worker", error=str(exc))
            return False

    def _describe(self) -> list[dict[str, object]]:
        return [{**connection.describe(), WORKER: self.worker,
                 "session_handle": connection.session_handle}
                for connection in self._registry.list()]

    def _answers(self, question: str) -> str:
        return f"node-connections:{self.node}:{question}"

    def _ended(self, connection_id: str) -> str:
        return f"node-connections:{self.node}:ended:{connection_id}"

    def _deliver(self, raw: bytes) -> None:
        try:
            message = json.loads(raw)
            if message.get("node") != self.node:
                return   # another node's workers
        except (ValueError, AttributeError):
            log.warning("ignored a malformed node-connections message")
            return
        if "end" in message:
            told = notice(Ending.ADMIN_CONNECTIONS)
            for connection in self._registry.list():
                if connection.id == message["end"]:
                    connection.session.close(told.reason, told.message)
                    self._spawn(self._confirm_ended(connection.id))
        elif "ask" in message and message.get("from") != self.worker:
            self._spawn(self._answer(str(message["ask"])))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _confirm_ended(self, connection_id: str) -> None:
        try:
            await self._store.put(self._ended(connection_id), self.worker.encode(), ANSWER_TTL)
        except StoreError as exc:
            log.warning("a connection's end not confirmed to another worker", error=str(exc))

    async def _answer(self, question: str) -> None:
        key = f"{self._answers(question)}:{self.worker}"
        try:
            await self._store.put(key, json.dumps(self._describe()).encode(), ANSWER_TTL)
            await self._store.add_to_set(self._answers(question), key, ANSWER_TTL)
        except StoreError as exc:
            log.warning("connections not listed for another worker", error=str(exc))


def node_name(gateway_listen: str) -> str:
    """The workers behind one port of one host."""
    return f"{socket.gethostname()}:{gateway_listen}"
