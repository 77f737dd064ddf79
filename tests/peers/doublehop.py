"""A Portcullis deployment spread over the hosts of a double-hop DMZ (peers/topology.py):
the STA and the portal in the intranet, the edge gateway in dmz1 (every inward
connection through its Dialer: `[dialer] via = "relay"`), the relay in dmz2, and real
servers in the intranet: http.server, a TCP echo server and dnsmasq.

One `portcullis init` directory holds the CA, the database and the token key. Each host
runs from a directory of its own (DIR/hosts/HOST/): the certificates of its roles only,
issued with the addresses they are reached at, and a copy of portcullis.toml that says
where its roles listen and how the edge dials, keeps its own audit file, and names the
shared files by absolute path.

The hosts share one file system, and the edge and the portal share the session store
(the test Redis): each reaches it through a UNIX socket that socat bridges to
127.0.0.1:6379 inside its namespace — a file, not a network path, so the routes stay
exactly as the topology says.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from conftest import PORTCULLIS, Deployment, Process, require_program, run_cli
from peers.servers import SCRIPT as SERVERS_SCRIPT
from peers.servers import DnsServer
from peers.stores import REDIS_URL, answering_redis_url
from peers.topology import (
    EDGE,
    EDGE_DMZ,
    INTRANET_NETWORK,
    RELAY,
    RELAY_PORT,
    SERVER,
    DoubleHopHosts,
    Host,
)

GATEWAY_PORT = 8443    # in dmz1, on both its links
PORTAL_PORT = 8444     # in the intranet
STA_PORT = 8445        # in the intranet
RELAY_HEALTH_PORT = 8447   # in dmz2, on its loopback
WEB_PORT = 8080
ECHO_PORT = 7007
DNS_PORT = 53
STORE_PORT = 6379      # the session store's bridge, on the loopback of dmz1 and intranet
USER = "alice"
PASSWORD = "correct horse battery staple"
TESTS = Path(__file__).parent.parent

# The roles each host runs, and the addresses each role is reached at: its certificate
# names them.
HOST_ROLES = {"edge": {"gateway": [EDGE, EDGE_DMZ]}, "relay": {"relay": [RELAY]},
              "intranet": {"sta": [SERVER], "portal": [SERVER]}}

@dataclass
class DoubleHop:
    hosts: DoubleHopHosts
    deployment: Deployment          # the init directory: CA, database, users
    directories: dict[str, Path]    # "edge", "relay", "intranet": that host's config
    roles: dict[str, Process]       # "sta", "portal", "edge", "relay"

    @property
    def url(self) -> str:
        return f"https://{EDGE}:{GATEWAY_PORT}"

    def audit(self, host: str) -> list[dict[str, object]]:
        path = self.directories[host] / "audit.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line]

    def wait_relayed(self, *destinations: str, since: int = 0, timeout: float = 30) -> None:
        """Until the relay's audit trail has, after its first `since` lines, a
        "relay.stream" line for each destination ("HOST:PORT/PROTOCOL") that the relay
        connected to. A relayed connection is audited when it ends (an idle keep-alive
        connection: after a few seconds)."""
        deadline = time.monotonic() + timeout
        while True:
            relayed = {str(event["destination"]) for event in self.audit("relay")[since:]
                       if event["event"] == "relay.stream"}
            if relayed.issuperset(destinations):
                return
            assert time.monotonic() < deadline, \
                f"the relay audited {sorted(relayed)}, not {sorted(destinations)}"
            time.sleep(0.2)

    def portcullis(self, *args: str, home: Path, input: str | None = None,
                   timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """`portcullis ARGS` in the client's namespace, as the user whose state is in home."""
        return self.hosts.client.run(PORTCULLIS, *args, input=input,
                                     env={"PORTCULLIS_HOME": str(home)}, timeout=timeout)

    def start_client(self, *args: str, home: Path, name: str) -> Process:
        return self.hosts.client.start(PORTCULLIS, *args, name=name,
                                       env={"PORTCULLIS_HOME": str(home)})

    def login(self, home: Path) -> subprocess.CompletedProcess[str]:
        return self.portcullis("login", self.url, "--user", USER, "--password-stdin",
                               "--ca", str(self.deployment.ca), input=PASSWORD + "\n",
                               home=home)

    def portal_status(self) -> str:
        """The HTTP status of the portal's health, asked of the edge from the client."""
        return self.hosts.client.run(
            "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10",
            "--cacert", str(self.deployment.ca), f"{self.url}/api/v1/health",
            timeout=20).stdout

    def wait_for_the_portal(self, timeout: float = 30) -> None:
        """Until the edge answers for the portal: the whole chain is up (in dial-out
        mode, once the relay has connected to the edge)."""
        deadline = time.monotonic() + timeout
        while (status := self.portal_status()) != "200":
            for role, process in self.roles.items():
                assert process.popen.poll() is None, f"{role} exited:\n{process.output()}"
            assert time.monotonic() < deadline, f"the portal answers {status} at the edge"
            time.sleep(0.2)


