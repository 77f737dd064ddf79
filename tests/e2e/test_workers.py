"""A node of two worker processes (`[gateway] workers = 2`) behind one port, on the
default embedded store (one SQLite file): both serve the port, share sessions, redeem a
ticket once, end each other's connections, reload on SIGHUP, are replaced when killed,
and stop on SIGTERM.

Which worker carries a connection is read from /proc (psutil), as an administrator would
see it: the worker holding the accepted socket whose peer is the client's port."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from conftest import Deployment, Process, init_deployment, run_cli
from e2e.test_revocation import Cluster, Traffic, launch_file, sign_in
from peers.servers import EchoServer
from portcullis.proto.launchfile import parse_launch_file

PASSWORD = "correct horse battery staple"
BOUND = 1.0


@dataclass
class Node:
    deployment: Deployment
    process: Process
    tls: ssl.SSLContext

    def workers(self) -> list[int]:
        return sorted(child.pid for child in psutil.Process(self.process.popen.pid).children())

    def holder(self, client_port: int) -> int | None:
        """The worker that accepted the connection from 127.0.0.1:`client_port`."""
        for pid in self.workers():
            with_peer = [c for c in psutil.Process(pid).net_connections(kind="tcp")
                         if c.laddr and c.laddr.port == self.deployment.port
                         and c.raddr and c.raddr.port == client_port]
            if with_peer:
                return pid
        return None

    def connection_on(self, worker: int) -> http.client.HTTPSConnection:
        """A keep-alive HTTPS connection that `worker` accepted."""
        for _ in range(200):
            connection = http.client.HTTPSConnection("127.0.0.1", self.deployment.port,
                                                     context=self.tls, timeout=30)
            connection.connect()
            if self.holder(connection.sock.getsockname()[1]) == worker:
                return connection
            connection.close()
        raise AssertionError(f"no connection landed on worker {worker} in 200 tries")

    def as_cluster(self) -> Cluster:
        """This node in the shape test_revocation's helpers take (one node, both roles)."""
        url = self.deployment.url
        return Cluster(self.deployment, url, url, self.tls, "")

    def sign_in(self, user: str) -> str:
        return sign_in(self.as_cluster(), self.deployment.url, user)

    def launch_file(self, token: str, path: Path) -> Path:
        return launch_file(self.as_cluster(), token, path)


def get(connection: http.client.HTTPSConnection, path: str,
        token: str | None = None, method: str = "GET") -> tuple[int, bytes]:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    connection.request(method, path, headers=headers)
    response = connection.getresponse()
    return response.status, response.read()


def two_worker_deployment(directory: Path, echo: EchoServer) -> Deployment:
    # The workers share the default store: the embedded file beside the configuration.
    deployment = init_deployment(directory)
    deployment.set("gateway", "workers", "2")
    deployment.add_resource("echo", echo.address, ["staff"], "Echo")
    deployment.add_user("alice", PASSWORD, ["staff"])
    deployment.add_user("root", PASSWORD, ["admins"])
    return deployment


def start_node(deployment: Deployment, log: Path) -> Node:
    process = Process(["up", "--dir", str(deployment.directory)], log)
    process.wait_for(r"Portal: https://", timeout=90)
    node = Node(deployment, process, ssl.create_default_context(cafile=str(deployment.ca)))
    assert len(node.workers()) == 2, process.output()
    return node


@pytest.fixture(scope="module")
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, echo: EchoServer) -> Iterator[Node]:
    """One two-worker node for the tests that leave it serving as it was."""
    directory = tmp_path_factory.mktemp("workers")
    started = start_node(two_worker_deployment(directory / "deployment", echo),
                         directory / "up.log")
    yield started
    started.process.stop()


@pytest.fixture
def own_node(tmp_path: Path, echo: EchoServer) -> Iterator[Node]:
    """A two-worker node for a test that kills or stops it."""
    started = start_node(two_worker_deployment(tmp_path / "deployment", echo),
                         tmp_path / "up.log")
    yield started
    started.process.stop()


def connections_on_both(node: Node) -> list[tuple[http.client.HTTPSConnection, int]]:
    """Keep-alive connections until each worker holds at least one (bounded)."""
    held: list[tuple[http.client.HTTPSConnection, int]] = []
    for _ in range(100):
        connection = http.client.HTTPSConnection("127.0.0.1", node.deployment.port,
                                                 context=node.tls, timeout=30)
        connection.connect()
        worker = node.holder(connection.sock.getsockname()[1])
        assert worker is not None
        held.append((connection, worker))
        if len(held) >= 8 and {w for _, w in held} == set(node.workers()):
            return held
    raise AssertionError(f"100 connections all went to {set(w for _, w in held)}")


