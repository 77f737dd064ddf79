"""Writes the seed corpus, ``tests/fuzz/corpus/TARGET/seed-*``: small valid inputs and
edge cases per target, each with the targets' two-byte header (options, chunk size).

    PYTHONPATH=src python tests/fuzz/seeds.py     # rewrites the seed-* files

The files are committed; inputs that once crashed a target are committed next to them
as ``regression-*`` and replayed by ``test_fuzz.py``.
"""

from __future__ import annotations

import base64
import json
import struct
from pathlib import Path

from fuzz_targets import SHADOW_HUB_KEY, SHADOW_KEY_ID

from portcullis.proto import mux
from portcullis.proto.shadow import PREFACE, ShadowRequest, sign_request
from portcullis.proto.streamdatagrams import frame_datagram

CORPUS = Path(__file__).resolve().parent / "corpus"
WHOLE, BYTES, SMALL = 0, 1, 5  # chunk sizes: one chunk, byte by byte, 5 bytes


def _wire(conn: mux.MuxConnection) -> bytes:
    return b"".join(bytes(chunk) for chunk in conn.data_to_send())


def gateway_says() -> dict[str, bytes]:
    """What a gateway sends a client: HELLO, CONFIG, ACCEPT, DATA, FIN, a DATAGRAM..."""
    conn = mux.MuxConnection("gateway")
    conn.send_hello({"id": "t1", "user": "alice"})
    conn.send_config({"networks": ["10.0.0.0/8"], "split_tunnel": "on"})
    hello = _wire(conn)
    header = struct.Struct("!BBII")
    accept = header.pack(mux.FrameType.ACCEPT, 0, 1, 4) + struct.pack("!I", 65536)
    words = b'denied by rule "no-ssh"'
    refuse = header.pack(mux.FrameType.REFUSE, 0, 3, 1 + len(words)) + \
        bytes([mux.Reason.DENIED]) + words
    data = header.pack(mux.FrameType.DATA, 0, 1, 5) + b"hello"
    fin = header.pack(mux.FrameType.DATA, mux.FLAG_FIN, 1, 0)
    window = header.pack(mux.FrameType.WINDOW, 0, 1, 4) + struct.pack("!I", 4096)
    ping = header.pack(mux.FrameType.PING, 0, 0, 8) + b"12345678"
    goaway = header.pack(mux.FrameType.GOAWAY, 0, 0, 6) + bytes([mux.Reason.ADMIN_ENDED]) + \
        b"bye!!"
    return {
        "hello": hello,
        "stream": hello + accept + window + data + fin,
        "refused": hello + refuse,
        "ping-goaway": hello + ping + goaway,
        "garbage": b"\xff" * 16,
        "oversized": header.pack(mux.FrameType.DATA, 0, 1, 64 << 20),
        "no-hello": data,
    }