def _issue_certificates(deployment: Deployment, host: str, pki: Path) -> None:
    """The certificates of the roles `host` runs, and only those, in its own pki/, as
    an administrator issues them (`portcullis cert issue --role`)."""
    for role, addresses in HOST_ROLES[host].items():
        ips = [option for address in addresses for option in ("--ip", address)]
        issued = run_cli("cert", "issue", "--role", role, *ips, "--out", str(pki),
                         "--dir", str(deployment.directory))
        assert issued.returncode == 0, issued.stderr


def _host_config(deployment: Deployment, host: str, settings: dict[str, dict[str, str]],
                 tables: str = "") -> Path:
    """DIR/hosts/HOST/: its roles' certificates, and a portcullis.toml that is the
    deployment's with the shared files named by absolute path, `settings` ({section:
    {key: TOML literal}}) set and `tables` appended."""
    directory = deployment.directory / "hosts" / host
    directory.mkdir(parents=True)
    _issue_certificates(deployment, host, directory / "pki")
    base = deployment.directory.resolve()
    text = deployment.config.read_text()
    (directory / "portcullis.toml").write_text(
        f'secrets_dir = "{base / "secrets"}"\n' + text + tables)
    copy = Deployment(directory, deployment.port, deployment.admin_password)
    shared = {"tls": {"ca_cert": f'"{base / "pki" / "ca.crt"}"', "directory": '"pki"'},
              "store": {"durable": f'"sqlite:///{base / "portcullis.db"}"'}}
    for section, values in [*shared.items(), *settings.items()]:
        for key, value in values.items():
            copy.set(section, key, value)
    return directory


def _configure(deployment: Deployment, mode: str, via: str, store: str) -> dict[str, Path]:
    deployment.set("gateway", "public_url", f'"https://{EDGE}:{GATEWAY_PORT}"')
    deployment.set("sta.authorities", "STA01", f'"https://{SERVER}:{STA_PORT}"')
    deployment.set("vpn", "networks", f'["{INTRANET_NETWORK}"]')
    deployment.add_resource("web", f"{SERVER}:{WEB_PORT}", ["staff"], "Intranet web")
    deployment.add_resource("echo", f"{SERVER}:{ECHO_PORT}", ["staff"], "Echo")
    with deployment.config.open("a") as handle:
        handle.write(f'\n[[policies]]\nname = "staff-intranet"\naction = "allow"\n'
                     f'groups = ["staff"]\nnetworks = ["{INTRANET_NETWORK}"]\n'
                     f'protocols = ["tcp", "udp", "icmp"]\n')
    deployment.add_user(USER, PASSWORD, ["staff"])
    dialer = ""
    if via == "relay":
        dialer = f'\n[dialer]\nvia = "relay"\nmode = "{mode}"\n'
        if mode == "classic":
            dialer += f'relay = "{RELAY}:{RELAY_PORT}"\n'
    edges = f'edges = ["https://{EDGE_DMZ}:{GATEWAY_PORT}"]\n' if mode == "dial-out" else ""
    return {
        "edge": _host_config(deployment, "edge", {
            "gateway": {"listen": f'"0.0.0.0:{GATEWAY_PORT}"',
                        "portal_url": f'"https://{SERVER}:{PORTAL_PORT}"'},
            "store": {"ephemeral": store}}, dialer),
        "intranet": _host_config(deployment, "intranet", {
            "portal": {"listen": f'"{SERVER}:{PORTAL_PORT}"'},
            "sta": {"listen": f'"{SERVER}:{STA_PORT}"'},
            "store": {"ephemeral": store}}),
        "relay": _host_config(deployment, "relay", {}, (
            f'\n[relay]\nlisten = "{RELAY}:{RELAY_PORT}"\n'
            f'allow = ["{INTRANET_NETWORK}:1-65535"]\n'
            f'health_listen = "127.0.0.1:{RELAY_HEALTH_PORT}"\n{edges}')),
    }