def test_two_workers_serve_one_port_and_take_its_connections_between_them(node: Node) -> None:
    workers = node.workers()
    assert len(workers) == 2 and node.process.popen.pid not in workers
    # Only the supervisor bound the port: the workers inherited its one socket.
    listening = [c for c in psutil.Process(node.process.popen.pid).net_connections("tcp")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == node.deployment.port]
    assert len(listening) == 1
    held = connections_on_both(node)
    for connection, _worker in held:
        status, _ = get(connection, "/api/v1/health")
        assert status in (200, 404)
        connection.close()
    output = node.process.output()
    assert "workers serving" in output and "worker=0" in output and "worker=1" in output
    # Each worker built the listeners the supervisor bound for it.
    assert "listening addresses changed" not in output


def test_a_session_made_on_one_worker_is_accepted_by_both(node: Node) -> None:
    token = node.sign_in("alice")
    held = connections_on_both(node)
    answered = {worker: get(connection, "/api/v1/resources", token)[0]
                for connection, worker in held}
    for connection, _ in held:
        connection.close()
    assert answered == {worker: 200 for worker in node.workers()}


def test_a_ticket_redeems_once_across_workers_under_100_concurrent_attempts(
        node: Node, tmp_path: Path) -> None:
    token = node.sign_in("alice")
    ticket = parse_launch_file(node.launch_file(token, tmp_path / "echo.portcullis")
                               .read_bytes()).ticket
    # The gateway's own certificate: the STA answers only deployment roles.
    tls = ssl.create_default_context(cafile=str(node.deployment.ca))
    tls_dir = node.deployment.directory / "pki"
    tls.load_cert_chain(tls_dir / "gateway.crt", tls_dir / "gateway.key")
    sta = f"https://127.0.0.1:{node.deployment.port + 2}/sta/v1/redemptions"

    async def attempts() -> list[int]:
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=0)
        async with httpx.AsyncClient(verify=tls, timeout=60, limits=limits) as client:
            answers = await asyncio.gather(*(
                client.post(sta, json={"ticket": ticket, "client_address": None})
                for _ in range(100)))
        return [answer.status_code for answer in answers]

    statuses = asyncio.run(attempts())
    assert statuses.count(200) == 1, statuses
    assert all(status in (200, 403) for status in statuses), statuses


@dataclass
class HeldLaunch:
    process: Process
    flow: Traffic
    token: str     # the session it was launched from
    holder: int    # the worker carrying it
    other: int


@pytest.fixture
def held_launch(node: Node, tmp_path: Path) -> Iterator[HeldLaunch]:
    """Alice's launch, carrying traffic, and which worker holds it."""
    token = node.sign_in("alice")
    launch = Process(["launch", "--file", str(node.launch_file(token, tmp_path / "e.portcullis")),
                      "--ca", str(node.deployment.ca), "--listen", "127.0.0.1:0"],
                     tmp_path / "launch.log", {"PORTCULLIS_HOME": str(tmp_path / "alice")})
    try:
        listening = launch.wait_for(r"listening on ([\d.]+):(\d+)")
        flow = Traffic(listening.group(1), int(listening.group(2)))
        flow.start()
        assert flow.flowing.wait(10), launch.output()
        carriers = [c for c in psutil.Process(launch.popen.pid).net_connections("tcp")
                    if c.raddr and c.raddr.port == node.deployment.port]
        assert len(carriers) == 1
        holder = node.holder(carriers[0].laddr.port)
        assert holder is not None
        yield HeldLaunch(launch, flow, token, holder,
                         next(worker for worker in node.workers() if worker != holder))
    finally:
        launch.stop()


def ended_within_the_bound(launch: HeldLaunch, ended_at: float, why: str) -> None:
    launch.flow.join(15)
    assert launch.flow.closed_at is not None and launch.flow.closed_at - ended_at < BOUND
    assert launch.process.popen.wait(15) == 1
    assert why in launch.process.output()


def test_an_admin_ends_a_launch_that_the_other_worker_carries_within_a_second(
        node: Node, held_launch: HeldLaunch) -> None:
    admin = node.sign_in("root")
    asking = node.connection_on(held_launch.other)
    status, body = get(asking, "/api/v1/admin/sessions", admin)
    assert status == 200
    listed = [s for s in json.loads(body)["sessions"] if s["user"] == "alice"]
    # The other worker lists the launch it does not carry, and says who does.
    assert [(s["kind"], s["worker"]) for s in listed] == [("launch", str(held_launch.holder))]
    ended_at = time.monotonic()
    status, body = get(asking, f"/api/v1/admin/sessions/{listed[0]['id']}"
                       "?scope=connections", admin, method="DELETE")
    assert status == 200 and json.loads(body)["ended"] == [listed[0]["id"]], body
    asking.close()
    ended_within_the_bound(held_launch, ended_at, "ended by an administrator")


