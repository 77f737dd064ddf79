"""The web proxy (issue 14): what publishing a web application through Portcullis costs,
side by side in one run, against the same upstream reached directly and behind nginx as
a plain TLS reverse proxy (Debian's nginx, the baseline).

The upstream is fast on purpose, so that the proxy is what is measured: a private nginx
serving static files (a small page of SMALL_PAGE bytes and a file of BENCH_DOWNLOAD_MIB)
over plain HTTP/1.1, and a WebSocket echo server (`bench.websocket_echo`, its own
process). Setups, each reaching the same upstream:
  direct      the client straight to the upstream (plain HTTP, no proxy)
  nginx       TLS (the deployment's gateway certificate) → nginx, one worker, keep-alive
              to the upstream (`keepalive 32`), streaming (no temporary file)
  portcullis  TLS → `portcullis up`, the web resource `bench` at bench.localhost (the
              WebSocket echo: `echo` at echo.localhost); the client carries the
              application cookie got once through the portal's sign-in hand-off
              (GET /web/NAME → one-time code → the app's host), so every request is
              checked against the session and policy and gets a signed assertion.
Clients (Debian programs written in C, so that the client is not the bottleneck):
  small page  `wrk` (one thread, BENCH_CONNECTIONS keep-alive connections, BENCH_SECONDS):
              requests/s and p99 latency (wrk's own histogram). SNI and Host name the
              resource; a wrk script resolves every name to 127.0.0.1.
              "proxy CPU µs/req": CPU (user + system, the process and its children:
              nginx's worker) the proxy spent during the run, per request answered; on a
              shared machine it varies less than requests/s.
  download    `curl` of the large file, one connection: MiB/s as curl received it.
              "proxy CPU s/GiB": the proxy's CPU during the download, per GiB carried.
Rounds: every round runs every setup (direct, nginx, portcullis) for the page, then for
the download, so that a slow moment of the shared machine lands on each alike. A ratio
is taken within a round, then summarised as "median (min–max)" over the rounds.
Memory per open WebSocket, once after the rounds: BENCH_WEBSOCKETS WebSockets opened
through the proxy to the echo server (each echoes one message, then idles); the proxy's
RSS (nginx: master + worker) with them open minus before, per WebSocket, in KiB.

Environment (defaults are the measurement's; shrink them to smoke-test):
  BENCH_ROUNDS=5  BENCH_SECONDS=5  BENCH_CONNECTIONS=16  BENCH_DOWNLOAD_MIB=100
  BENCH_WEBSOCKETS=200
e.g. BENCH_ROUNDS=1 BENCH_SECONDS=1 BENCH_DOWNLOAD_MIB=10 BENCH_WEBSOCKETS=20 \
     python -m bench webproxy
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import ssl
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psutil
import uvloop
from websockets.asyncio.client import ClientConnection, connect

from bench.deployment import Deployment, Process, api_client, free_port, sign_in, start_process
from bench.idle_memory import SETTLE
from bench.peers import require, start_nginx
from bench.report import Report, Table
from bench.rounds import Spread

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
SECONDS = int(os.environ.get("BENCH_SECONDS", "5"))
CONNECTIONS = int(os.environ.get("BENCH_CONNECTIONS", "16"))
DOWNLOAD_MIB = int(os.environ.get("BENCH_DOWNLOAD_MIB", "100"))
WEBSOCKETS = int(os.environ.get("BENCH_WEBSOCKETS", "200"))
SETUPS = ("direct", "nginx", "portcullis")
SMALL_PAGE = 1024
DOWNLOAD_TIMEOUT = 120.0  # seconds per download, whatever its size
WS_CONCURRENCY = 16
WS_TIME_LIMIT = 60.0  # seconds to open the WebSockets
WS_WARMUP = 20
APP_COOKIE = "__Host-portcullis-app"
# wrk: every name resolves to loopback (SNI and Host stay the URL's); the summary as one
# line: requests, duration µs, errors connect/read/write/status/timeout, p99 µs.
WRK_SCRIPT = """\
wrk.resolve = function(host, service)
  wrk.addrs = wrk.lookup("127.0.0.1", service)
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("WRK %d %d %d %d %d %d %d %d\\n", summary.requests,
    summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(99.0)))
