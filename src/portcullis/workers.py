"""Several worker processes behind one node's listening ports (`[gateway] workers`).

The supervisor, the process `portcullis up` or `serve` started, binds every listener's
socket once and forks the workers; each builds its own `Node` from the configuration file
and serves the sockets it inherited, where the kernel hands each new connection to one
of them. Fork, not spawn: the supervisor never runs an event loop nor starts a thread, so
every fork (the first start, a replacement, a rolling restart) is taken from the same
quiet state; a worker imports nothing again and shares the supervisor's pages; the
sockets need no passing. One shared socket per listener rather than SO_REUSEPORT per
worker: a taken port stays one error at start, and a replacement worker takes over the
same queue, so a restart loses no waiting connection.

Signals to the supervisor:
- SIGTERM, SIGINT: every worker stops as a lone node does (stops accepting, ends its
  connections); one still running after `STOP_GRACE` seconds is killed; then it exits.
- SIGHUP: each worker reloads the configuration (`Node.reload`).
- SIGUSR2: a rolling restart. One worker at a time, a new one is started (reading the
  configuration file again) and, once it serves, the old one stops as above.
A worker that dies unexpectedly is replaced, after a pause that grows while it keeps
dying.

Workers share what nodes share, through the ephemeral store (the default embedded file,
or Redis): sessions, tickets, lockouts and session endings. What lives in one process's
memory cannot be shared, so such a node runs one worker: a memory:// store (tests),
dial-out relays, shadow devices that dial out.

With one worker there is no supervisor: the node is served in this process, as before.
The supervisor never runs an event loop and never signals a process it did not start.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import selectors
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

import structlog

from portcullis.config import config_path, load_settings
from portcullis.config.model import Settings
from portcullis.errors import ConfigError, PortcullisError, StoreError
from portcullis.node import LISTEN_KEYS, ListenAddress, Node, bind_listeners, listen_addresses
from portcullis.shadow.hublink import DIAL_OUT
from portcullis.store import shared_between_processes

log = structlog.get_logger("portcullis.workers")

# How long a stopping worker may take to end its connections before it is killed.
STOP_GRACE = 8.0
# How long a new worker may take to build its node and serve.
START_WAIT = 120.0
# The pause before a worker that died is started again: from the least, doubled for each
# death in a row of a worker that had not served `STEADY` seconds, up to the most.
RESTART_PAUSE_LEAST = 0.5
RESTART_PAUSE_MOST = 30.0
STEADY = 30.0
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2,
                   signal.SIGCHLD)

Runner = Callable[[Coroutine[Any, Any, None]], object]
OnReady = Callable[[Sequence[ListenAddress]], None]


@dataclass(frozen=True)
class WorkerPlan:
    count: int
    explicit: bool        # gateway.workers says so (else: one per core, or one)
    single_reason: str | None = None   # why this node must run one process, if it must


def planned_workers(settings: Settings, roles: Sequence[str]) -> WorkerPlan:
    """How many workers serve this node; an explicit count a node cannot run is a
    ConfigError naming gateway.workers."""
    configured = settings.gateway.workers
    single = _single_process_reason(settings, roles)
    if configured is None:
        return WorkerPlan(1 if single else os.cpu_count() or 1, False, single)
    if configured > 1 and single:
        raise ConfigError(f"{configured} workers cannot share this node: {single}. "
                          "Set workers = 1", key="gateway.workers")
    return WorkerPlan(configured, True, single)


def _single_process_reason(settings: Settings, roles: Sequence[str]) -> str | None:
    if not shared_between_processes(settings.store.ephemeral):
        return ("store.ephemeral is memory://, one process's memory, where workers would "
                "not see each other's sessions, tickets and lockouts; share a store "
                "(the default sqlite:///ephemeral.db, or redis://)")
    if ("gateway" in roles and settings.dialer.via == "relay"
            and settings.dialer.mode == "dial-out"):
        return ("dial-out relays (dialer.mode = \"dial-out\") connect to one process, "
                "whose connections the other workers could not use")
    return None


def serve_node(settings: Settings, roles: Sequence[str], on_ready: OnReady,
               run: Runner) -> None:
    """Serve a node of `roles` with the workers its settings plan, until SIGTERM/SIGINT.
    `on_ready(addresses)` is called once every worker serves; `run` runs a coroutine to
    its end on the event loop a worker uses (the CLI's uvloop runner)."""
    plan = planned_workers(settings, roles)
    if plan.count > 1:
        Supervisor(settings, roles, plan, run).serve(on_ready)
        return
    if plan.single_reason and not plan.explicit:
        log.info("this node runs one worker", reason=plan.single_reason)

    async def serve_alone() -> None:
        node = await Node.build(settings, roles)
        await node.serve(lambda served: on_ready(served.addresses))

    run(serve_alone())


async def dial_out_devices(node: Node) -> int:
    """How many of the hub's shadow devices dial out to it (their connections are held
    by the one process they reach)."""
    if node.shadow_hub is None:
        return 0
    try:
        devices = await node.durable.shadow_devices()
    except StoreError as exc:
        log.warning("shadow devices not counted", error=str(exc))
        return 0
    return sum(1 for device in devices if device.advertise == DIAL_OUT)


@dataclass
class Worker:
    index: int
    pid: int
    status: int            # the read end of the pipe the worker reports on
    started: float
    ready: bool = False
    stop_by: float | None = None    # asked to stop; killed if still running then
    report: dict[str, Any] = field(default_factory=dict)
    unread: bytes = b""


class Supervisor:
    """Starts, watches, restarts and stops the workers of one node."""

    def __init__(self, settings: Settings, roles: Sequence[str], plan: WorkerPlan,
                 run: Runner) -> None:
        self._settings = settings
        self._roles = tuple(dict.fromkeys(roles))
        self._plan = plan
        self._run = run
        self._addresses = listen_addresses(settings, self._roles)
        self._sockets: list[socket.socket] = []
        self._workers: dict[int, Worker] = {}        # by pid
        self._selector = selectors.DefaultSelector()
        self._wakeup, self._wakeup_write = socket.socketpair()
        # Workers hold the read end: when the supervisor is gone, it reads end of file.
        self._alive_read, self._alive_write = os.pipe()
        self._serving = False
        self._stopping = False
        self._failed_start: Worker | None = None
        self._restart_at: dict[int, float] = {}    # worker index -> when to start it
        self._deaths: dict[int, int] = {}          # worker index -> quick deaths in a row
        self._rolling: list[int] = []              # indexes a rolling restart has left
        self._replacing: tuple[int, int] | None = None   # (old pid, new pid)

    def serve(self, on_ready: OnReady) -> None:
        self._sockets = bind_listeners(self._addresses)
        previous = self._handle_signals()
        try:
            first = self._start(0)
            if not self._started([first]):
                return
            count = self._count_with(first.report)
            if not self._started([self._start(index) for index in range(1, count)]):
                return
            self._serving = True
            log.info("workers serving", workers=count,
                     pids=sorted(worker.pid for worker in self._workers.values()))
            on_ready(self._addresses)
            while not self._stopping or self._workers:
                self._step()
        finally:
            self._stop_all()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            signal.set_wakeup_fd(-1)
            self._close()

    # --- the supervisor's side ---

    def _handle_signals(self) -> dict[signal.Signals, Any]:
        self._wakeup.setblocking(False)
        self._wakeup_write.setblocking(False)
        self._selector.register(self._wakeup, selectors.EVENT_READ)
        previous = {sig: signal.signal(sig, _noted) for sig in HANDLED_SIGNALS}
        # Each signal writes its number here, waking the select loop.
        signal.set_wakeup_fd(self._wakeup_write.fileno())
        return previous

    def _started(self, starting: list[Worker]) -> bool:
        """Wait until every worker in `starting` serves; False if told to stop first.
        One that fails raises its error (the configuration's, usually)."""
        deadline = time.monotonic() + START_WAIT
        while not all(worker.ready for worker in starting):
            if self._stopping:
                return False
            if self._failed_start is not None:
                raise _start_error(self._failed_start)
            if time.monotonic() > deadline:
                raise PortcullisError(f"a worker did not serve within {START_WAIT:.0f} s")
            self._step()
        return True

    def _count_with(self, first_report: dict[str, Any]) -> int:
        """The number of workers, now that the first has told what its node holds."""
        devices = int(first_report.get("dial_out_devices", 0))
        if not devices or self._plan.count == 1:
            return self._plan.count
        reason = (f"{devices} shadow device(s) dial out to this hub, and their connections "
                  "are held by the one worker they reach, which consoles on another worker "
                  "could not use")
        if self._plan.explicit:
            raise ConfigError(f"{self._plan.count} workers cannot share this node: {reason}. "
                              "Set workers = 1", key="gateway.workers")
        log.info("this node runs one worker", reason=reason)
        return 1

    def _step(self, most: float = 1.0) -> None:
        """Handle what happened (signals, reports, exits) within `most` seconds."""
        now = time.monotonic()
        timeout = max(0.0, min([most, *(at - now for at in self._restart_at.values())]))
        for key, _ in self._selector.select(timeout):
            if key.fileobj is self._wakeup:
                with contextlib.suppress(BlockingIOError):
                    for signum in self._wakeup.recv(256):
                        self._signalled(signum)
            else:
                self._read_report(key.data)
        self._reap()
        now = time.monotonic()
        for index, at in list(self._restart_at.items()):
            if at <= now and not self._stopping:
                del self._restart_at[index]
                self._start(index)
        for worker in self._workers.values():
            if worker.stop_by is not None and now > worker.stop_by:
                log.warning("worker killed: it did not stop in time", worker=worker.index,
                            pid=worker.pid, grace_seconds=STOP_GRACE)
                _signal(worker.pid, signal.SIGKILL)
                worker.stop_by = None

    def _signalled(self, signum: int) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            if not self._stopping:
                log.info("stopping the workers", signal=signal.Signals(signum).name)
                self._stop_all_begin()
        elif signum == signal.SIGHUP:
            log.info("workers reload the configuration")
            for worker in self._workers.values():
                _signal(worker.pid, signal.SIGHUP)
        elif (signum == signal.SIGUSR2 and self._serving and not self._stopping
              and self._replacing is None):
            self._rolling = sorted(worker.index for worker in self._workers.values()
                                   if worker.stop_by is None)
            log.info("rolling restart of the workers", workers=len(self._rolling))
            self._roll_next()

    def _roll_next(self) -> None:
        self._replacing = None
        while self._rolling:
            index = self._rolling.pop(0)
            old = next((worker for worker in self._workers.values()
                        if worker.index == index and worker.stop_by is None), None)
            if old is None:   # it died meanwhile, and is restarted anyway
                continue
            self._replacing = (old.pid, self._start(index).pid)
            return
        log.info("rolling restart done")

    def _stop_all_begin(self) -> None:
        self._stopping = True
        self._restart_at.clear()
        self._rolling = []
        for worker in self._workers.values():
            self._stop(worker)

    def _stop(self, worker: Worker) -> None:
        if worker.stop_by is None:
            worker.stop_by = time.monotonic() + STOP_GRACE
            _signal(worker.pid, signal.SIGTERM)

    def _stop_all(self) -> None:
        """Stop every worker still running, within the grace (then kill)."""
        if not self._workers:
            return
        if not self._stopping:
            self._stop_all_begin()
        deadline = time.monotonic() + STOP_GRACE + 2
        while self._workers and time.monotonic() < deadline:
            self._step(0.2)

    def _read_report(self, worker: Worker) -> None:
        try:
            chunk = os.read(worker.status, 4096)
        except OSError:
            chunk = b""
        if not chunk:
            self._selector.unregister(worker.status)
            return
        worker.unread += chunk
        while b"\n" in worker.unread:
            line, _, worker.unread = worker.unread.partition(b"\n")
            with contextlib.suppress(ValueError):
                worker.report.update(json.loads(line))
        if worker.report.get("ready") and not worker.ready:
            worker.ready = True
            if self._serving:
                log.info("worker serving", worker=worker.index, pid=worker.pid)
            if self._replacing is not None and self._replacing[1] == worker.pid:
                old = self._workers.get(self._replacing[0])
                if old is not None:
                    self._stop(old)
                else:
                    self._roll_next()

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self._workers.pop(pid, None)
            if worker is not None:
                self._ended(worker, os.waitstatus_to_exitcode(status))

    def _ended(self, worker: Worker, code: int) -> None:
        if worker.status in self._selector.get_map():
            self._read_report(worker)   # what it said last
            with contextlib.suppress(KeyError):
                self._selector.unregister(worker.status)
        os.close(worker.status)
        exit_status = code if code >= 0 else signal.Signals(-code).name
        if worker.stop_by is not None or self._stopping:
            log.info("worker stopped", worker=worker.index, pid=worker.pid, exit=exit_status)
            if self._replacing is not None and self._replacing[0] == worker.pid:
                self._roll_next()
            return
        if not self._serving:
            self._failed_start = worker
            return
        if self._replacing is not None and self._replacing[1] == worker.pid:
            log.error("rolling restart stopped: the new worker did not start; the old one "
                      "keeps serving", worker=worker.index, pid=worker.pid, exit=exit_status,
                      error=worker.report.get("error"))
            self._rolling = []
            self._replacing = None
            return
        if self._replacing is not None and self._replacing[0] == worker.pid:
            # The rolling restart's new worker takes its place.
            log.error("worker died", worker=worker.index, pid=worker.pid, exit=exit_status)
            return
        quick = not worker.ready or time.monotonic() - worker.started < STEADY
        deaths = self._deaths.get(worker.index, 0) + 1 if quick else 0
        self._deaths[worker.index] = deaths
        pause = min(RESTART_PAUSE_LEAST * 2 ** deaths, RESTART_PAUSE_MOST)
        log.error("worker died; starting another", worker=worker.index, pid=worker.pid,
                  exit=exit_status, error=worker.report.get("error"),
                  restart_in_seconds=pause)
        self._restart_at[worker.index] = time.monotonic() + pause

    def _start(self, index: int) -> Worker:
        status_read, status_write = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            os.close(status_read)
            self._work(index, status_write)
        os.close(status_write)
        worker = Worker(index, pid, status_read, time.monotonic())
        self._workers[pid] = worker
        self._selector.register(status_read, selectors.EVENT_READ, worker)
        log.info("worker started", worker=index, pid=pid)
        return worker

    def _close(self) -> None:
        self._selector.close()
        self._wakeup.close()
        self._wakeup_write.close()
        os.close(self._alive_read)
        os.close(self._alive_write)
        for sock in self._sockets:
            sock.close()

    # --- the worker's side (after the fork) ---

    def _work(self, index: int, status: int) -> NoReturn:
        code = 1
        try:
            self._leave_supervisor()
            structlog.contextvars.bind_contextvars(worker=index)
            code = self._serve_worker(status)
        except BaseException:   # whatever happens, this process must not return
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    def _leave_supervisor(self) -> None:
        """Drop what belongs to the supervisor: its signal handling and its files."""
        signal.set_wakeup_fd(-1)
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)   # the supervisor's signal only
        # A reload asked for before the node serves must not end it (serving, it reloads).
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        self._selector.close()
        for worker in self._workers.values():
            os.close(worker.status)
        self._wakeup.close()
        self._wakeup_write.close()
        os.close(self._alive_write)

    def _serve_worker(self, status: int) -> int:
        def report(message: dict[str, Any]) -> None:
            with contextlib.suppress(OSError):   # the supervisor is gone
                os.write(status, json.dumps(message).encode() + b"\n")

        try:
            self._run(self._serve_node(report))
        except ConfigError as exc:
            report({"error": str(exc), "config": True})
            return 2
        except PortcullisError as exc:
            report({"error": str(exc)})
            return 1
        return 0

    async def _serve_node(self, report: Callable[[dict[str, Any]], None]) -> None:
        # The file as it is now: a rolling restart applies what changed.
        settings = load_settings(config_path(self._settings.base_dir))
        node = await Node.build(settings, self._roles)
        if node.node_connections is not None:
            node.node_connections.siblings = self._plan.count - 1
        bound = {address.role: address for address in self._addresses}
        changed = [LISTEN_KEYS[now.role] for now in node.addresses if now != bound[now.role]]
        if changed:
            log.warning("listening addresses changed: they apply when portcullis is "
                        "started again", keys=changed)
        devices = await dial_out_devices(node)
        if devices and node.node_connections is not None:
            # Such a node runs this one worker (the supervisor's _count_with): no
            # siblings to ask, nor to tell clients of (tunnels spread over processes).
            node.node_connections.siblings = 0
        loop = asyncio.get_running_loop()

        def supervisor_gone() -> None:
            loop.remove_reader(self._alive_read)
            log.warning("the supervisor is gone: this worker stops")
            os.kill(os.getpid(), signal.SIGTERM)

        loop.add_reader(self._alive_read, supervisor_gone)
        sockets = dict(zip((address.role for address in self._addresses), self._sockets,
                           strict=True))
        await node.serve(lambda _: report({"ready": True, "dial_out_devices": devices}),
                         sockets=[sockets[listener.role] for listener in node.listeners])


def _noted(signum: int, frame: object) -> None:
    """A signal's Python handler: its number reaches the loop through the wakeup fd."""


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _start_error(worker: Worker) -> PortcullisError:
    message = worker.report.get("error")
    if message is None:
        return PortcullisError(f"worker {worker.index} (pid {worker.pid}) exited before "
                               "serving; its output says why")
    return ConfigError(message) if worker.report.get("config") else PortcullisError(message)