def test_signing_out_on_one_worker_ends_the_launch_the_other_carries_within_a_second(
        node: Node, held_launch: HeldLaunch) -> None:
    asking = node.connection_on(held_launch.other)
    ended_at = time.monotonic()
    status, _ = get(asking, "/api/v1/logout", held_launch.token, method="POST")
    assert status == 200
    asking.close()
    ended_within_the_bound(held_launch, ended_at, "signed out")


def test_sighup_reloads_every_worker(node: Node) -> None:
    before = node.process.output().count("configuration reloaded")
    with node.deployment.config.open("a") as handle:
        handle.write('\n[[policies]]\nname = "staff-web"\naction = "allow"\n'
                     'groups = ["staff"]\nnetworks = ["127.0.0.0/8"]\nports = ["80"]\n')
    os.kill(node.process.popen.pid, signal.SIGHUP)
    node.process.wait_for(rf"(?s)(configuration reloaded.*){{{before + 2}}}", timeout=20)
    reloaded = [line for line in node.process.output().splitlines()
                if "configuration reloaded" in line][before:]
    assert sorted(line.split("worker=")[1].split()[0] for line in reloaded) == ["0", "1"]
    assert all("policies=1" in line for line in reloaded), reloaded


def test_a_killed_worker_is_replaced_and_the_node_keeps_serving(own_node: Node) -> None:
    victim = own_node.workers()[0]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        workers = own_node.workers()
        if len(workers) == 2 and victim not in workers:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(own_node.process.output())
    own_node.process.wait_for(r"worker serving", timeout=60)
    assert "worker died; starting another" in own_node.process.output()
    token = own_node.sign_in("alice")
    held = connections_on_both(own_node)
    assert all(get(connection, "/api/v1/resources", token)[0] == 200 for connection, _ in held)
    for connection, _ in held:
        connection.close()


def test_sigusr2_replaces_the_workers_one_by_one(own_node: Node) -> None:
    first = own_node.workers()
    os.kill(own_node.process.popen.pid, signal.SIGUSR2)
    own_node.process.wait_for("rolling restart done", timeout=90)
    now = own_node.workers()
    assert len(now) == 2 and not set(now) & set(first)
    token = own_node.sign_in("alice")
    with httpx.Client(verify=own_node.tls, timeout=30) as client:
        assert client.get(f"{own_node.deployment.url}/api/v1/resources",
                          headers={"authorization": f"Bearer {token}"}).status_code == 200


def test_sigterm_stops_the_supervisor_and_every_worker_within_the_bound(
        own_node: Node) -> None:
    workers = [psutil.Process(pid) for pid in own_node.workers()]
    started = time.monotonic()
    own_node.process.popen.send_signal(signal.SIGTERM)
    assert own_node.process.popen.wait(15) == 0
    _, alive = psutil.wait_procs(workers, timeout=1)
    assert not alive, own_node.process.output()
    assert time.monotonic() - started < 15
    assert own_node.process.output().count("worker stopped") == 2


def test_several_workers_on_a_memory_store_are_refused_naming_the_key(
        deployment: Deployment) -> None:
    deployment.set("store", "ephemeral", '"memory://"')
    deployment.set("gateway", "workers", "2")
    result = run_cli("up", "--dir", str(deployment.directory), timeout=60)
    assert result.returncode == 2
    assert "gateway.workers: 2 workers cannot share this node" in result.stderr
    assert "memory://" in result.stderr and "Traceback" not in result.stderr


def test_a_taken_port_is_one_error_naming_its_key_with_workers(
        tmp_path: Path, echo: EchoServer) -> None:
    deployment = two_worker_deployment(tmp_path / "deployment", echo)
    with socket.create_server(("127.0.0.1", deployment.port + 2)):
        result = run_cli("up", "--dir", str(deployment.directory), timeout=60)
    assert result.returncode == 2
    assert result.stderr.count("sta.listen: cannot listen on") == 1, result.stderr


def test_a_worker_that_cannot_start_stops_the_node_with_its_error(
        tmp_path: Path, echo: EchoServer) -> None:
    deployment = two_worker_deployment(tmp_path / "deployment", echo)
    deployment.set("sta", "id", '"STA09"')   # an STA that sta.authorities does not list
    result = run_cli("up", "--dir", str(deployment.directory), timeout=90)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("sta.id: this node runs the STA STA09") == 1, result.stderr
    assert "Traceback" not in result.stderr