end
"""


@dataclass
class Setup:
    """One way to the upstream: its URLs, what the client sends, the proxy's processes."""

    name: str
    origin: str  # scheme://host:port the client asks for (resolved to 127.0.0.1)
    echo_origin: str  # the same for the WebSocket echo server
    proxy: Process | None
    cookie: str = ""  # the page's and the download's
    echo_cookie: str = ""

    def headers(self, cookie: str) -> list[str]:
        return [f"Cookie: {cookie}"] if cookie else []


@dataclass
class PageRun:
    requests_per_s: float
    p99_ms: float
    errors: int
    cpu_us_per_request: float  # the proxy's CPU over the run, per request answered


@dataclass
class DownloadRun:
    mib_per_s: float
    cpu_s_per_gib: float


def tree_cpu_seconds(process: Process) -> float:
    """User + system CPU of the process and its live children (nginx's worker)."""
    root = psutil.Process(process.pid)
    total = 0.0
    for member in (root, *root.children(recursive=True)):
        with contextlib.suppress(psutil.NoSuchProcess):
            times = member.cpu_times()
            total += times.user + times.system
    return total


def tree_rss_kib(process: Process) -> int:
    root = psutil.Process(process.pid)
    total = 0
    for member in (root, *root.children(recursive=True)):
        with contextlib.suppress(psutil.NoSuchProcess):
            total += member.memory_info().rss
    return total // 1024


def run_wrk(setup: Setup, script: Path, seconds: int) -> PageRun:
    before = tree_cpu_seconds(setup.proxy) if setup.proxy else 0.0
    result = subprocess.run(
        [require("wrk"), "-t1", f"-c{CONNECTIONS}", f"-d{seconds}s", "--timeout", "10s",
         "-s", str(script), *(arg for header in setup.headers(setup.cookie)
                              for arg in ("-H", header)),
         f"{setup.origin}/small.html"],
        capture_output=True, text=True, timeout=seconds + 60)
    match = re.search(r"^WRK (\d+) (\d+) (\d+) (\d+) (\d+) (\d+) (\d+) (\d+)$", result.stdout,
                      re.MULTILINE)
    if result.returncode != 0 or match is None:
        raise RuntimeError(f"wrk via {setup.name} failed ({result.returncode}): "
                           f"{result.stdout[-500:]} {result.stderr[-500:]}")
    cpu = (tree_cpu_seconds(setup.proxy) - before) if setup.proxy else 0.0
    requests, duration_us, *errors, p99_us = map(int, match.groups())
    return PageRun(requests / (duration_us / 1e6), p99_us / 1000, sum(errors),
                   cpu * 1e6 / requests if requests else float("nan"))


def curl_args(setup: Setup, ca: Path) -> list[str]:
    parts = urlsplit(setup.origin)
    args = [require("curl"), "--silent", "--show-error", "--fail", "--cacert", str(ca)]
    if parts.hostname not in ("127.0.0.1", "localhost"):
        args += ["--resolve", f"{parts.hostname}:{parts.port}:127.0.0.1"]
    return [*args, *(arg for header in setup.headers(setup.cookie) for arg in ("-H", header))]


def run_download(setup: Setup, ca: Path) -> DownloadRun:
    before = tree_cpu_seconds(setup.proxy) if setup.proxy else 0.0
    result = subprocess.run(
        [*curl_args(setup, ca), "--output", "/dev/null", "--write-out",
         "%{size_download} %{speed_download}", f"{setup.origin}/download.bin"],
        capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT)
    cpu = (tree_cpu_seconds(setup.proxy) - before) if setup.proxy else 0.0
    if result.returncode != 0:
        raise RuntimeError(f"download via {setup.name} failed: {result.stderr.strip()}")
    size, speed = result.stdout.split()
    if int(size) != DOWNLOAD_MIB * 2**20:
        raise RuntimeError(f"download via {setup.name}: {size} bytes, not "
                           f"{DOWNLOAD_MIB} MiB")
    return DownloadRun(float(speed) / 2**20, cpu / (int(size) / 2**30))