def client_says() -> dict[str, bytes]:
    """What a client sends a gateway: HELLO, OPEN (TCP, UDP, ICMP), DATA, RESET..."""
    conn = mux.MuxConnection("client")
    conn.send_hello({"session": "token"})
    tcp = conn.open_stream(mux.Protocol.TCP, "intranet.example", 443)
    conn.open_stream(mux.Protocol.UDP, "10.0.0.53", 53)
    conn.open_stream(mux.Protocol.ICMP, "10.0.0.1", 0)
    opened = _wire(conn)
    header = struct.Struct("!BBII")
    data = header.pack(mux.FrameType.DATA, 0, tcp, 3) + b"GET"
    reset = header.pack(mux.FrameType.RESET, 0, tcp, 1) + bytes([mux.Reason.CANCELLED])
    datagram = header.pack(mux.FrameType.DATAGRAM, 0, 3, 4) + b"dns?"
    return {
        "opened": opened,
        "data-reset": opened + data + reset,
        "datagram": opened + datagram,
        "reused-id": opened + opened[len(opened) // 2 :],
    }


def socks5() -> dict[str, bytes]:
    connect_name = b"\x05\x01\x00\x03\x10intranet.example\x01\xbb"
    connect_v4 = b"\x05\x01\x00\x01\x0a\x00\x00\x01\x00\x50"
    connect_v6 = b"\x05\x01\x00\x04" + bytes(15) + b"\x01\x00\x16"
    udp = b"\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00"
    password = b"\x01\x04fuzz\x06secret"
    return {
        "connect-name": b"\x00\x00\x05\x01\x00" + connect_name + b"early",
        "connect-ipv4": b"\x00\x01\x05\x02\x00\x02" + connect_v4,
        "connect-ipv6": b"\x00\x05\x05\x01\x00" + connect_v6,
        "udp-associate": b"\x00\x00\x05\x01\x00" + udp,
        "bind": b"\x00\x00\x05\x01\x00\x05\x02\x00\x01\x7f\x00\x00\x01\x00\x50",
        "password": b"\x01\x01\x05\x01\x02" + password + connect_name,
        "wrong-password": b"\x01\x00\x05\x01\x02\x01\x04fuzz\x05wrong" + connect_v4,
        "password-not-offered": b"\x01\x00\x05\x01\x00" + connect_v4,
        "version-4": b"\x00\x00\x04\x01\x00\x50\x0a\x00\x00\x01\x00",
        "unicode-name": b"\x00\x03\x05\x01\x00\x05\x01\x00\x03\x0cb\xc3\xbccher.test\x00\x50",
        "refused-reply": b"\x20\x00\x05\x01\x00" + connect_v4,
        # The relay (option bit 1): UDP and ICMP echo in the TLS stream.
        "relay-udp-in-stream": b"\x02\x00\x05\x01\x00\x05\x83\x00\x01\x0a\x00\x00\x35\x00\x35"
                               + frame_datagram(b"query"),
        "relay-icmp-echo": b"\x02\x03\x05\x01\x00\x05\x81\x00\x01\x0a\x00\x00\x01\x00\x00",
        "relay-connect-name": b"\x02\x01\x05\x01\x00" + connect_name,
        "extension-on-local-port": b"\x00\x00\x05\x01\x00\x05\x83\x00\x01\x0a\x00\x00\x35\x00\x35",
    }


def socks5_client() -> dict[str, bytes]:
    method = b"\x05\x00"
    succeeded_v4 = b"\x05\x00\x00\x01\x0a\x00\x00\x02\x9c\x40"
    return {
        "succeeded": b"\x00\x00" + method + succeeded_v4 + b"HTTP/1.1 200 OK",
        "succeeded-bytes": b"\x00\x01" + method + succeeded_v4,
        "udp-name": b"\x01\x03" + method + b"\x05\x00\x00\x03\x05relay\x00\x00",
        "icmp-ipv6": b"\x02\x00" + method + b"\x05\x00\x00\x04" + bytes(16) + b"\x00\x00",
        "not-allowed": b"\x00\x00" + method + b"\x05\x02\x00\x01" + bytes(6),
        "no-acceptable-method": b"\x00\x00\x05\xff",
        "not-supported": b"\x01\x02" + method + b"\x05\x07\x00\x01" + bytes(6),
        "bad-address-type": b"\x00\x00" + method + b"\x05\x00\x00\x09" + bytes(6),
    }


def stream_datagrams() -> dict[str, bytes]:
    three = frame_datagram(b"one") + frame_datagram(b"") + frame_datagram(b"three")
    return {
        "three": b"\x00\x00" + three,
        "three-bytes": b"\x00\x01" + three,
        "echo-reply": b"\x00\x05" + frame_datagram(b"\x00\x07\x00\x00\x01\x2cdata"),
        "over-limit": b"\x00\x00\x02\x01" + bytes(513),
        "largest": b"\x01\x00" + frame_datagram(bytes(0xFFFF)),
        "truncated": b"\x00\x00\x00\x10short",
    }


def socks5_udp() -> dict[str, bytes]:
    return {
        "ipv4": b"\x00\x00\x00\x01\x0a\x00\x00\x35\x00\x35query",
        "name": b"\x00\x00\x00\x03\x07dns.lan\x00\x35query",
        "ipv6": b"\x00\x00\x00\x04" + bytes(15) + b"\x01\x00\x35",
        "ipv6-as-name": b"\x00\x00\x00\x03\x0e::ffff:1.2.3.4\x00\x35x",
        "fragment": b"\x00\x00\x01\x01\x0a\x00\x00\x35\x00\x35query",
        "port-0": b"\x00\x00\x00\x01\x0a\x00\x00\x35\x00\x00",
    }


def http_connect() -> dict[str, bytes]:
    token = base64.b64encode(b"fuzz:secret")
    head = b"CONNECT intranet.example:443 HTTP/1.1\r\nHost: intranet.example:443\r\n"
    return {
        "connect": b"\x02\x00" + head + b"\r\n",
        "connect-early": b"\x02\x07" + head + b"\r\n\x16\x03\x01early tls",
        "ipv6": b"\x02\x01CONNECT [::1]:22 HTTP/1.1\r\nHost: [::1]:22\r\n\r\n",
        "authorised": b"\x03\x03" + head + b"Proxy-Authorization: Basic " + token + b"\r\n\r\n",
        "unauthorised": b"\x01\x00" + head + b"Proxy-Authorization: Basic Zm9vOmJhcg==\r\n\r\n",
        "no-authorization": b"\x01\x00" + head + b"\r\n",
        "get": b"\x00\x00GET http://intranet.example/ HTTP/1.1\r\nHost: intranet.example\r\n\r\n",
        "no-port": b"\x04\x00CONNECT intranet.example HTTP/1.1\r\nHost: x\r\n\r\n",
        "http-1.0": b"\x02\x00CONNECT 10.0.0.1:80 HTTP/1.0\r\n\r\n",
        "folded-header": b"\x00\x02" + head + b"X: a\r\n b\r\n\r\n",
    }


def http_forward() -> dict[str, bytes]:
    token = base64.b64encode(b"fuzz:secret")
    get = b"GET http://intranet.example/a?b=c HTTP/1.1\r\nHost: x\r\n"
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
    says = b"\n--upstream--\n"
    chunked = (b"POST http://10.0.0.1:8080/up HTTP/1.1\r\nHost: x\r\n"
               b"Transfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n"
               b"3\r\nabc\r\n0\r\n\r\n")
    return {
        "get": b"\x00\x00" + get + b"\r\n" + says + ok,
        "get-split": b"\x00\x03" + get + b"\r\n" + says + ok,
        "keep-alive": b"\x00\x05" + (get + b"\r\n") * 2 + b"GET http://other/ HTTP/1.1\r\n"
                      b"Host: o\r\n\r\n" + says + ok * 2,
        "authorised": b"\x01\x00" + get + b"Proxy-Authorization: Basic " + token +
                      b"\r\n\r\n" + says + ok,
        "unauthorised": b"\x01\x00" + get + b"\r\n",
        "chunked": b"\x02\x01" + chunked + says + b"HTTP/1.1 100 Continue\r\n\r\n"
                   b"HTTP/1.0 200 OK\r\n\r\nclose-delimited",
        "refused": b"\x0c\x00" + get + b"\r\n",
        "https": b"\x00\x00GET https://intranet.example/ HTTP/1.1\r\nHost: x\r\n\r\n",
        "ipv6": b"\x00\x01GET http://[::1]:81/ HTTP/1.1\r\nHost: x\r\n\r\n" + says +
                b"HTTP/1.1 204 No Content\r\n\r\n",
        "bad-upstream": b"\x02\x00" + get + b"\r\n" + says + b"SSH-2.0-OpenSSH\r\n",
        "pipelined-head": b"\x00\x07" + get + b"\r\nHEAD http://intranet.example/ HTTP/1.1"
                          b"\r\nHost: x\r\n\r\n" + says + ok + b"HTTP/1.1 200 OK\r\n"
                          b"Content-Length: 9\r\n\r\n",
    }


def launch_file() -> dict[str, bytes]:
    text = ("[Portcullis Launch]\nVersion=1\nResource=wiki\nTitle=Team wiki\n"
            "Gateway=wss://gw.example.com:8443/api/v1/launch\nTicket=STA01;Q2hhbmdlTWU\n"
            "Expires=2026-11-23T13:30:00Z\n")
    return {
        "valid": text.encode(),
        "crlf-bom": b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode(),
        "comments-and-sections": ("; note\n[Other]\nTicket=x\n" + text + "[More]\nA=b\n").encode(),
        "unicode-title": text.replace("Team wiki", "Équipe — wiki").encode(),
        "offset-expiry": text.replace("13:30:00Z", "13:30:00.5+02:00").encode(),
        "version-2": text.replace("Version=1", "Version=2").encode(),
        "line-separator": text.replace("Team wiki", "Team\u2028Ticket=evil").encode(),
    }


def launch_url() -> dict[str, bytes]:
    url = ("portcullis://launch/?v=1&resource=wiki&title=Team%20wiki&gateway=https%3A%2F%2F"
           "gw.example.com%3A8443%2Fapi%2Fv1%2Flaunch&ticket=STA01%3BQ2hhbmdlTWUQ2hhbmdlTWU"
           "&expires=2026-11-23T13%3A30%3A00Z")
    return {
        "valid": url.encode(),
        "unicode-title": url.replace("Team%20wiki", "%C3%89quipe%20%E2%80%94%20wiki").encode(),
        "plain-http": url.replace("https%3A", "http%3A").encode(),
        "extra-key": (url + "&exec=xterm").encode(),
    }


def saml_message() -> dict[str, bytes]:
    response = (b'<samlp:Response xmlns:samlp="urn:oasis:names:tc:SAML:2.0:protocol" '
                b'xmlns:saml="urn:oasis:names:tc:SAML:2.0:assertion" ID="_r1" Version="2.0">'
                b'<saml:Issuer>https://idp.example</saml:Issuer><saml:Assertion ID="_a1">'
                b'<saml:Subject><saml:NameID>admin<!---->.evil</saml:NameID></saml:Subject>'
                b'</saml:Assertion></samlp:Response>')
    return {
        "response": b"\x00" + response,
        "deflated": b"\x01" + response,
        "entity": b"\x00<!DOCTYPE r [<!ENTITY a 'aaaa'>]><r>&a;</r>",
        "sha1": b"\x00" + response.replace(b"</samlp:Response>", b'<ds:DigestMethod xmlns:ds='
                                           b'"http://www.w3.org/2000/09/xmldsig#" Algorithm='
                                           b'"http://www.w3.org/2000/09/xmldsig#sha1"/>'
                                           b"</samlp:Response>"),
        "not-base64": b"\x02PHNhbWxw%%%",
    }


def id_token() -> dict[str, bytes]:
    def part(value: dict[str, object]) -> bytes:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=")

    claims = {"iss": "https://idp.example", "aud": "portcullis", "exp": 1_800_000_600,
              "iat": 1_800_000_000, "nonce": "n-0S6_WzA2Mj", "sub": "alice"}
    return {
        "rs256": part({"alg": "RS256", "kid": "k1"}) + b"." + part(claims) + b".c2ln",
        "none": part({"alg": "none"}) + b"." + part(claims) + b".",
        "jwk-header": part({"alg": "RS256", "jwk": {"kty": "oct", "k": "AA"}}) + b"."
                      + part(claims) + b".c2ln",
        "several-audiences": part({"alg": "ES256"}) + b"." + part(
            {**claims, "aud": ["portcullis", "other"]}) + b".c2ln",
    }


def _shadow_request(**changes: object) -> bytes:
    fields: dict[str, object] = {
        "request_id": "0123456789abcdef0123456789abcdef", "device": "pc-042",
        "device_fingerprint": "sha256:" + "a" * 64, "operator": "alice",
        "console_fingerprint": "sha256:" + "b" * 64,
        "nonce": "fedcba9876543210fedcba9876543210", "issued_at": 1_800_000_000,
        "expires_at": 1_800_000_060, "key_id": SHADOW_KEY_ID, **changes}
    return sign_request(ShadowRequest(**fields), SHADOW_HUB_KEY)  # type: ignore[arg-type]


def _shadow_frame(kind: int, payload: bytes) -> bytes:
    return struct.pack("!BH", kind, len(payload)) + payload


def shadow_request() -> dict[str, bytes]:
    signed = _shadow_request()
    body_end = len(signed) - 67
    return {
        "valid": signed,
        "unicode-operator": _shadow_request(operator="jörg 😀"),
        "tampered": signed.replace(b"pc-042", b"pc-043"),
        "lifetime-61": signed.replace(b"1800000060", b"1800000061"),
        "wrong-algorithm": signed[:body_end] + b"\x02" + signed[body_end + 1:],
        "blank-in-body": signed[:4] + struct.pack("!H", body_end - 5) + signed[6:7] + b" "
                         + signed[7:],
    }


def shadow_device() -> dict[str, bytes]:
    request = PREFACE + _shadow_frame(1, _shadow_request())
    return {
        "request-accepted": b"\x01\x00" + request,
        "request-refused": b"\x00\x07" + request,
        "request-bytes": b"\x01\x01" + request,
        "data-before-answer": b"\x00\x00" + request + b"RFB 003.008\n",
        "garbage-request": b"\x01\x03" + PREFACE + _shadow_frame(1, b"PSR1\x00\x00"),
        "oversized": b"\x00\x00" + PREFACE + b"\x01\xff\xff" + bytes(64),
        "plain-rfb": b"\x00\x01RFB 003.008\n",
        "accept-first": b"\x00\x00" + PREFACE + _shadow_frame(2, b'{"session":"s1"}'),
    }


def shadow_console() -> dict[str, bytes]:
    return {
        "accepted": b"\x00\x00" + _shadow_frame(2, b'{"session":"s-1"}') + b"RFB 003.008\n",
        "accepted-bytes": b"\x00\x01" + _shadow_frame(2, b'{"session":"s-1"}') + b"RFB",
        "refused": b"\x00\x03" + _shadow_frame(3, "request expired — ask again".encode()),
        "bad-session": b"\x00\x00" + _shadow_frame(2, b'{"session":["x"]}'),
        "request-back": b"\x00\x00" + _shadow_frame(1, b"PSR1"),
        "long-refusal": b"\x00\x00" + b"\x03\x04\x01" + bytes(1025),
    }


def rfb_refusal() -> dict[str, bytes]:
    return {
        "3.8": b"\x00\x00RFB 003.008\n",
        "3.7-bytes": b"\x00\x01RFB 003.007\n",
        "3.3": b"\x00\x05RFB 003.003\n",
        "3.889": b"\x00\x00RFB 003.889\n",
        "tls": b"\x00\x00\x16\x03\x01\x00\xf8\x01\x00\x00\xf4\x03\x03",
        "invalid": b"\x00\x02RFB 004.00x\n",
    }


def rfb_password_bridge() -> dict[str, bytes]:
    """Byte 0: how many body bytes the server sends; byte 1: the split."""
    version = b"RFB 003.008\n"
    challenge = bytes(range(16))
    accepted = version + b"\x01\x02" + challenge + b"\x00\x00\x00\x00"
    refused = version + b"\x01\x02" + challenge + b"\x00\x00\x00\x01\x00\x00\x00\x04nope"
    return {
        "accepted": bytes([len(accepted), 0]) + accepted + version + b"\x01\x01",
        "accepted-bytes": bytes([len(accepted), 1]) + accepted + version + b"\x01\x01",
        "refused-3.3-viewer": bytes([len(refused), 3]) + refused + b"RFB 003.003\n",
        "server-3.3": b"\x24\x00RFB 003.003\n\x00\x00\x00\x02" + challenge
        + b"\x00\x00\x00\x00" + version + b"\x01",
        "none-only": b"\x12\x02" + version + b"\x01\x01\x00\x00\x00\x00" + version + b"\x01",
        "no-types": b"\x13\x00" + version + b"\x00\x00\x00\x00\x02no" + version,
    }


SEEDS = {
    "mux_client": {name: b"\x00\x03" + wire for name, wire in gateway_says().items()},
    "mux_gateway": {name: b"\x00\x07" + wire for name, wire in client_says().items()},
    "socks5": socks5(),
    "socks5_udp": socks5_udp(),
    "socks5_client": socks5_client(),
    "stream_datagrams": stream_datagrams(),
    "http_connect": http_connect(),
    "http_forward": http_forward(),
    "launch_file": launch_file(),
    "launch_url": launch_url(),
    "saml_message": saml_message(),
    "id_token": id_token(),
    "shadow_request": shadow_request(),
    "shadow_device": shadow_device(),
    "shadow_console": shadow_console(),
    "rfb_refusal": rfb_refusal(),
    "rfb_password_bridge": rfb_password_bridge(),
}


def main() -> None:
    for target, seeds in SEEDS.items():
        directory = CORPUS / target
        directory.mkdir(parents=True, exist_ok=True)
        for old in directory.glob("seed-*"):
            old.unlink()
        for name, data in seeds.items():
            (directory / f"seed-{name}").write_bytes(data)
        print(f"{target}: {len(seeds)} seeds")


if __name__ == "__main__":
    main()
