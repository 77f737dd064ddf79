"""`portcullis connect`'s local proxies end to end: the per-run secret (curl as the
proxy client, through a real tunnel to a real server), and one printed line per stream
the gateway refuses, with the SOCKS5 or HTTP client told the matching answer."""

from __future__ import annotations

import json
import re
import socket
import stat
import time
from pathlib import Path

from test_tunnel import audit, connect, curl, login, vpn  # noqa: F401  (vpn: a fixture)

from conftest import Deployment

# curl's exit status when a SOCKS5 proxy refuses it (authentication or the connection).
CURL_SOCKS_REFUSED = 97
# curl's exit status when the HTTP proxy answers CONNECT with an error.
CURL_PROXY_ERROR = 56


def proxy_urls(output: str) -> dict[str, str]:
    found = re.findall(r"(SOCKS5|HTTP CONNECT) proxy: listening on \S+ \((\S+)\)", output)
    return {"socks" if kind == "SOCKS5" else "http": url for kind, url in found}


def test_the_socks5_and_http_proxies_admit_only_the_printed_secret(
        vpn: Deployment, http_server, tmp_path: Path, start_process) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    home = tmp_path / "alice"
    login(vpn, "alice", home)
    tunnel = connect(vpn, start_process, home, proxy_auth=True)
    urls = proxy_urls(tunnel.process.output())
    secret = re.match(r"socks5h://portcullis:([\w-]+)@", urls["socks"]).group(1)  # type: ignore[union-attr]
    assert urls == {"socks": f"socks5h://portcullis:{secret}@{tunnel.socks}",
                    "http": f"http://portcullis:{secret}@{tunnel.http}"}
    target = f"http://localhost:{http_server.port}/"

    def streams() -> int:
        return len([e for e in audit(vpn) if e["event"] == "tunnel.stream"])

    # The printed URLs, pasted as they are.
    via_socks = curl("-x", urls["socks"], target)
    via_http = curl("--proxytunnel", "-x", urls["http"], target)
    forwarded = curl("-x", urls["http"], target)   # a plain GET in absolute form
    assert "intranet home" in via_socks.stdout, via_socks.stderr
    assert "intranet home" in via_http.stdout, via_http.stderr
    assert "intranet home" in forwarded.stdout, forwarded.stderr

    # No secret, or a wrong one: refused before any stream is opened. (A stream is
    # audited when it ends: wait for the three above, so that none is counted late.)
    deadline = time.monotonic() + 10
    while streams() < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    streams_before = streams()
    for socks in (f"socks5h://{tunnel.socks}", f"socks5h://portcullis:wrong@{tunnel.socks}",
                  f"socks5h://alice:{secret}@{tunnel.socks}"):
        refused = curl("-x", socks, target)
        assert refused.returncode == CURL_SOCKS_REFUSED, (socks, refused.stderr)
        assert "intranet home" not in refused.stdout
    for http in (f"http://{tunnel.http}", f"http://portcullis:wrong@{tunnel.http}"):
        refused = curl("--proxytunnel", "-x", http, target)
        assert refused.returncode == CURL_PROXY_ERROR, (http, refused.stderr)
        assert "407" in refused.stderr
        forwarded = curl("-i", "-x", http, target)
        assert forwarded.stdout.startswith("HTTP/1.1 407 "), forwarded.stdout
        assert "intranet home" not in forwarded.stdout
    assert streams() == streams_before

    # Scripts read the same secret from a file only the user can read; it ends with the run.
    path = home / "proxy-credentials.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text()) == {"user": "portcullis", "password": secret, **urls}
    assert tunnel.process.stop() == 0
    assert not path.exists()


def test_without_proxy_auth_curl_needs_no_secret_and_no_file_is_written(
        vpn: Deployment, http_server, tmp_path: Path, start_process) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    home = tmp_path / "alice"
    login(vpn, "alice", home)
    tunnel = connect(vpn, start_process, home, proxy_auth=False)
    plain = curl("--socks5-hostname", tunnel.socks, f"http://localhost:{http_server.port}/")
    assert "intranet home" in plain.stdout, plain.stderr
    assert proxy_urls(tunnel.process.output()) == {}
    assert not (home / "proxy-credentials.json").exists()