def check_page(setup: Setup, ca: Path) -> None:
    """The small page itself comes back (not a sign-in page or an error)."""
    result = subprocess.run([*curl_args(setup, ca), f"{setup.origin}/small.html"],
                            capture_output=True, text=True, timeout=30)
    if result.returncode != 0 or "bench page" not in result.stdout:
        raise RuntimeError(f"{setup.name}: the small page did not come back: "
                           f"{result.returncode} {result.stderr.strip()} "
                           f"{result.stdout[:200]}")


# -- the upstream and the proxies --------------------------------------------------------

def write_site(root: Path) -> None:
    root.mkdir()
    padding = "x" * (SMALL_PAGE - 60)
    (root / "small.html").write_text(f"<!doctype html><title>bench page</title><p>{padding}\n"
                                     [:SMALL_PAGE])
    chunk = os.urandom(2**20)
    with (root / "download.bin").open("wb") as handle:
        for _ in range(DOWNLOAD_MIB):
            handle.write(chunk)


def start_upstream(stack: ExitStack, logs: Path) -> tuple[int, int]:
    """The static site (nginx) and the WebSocket echo server; returns their ports."""
    site = logs / "site"
    write_site(site)
    port = free_port()
    start_nginx(stack, logs, name="nginx upstream", ports=[port], servers=(
        f"  server {{\n    listen 127.0.0.1:{port} backlog=4096;\n    root {site};\n"
        "    keepalive_requests 1000000;\n  }\n"))
    echo = start_process(stack, [sys.executable, "-m", "bench.websocket_echo"],
                         logs / "websocket-echo.log", name="websocket echo")
    echo_port = int(echo.wait_for(r"websocket echo listening on (\d+)").group(1))
    return port, echo_port


def start_nginx_proxy(stack: ExitStack, logs: Path, deployment: Deployment, upstream: int,
                      echo: int) -> tuple[Process, int]:
    cert, key = deployment.server_cert
    port = free_port()
    process = start_nginx(stack, logs, name="nginx proxy", ports=[port], servers=(
        f"  upstream app {{\n    server 127.0.0.1:{upstream};\n    keepalive 32;\n  }}\n"
        f"  upstream echo {{\n    server 127.0.0.1:{echo};\n  }}\n"
        "  server {\n"
        f"    listen 127.0.0.1:{port} ssl backlog=4096;\n"
        f"    ssl_certificate {cert};\n    ssl_certificate_key {key};\n"
        "    keepalive_requests 1000000;\n"
        "    location / {\n      proxy_pass http://app;\n      proxy_http_version 1.1;\n"
        '      proxy_set_header Connection "";\n      proxy_set_header Host $host;\n'
        "      proxy_max_temp_file_size 0;\n    }\n"
        "    location /ws {\n      proxy_pass http://echo;\n      proxy_http_version 1.1;\n"
        "      proxy_set_header Upgrade $http_upgrade;\n"
        '      proxy_set_header Connection "upgrade";\n      proxy_read_timeout 600s;\n'
        "    }\n  }\n"))
    return process, port


def publish(deployment: Deployment, upstream: int, echo: int) -> None:
    deployment.add_config(
        '[[resources]]\nname = "bench"\ntitle = "Bench page"\nkind = "web"\n'
        f'upstream = "http://127.0.0.1:{upstream}"\nhost = "bench.localhost"\n'
        'groups = ["staff"]\n\n'
        '[[resources]]\nname = "echo"\ntitle = "WebSocket echo"\nkind = "web"\n'
        f'upstream = "http://127.0.0.1:{echo}"\nhost = "echo.localhost"\n'
        'groups = ["staff"]\n')