def _start_servers(intranet: Host, www: Path) -> None:
    www.mkdir()
    (www / "index.html").write_text("<h1>intranet home</h1>\n" + "intact " * 10_000 + "\n")
    web = intranet.start(sys.executable, "-m", "http.server", str(WEB_PORT), "--bind", SERVER,
                         "--directory", str(www), name="http")
    echo = intranet.start(sys.executable, str(SERVERS_SCRIPT), SERVER, str(ECHO_PORT),
                          name="echo")
    dns = intranet.start(require_program("dnsmasq"), *DnsServer.arguments(SERVER, DNS_PORT),
                         name="dnsmasq")
    intranet.wait_listening(WEB_PORT, web)
    intranet.wait_listening(ECHO_PORT, echo)
    intranet.wait_listening(DNS_PORT, dns, udp=True)


@contextlib.contextmanager
def _session_store(hosts: tuple[Host, ...], logs: Path) -> Iterator[str]:
    """The test Redis on 127.0.0.1:STORE_PORT inside each of `hosts`, through a UNIX
    socket (socat on both sides); its URL there, with a key prefix of this run."""
    socat = require_program("socat")
    asyncio.run(answering_redis_url())
    target = urlsplit(REDIS_URL)
    # A short directory: a UNIX socket's path has at most 107 bytes.
    directory = Path(tempfile.mkdtemp(prefix="pc-store-"))
    socket_path = directory / "redis.sock"
    bridge = Process([f"UNIX-LISTEN:{socket_path},fork,mode=600",
                      f"TCP:{target.hostname}:{target.port or 6379}"],
                     logs / "store-bridge.log", program=socat, group=True)
    try:
        deadline = time.monotonic() + 10
        while not socket_path.exists():
            assert time.monotonic() < deadline and bridge.popen.poll() is None, bridge.output()
            time.sleep(0.02)
        for host in hosts:
            inside = host.start(socat, f"TCP-LISTEN:{STORE_PORT},bind=127.0.0.1,fork,reuseaddr",
                                f"UNIX-CONNECT:{socket_path}", name="store-bridge")
            host.wait_listening(STORE_PORT, inside)
        yield (f"redis://127.0.0.1:{STORE_PORT}{target.path or '/0'}"
               f"?prefix=pc-doublehop-{directory.name}:")
    finally:
        bridge.stop()
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def deploy(hosts: DoubleHopHosts, directory: Path, *, via: str = "relay"
           ) -> Iterator[DoubleHop]:
    """The deployment, its servers and its roles running on `hosts`, each role once it
    listens; everything stopped afterwards. via="direct": no relay, the edge dials
    directly (which from dmz1 reaches nothing inside)."""
    require_program("curl")   # asks the edge for the portal's health
    made = run_cli("init", "--dir", str(directory / "deployment"), "--hostname", EDGE,
                   "--port", str(GATEWAY_PORT))
    assert made.returncode == 0, made.stderr
    password = re.search(r"password: (\S+)", made.stdout)
    assert password, made.stdout
    deployment = Deployment(directory / "deployment", GATEWAY_PORT, password.group(1))
    with _session_store((hosts.dmz1, hosts.intranet), directory) as store:
        try:
            directories = _configure(deployment, hosts.mode, via, f'"{store}"')
            _start_servers(hosts.intranet, directory / "www")

            def start(host: Host, role: str, serve: str, config: str) -> Process:
                process = host.start(PORTCULLIS, "serve", serve, "--dir",
                                     str(directories[config]), name=role)
                roles[role] = process
                return process

            roles: dict[str, Process] = {}
            start(hosts.intranet, "sta", "sta", "intranet").wait_for(r"sta listening on")
            start(hosts.intranet, "portal", "portal", "intranet").wait_for(
                r"portal listening on")
            start(hosts.dmz1, "edge", "gateway", "edge").wait_for(r"gateway listening on")
            if via == "relay":
                hosts.dmz2.wait_listening(RELAY_HEALTH_PORT,
                                          start(hosts.dmz2, "relay", "relay", "relay"))
            yield DoubleHop(hosts, deployment, directories, roles)
        finally:
            for host in hosts.hosts:
                host.stop_processes()