def test_each_refused_stream_is_one_line_with_the_gateways_words_and_the_client_is_told(
        vpn: Deployment, http_server, tmp_path: Path, start_process) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    home = tmp_path / "alice"
    login(vpn, "alice", home)
    tunnel = connect(vpn, start_process, home)
    # The no-ssh rule denies port 22, whatever listens there.
    by_socks = curl("--socks5-hostname", tunnel.socks, "http://127.0.0.1:22/")
    assert by_socks.returncode == CURL_SOCKS_REFUSED
    assert "(2)" in by_socks.stderr   # SOCKS reply 2: connection not allowed by ruleset
    line = tunnel.process.wait_for(r"refused 127\.0\.0\.1:22: (.+)")
    words = line.group(1).strip()
    assert words

    # An HTTP client gets 403 with the same words in the body.
    host, port = tunnel.http.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as client:
        client.sendall(b"CONNECT localhost:22 HTTP/1.1\r\nHost: localhost:22\r\n\r\n")
        answer = b""
        while chunk := client.recv(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 403 Forbidden\r\n"), answer
    assert answer.decode().endswith(f"denied: {words}\n")
    tunnel.process.wait_for(r"refused localhost:22: ")

    # One line per refused stream; an allowed stream prints nothing.
    allowed = curl("--socks5-hostname", tunnel.socks, f"http://127.0.0.1:{http_server.port}/")
    assert "intranet home" in allowed.stdout
    output = tunnel.process.output()
    assert len(re.findall(r"^refused ", output, re.MULTILINE)) == 2, output
    denied = [e for e in audit(vpn) if e["event"] == "tunnel.denied"]
    assert [e["rule"] for e in denied[-2:]] == ["no-ssh", "no-ssh"]


def test_an_authenticated_udp_association_takes_datagrams_only_from_the_port_it_named(
        vpn: Deployment, dns_server, tmp_path: Path, start_process) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    home = tmp_path / "alice"
    login(vpn, "alice", home)
    tunnel = connect(vpn, start_process, home, proxy_auth=True)
    secret = json.loads((home / "proxy-credentials.json").read_text())["password"].encode()
    host, port = tunnel.socks.split(":")
    query = (b"\x43\x21\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"
             b"\x04wiki\x04corp\x07example\x00\x00\x01\x00\x01")
    header = b"\x00\x00\x00\x01" + socket.inet_aton("127.0.0.1") + \
        dns_server.port.to_bytes(2, "big")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as mine, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other, \
            socket.create_connection((host, int(port)), timeout=10) as control:
        mine.bind(("127.0.0.1", 0))
        other.bind(("127.0.0.1", 0))
        control.sendall(b"\x05\x01\x02")
        assert control.recv(2) == b"\x05\x02"
        control.sendall(bytes([1, 10]) + b"portcullis" + bytes([len(secret)]) + secret)
        assert control.recv(2) == b"\x01\x00"
        # RFC 1928: DST.ADDR/DST.PORT name where the client will send its datagrams from.
        control.sendall(b"\x05\x03\x00\x01" + socket.inet_aton("127.0.0.1")
                        + mine.getsockname()[1].to_bytes(2, "big"))
        reply = control.recv(10)
        assert reply[:4] == b"\x05\x00\x00\x01", reply
        relay = (socket.inet_ntoa(reply[4:8]), int.from_bytes(reply[8:10], "big"))
        other.settimeout(1.5)
        other.sendto(header + query, relay)
        try:
            stolen = other.recvfrom(1024)[0]
        except TimeoutError:
            stolen = b""
        mine.settimeout(5)
        mine.sendto(header + query, relay)
        answer, _ = mine.recvfrom(1024)
    assert stolen == b""
    assert answer[:10] == header and answer[10:12] == b"\x43\x21"