async def app_cookie(deployment: Deployment, api: httpx.AsyncClient, resource: str,
                     host: str) -> str:
    """The application cookie for `resource`, as a browser gets it: the portal's entry
    sends the browser to the application's host for its state cookie
    (`/.portcullis/start`), back to the portal's entry, which answers with a one-time code
    bound to that state; the code is redeemed at the application's host beside the state
    cookie, which sets the application cookie."""
    async with httpx.AsyncClient(verify=deployment.client_tls(), timeout=30) as app:
        async def on_app_host(url: str, cookie: str | None = None) -> httpx.Response:
            location = urlsplit(url)
            if location.hostname != host:
                raise RuntimeError(f"/web/{resource} sent us to {url}")
            return await app.get(
                f"https://127.0.0.1:{location.port}{location.path}?{location.query}",
                headers={"host": f"{host}:{location.port}",
                         **({"cookie": cookie} if cookie else {})},
                extensions={"sni_hostname": host})

        entry = await api.get(f"/web/{resource}", params={"next": "/"})
        if entry.status_code != 303:
            raise RuntimeError(f"/web/{resource}: {entry.status_code} {entry.text[:200]}")
        start = await on_app_host(entry.headers["location"])
        state = start.headers.get("set-cookie", "").split(";", 1)[0]
        portal = await api.get(start.headers.get("location", ""))
        if start.status_code != 303 or portal.status_code != 303:
            raise RuntimeError(f"{host}: the sign-in hand-off stopped "
                               f"({start.status_code}, {portal.status_code})")
        answer = await on_app_host(portal.headers["location"], state)
    token = answer.cookies.get(APP_COOKIE)
    if token is None:
        raise RuntimeError(f"{host}: no {APP_COOKIE} cookie ({answer.status_code})")
    return f"{APP_COOKIE}={token}"


async def portcullis_cookies(deployment: Deployment) -> tuple[str, str]:
    async with api_client(deployment, 1) as api:
        await sign_in(api)
        return (await app_cookie(deployment, api, "bench", "bench.localhost"),
                await app_cookie(deployment, api, "echo", "echo.localhost"))


# -- WebSockets --------------------------------------------------------------------------

async def open_websockets(setup: Setup, tls: ssl.SSLContext, count: int,
                          held: list[ClientConnection], errors: list[str]) -> None:
    parts = urlsplit(setup.echo_origin)
    uri = f"wss://{parts.hostname}:{parts.port}/ws"
    headers = {"cookie": setup.echo_cookie} if setup.echo_cookie else {}
    started = 0
    deadline = time.monotonic() + WS_TIME_LIMIT

    async def worker() -> None:
        nonlocal started
        while started < count and time.monotonic() < deadline and len(errors) < 20:
            started += 1
            try:
                socket = await connect(uri, ssl=tls, host="127.0.0.1", port=parts.port,
                                       additional_headers=headers, ping_interval=None,
                                       proxy=None, open_timeout=20)
                await socket.send("x")
                if await asyncio.wait_for(socket.recv(), 20) != "x":
                    raise RuntimeError("the echo answered something else")
                held.append(socket)
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")

    await asyncio.gather(*(worker() for _ in range(WS_CONCURRENCY)))


async def close_websockets(held: list[ClientConnection]) -> None:
    await asyncio.gather(*(socket.close() for socket in held), return_exceptions=True)
    held.clear()


@dataclass
class WebSocketMemory:
    before_kib: int
    during_kib: int
    opened: int
    errors: list[str]

    @property
    def per_websocket_kib(self) -> float:
        return (self.during_kib - self.before_kib) / self.opened if self.opened else 0.0


async def websocket_memory(setup: Setup, tls: ssl.SSLContext) -> WebSocketMemory:
    assert setup.proxy is not None
    held: list[ClientConnection] = []
    errors: list[str] = []
    try:
        # Warm-up: lazy imports, caches and the first connections' buffers are paid.
        await open_websockets(setup, tls, WS_WARMUP, held, errors)
        await close_websockets(held)
        await asyncio.sleep(SETTLE)
        before = tree_rss_kib(setup.proxy)
        await open_websockets(setup, tls, WEBSOCKETS, held, errors)
        await asyncio.sleep(SETTLE)
        during = tree_rss_kib(setup.proxy)
        return WebSocketMemory(before, during, len(held), errors)
    finally:
        await close_websockets(held)


# -- the run -----------------------------------------------------------------------------

def run() -> Report:
    pages: list[dict[str, PageRun]] = []
    downloads: list[dict[str, DownloadRun]] = []
    memory: dict[str, WebSocketMemory] = {}
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="bench-webproxy-") as tmp:
        logs = Path(tmp)
        upstream, echo = start_upstream(stack, logs)
        deployment = Deployment.create(logs)
        publish(deployment, upstream, echo)
        gateway = deployment.start(stack, logs)
        nginx, nginx_port = start_nginx_proxy(stack, logs, deployment, upstream, echo)
        cookie, echo_cookie = uvloop.run(portcullis_cookies(deployment))
        setups = {
            "direct": Setup("direct", f"http://127.0.0.1:{upstream}",
                            f"http://127.0.0.1:{echo}", None),
            "nginx": Setup("nginx", f"https://localhost:{nginx_port}",
                           f"https://localhost:{nginx_port}", nginx),
            "portcullis": Setup("portcullis", f"https://bench.localhost:{deployment.port}",
                                f"https://echo.localhost:{deployment.port}", gateway,
                                cookie, echo_cookie)}
        script = logs / "wrk.lua"
        script.write_text(WRK_SCRIPT)
        for setup in setups.values():
            check_page(setup, deployment.ca)
            run_wrk(setup, script, 1)   # warm-up: connections, caches, lazy imports
            run_download(setup, deployment.ca)
        load_before = os.getloadavg()[0]
        for number in range(ROUNDS):
            pages.append({name: run_wrk(setup, script, SECONDS)
                          for name, setup in setups.items()})
            downloads.append({name: run_download(setup, deployment.ca)
                              for name, setup in setups.items()})
            print(f"round {number + 1}/{ROUNDS}: " + ", ".join(
                f"{name} {pages[-1][name].requests_per_s:.0f} req/s "
                f"p99 {pages[-1][name].p99_ms:.1f} ms "
                f"{downloads[-1][name].mib_per_s:.0f} MiB/s" for name in setups), flush=True)
        tls = deployment.client_tls()
        for name in ("nginx", "portcullis"):
            memory[name] = uvloop.run(websocket_memory(setups[name], tls))
            print(f"  {name}: {memory[name].opened} WebSockets, "
                  f"{memory[name].per_websocket_kib:.1f} KiB each", flush=True)
        load_after = os.getloadavg()[0]
    return report(pages, downloads, memory, (load_before, load_after))


def report(pages: list[dict[str, PageRun]], downloads: list[dict[str, DownloadRun]],
           memory: dict[str, WebSocketMemory], load: tuple[float, float]) -> Report:
    """`load`: the 1-minute load average when the rounds started and when they ended."""
    def spread(rounds: list[dict[str, Any]], name: str, figure: str) -> Spread:
        return Spread.of([getattr(round_[name], figure) for round_ in rounds])

    def ratio(rounds: list[dict[str, Any]], name: str, base: str, figure: str) -> Spread:
        return Spread.of([getattr(round_[name], figure) / getattr(round_[base], figure)
                          for round_ in rounds])

    data: dict[str, Any] = {"rounds": len(pages), "seconds": SECONDS, "load_average": load,
                            "connections": CONNECTIONS, "download_mib": DOWNLOAD_MIB,
                            "websockets": WEBSOCKETS}
    page_rows, download_rows = [], []
    for name in SETUPS:
        rps, p99 = spread(pages, name, "requests_per_s"), spread(pages, name, "p99_ms")
        x_direct = ratio(pages, name, "direct", "requests_per_s")
        x_nginx = ratio(pages, name, "nginx", "requests_per_s")
        errors = sum(round_[name].errors for round_ in pages)
        page_cpu = spread(pages, name, "cpu_us_per_request")
        page_rows.append([name, str(rps), str(p99), str(x_direct), str(x_nginx),
                          "-" if name == "direct" else str(page_cpu), errors])
        speed = spread(downloads, name, "mib_per_s")
        cpu = spread(downloads, name, "cpu_s_per_gib")
        download_rows.append([name, str(speed), str(ratio(downloads, name, "direct",
                                                          "mib_per_s")),
                              str(ratio(downloads, name, "nginx", "mib_per_s")),
                              "-" if name == "direct" else str(cpu)])
        data[name] = {"requests_per_s": rps.as_json(), "p99_ms": p99.as_json(),
                      "page_x_direct": x_direct.as_json(), "page_x_nginx": x_nginx.as_json(),
                      "page_errors": errors, "cpu_us_per_request": page_cpu.as_json(),
                      "download_mib_per_s": speed.as_json(),
                      "cpu_s_per_gib": cpu.as_json()}
    memory_rows = []
    for name, reading in memory.items():
        memory_rows.append([name, reading.opened, reading.before_kib, reading.during_kib,
                            reading.per_websocket_kib])
        data[name]["websocket_kib"] = reading.per_websocket_kib
        data[name]["websocket_errors"] = reading.errors[:5]
    short = [f"{name}: {reading.opened} of {WEBSOCKETS} WebSockets opened; first error: "
             f"{reading.errors[0]}" for name, reading in memory.items()
             if reading.opened < WEBSOCKETS and reading.errors]
    spread_note = f"median over {len(pages)} interleaved rounds (min–max)"
    verdicts = [
        f"small page: portcullis/nginx {ratio(pages, 'portcullis', 'nginx', 'requests_per_s')}"
        f" req/s; p99 {spread(pages, 'portcullis', 'p99_ms')} ms vs nginx "
        f"{spread(pages, 'nginx', 'p99_ms')} ms",
        f"download: portcullis/nginx {ratio(downloads, 'portcullis', 'nginx', 'mib_per_s')}"
        f" MiB/s; CPU {spread(downloads, 'portcullis', 'cpu_s_per_gib')} s/GiB vs nginx "
        f"{spread(downloads, 'nginx', 'cpu_s_per_gib')} s/GiB"]
    if "portcullis" in memory and "nginx" in memory:
        verdicts.append(f"memory per open WebSocket: portcullis "
                        f"{memory['portcullis'].per_websocket_kib:.1f} KiB, nginx "
                        f"{memory['nginx'].per_websocket_kib:.1f} KiB")
    return Report(
        name="webproxy",
        tables=[
            Table(f"Small page ({SMALL_PAGE} B), wrk -t1 -c{CONNECTIONS} -d{SECONDS}s; "
                  f"{spread_note}",
                  ["setup", "req/s", "p99 ms", "x direct", "x nginx", "proxy CPU µs/req",
                   "errors"], page_rows),
            Table(f"Download of {DOWNLOAD_MIB} MiB, curl, one connection; {spread_note}",
                  ["setup", "MiB/s", "x direct", "x nginx", "proxy CPU s/GiB"],
                  download_rows),
            Table(f"Memory per open WebSocket through the proxy ({WEBSOCKETS} opened, each "
                  "echoed once, then idle)",
                  ["proxy", "open", "RSS before KiB", "RSS open KiB", "KiB each"],
                  memory_rows)],
        verdicts=verdicts,
        notes=["all processes share the machine's cores: wrk/curl, the proxy, the upstream "
               f"(and whatever else runs: load average {load[0]:.1f} at the start, "
               f"{load[1]:.1f} at the end)",
               "x = ratio within the same round; proxy CPU = the proxy process and its "
               "children (nginx: master + its one worker)", *short],
        data=data)
