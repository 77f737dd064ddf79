"""The owner of a loopback connection's other end, from /proc/net/tcp{,6}."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

from portcullis.net.peeruid import parse_proc_net_tcp, socket_owner_uid

_HEADER = ("  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid"
           "  timeout inode\n")


def _word(raw: bytes) -> str:
    return "".join(f"{int.from_bytes(raw[i:i + 4], sys.byteorder):08X}"
                   for i in range(0, len(raw), 4))


def test_ipv4_and_ipv6_lines_give_addresses_ports_and_uids() -> None:
    v4 = (f"   0: {_word(bytes([127, 0, 0, 1]))}:1F90 {_word(bytes([127, 0, 0, 2]))}:0050 01 "
          "00000000:00000000 00:00000000 00000000  1000        0 12345 1\n")
    mapped = bytes(10) + b"\xff\xff" + bytes([127, 0, 0, 1])
    loopback6 = bytes(15) + b"\x01"
    v6 = (f"   1: {_word(mapped)}:D431 {_word(loopback6)}:170C 01 "
          "00000000:00000000 00:00000000 00000000     0        0 6789 1\n")
    assert list(parse_proc_net_tcp(_HEADER + v4 + v6 + "   2: garbage\n")) == [
        (("127.0.0.1", 8080), ("127.0.0.2", 80), 1000),
        (("127.0.0.1", 54321), ("::1", 5900), 0),
    ]


def test_a_table_names_the_socket_by_both_ends(tmp_path: Path) -> None:
    table = tmp_path / "tcp"
    table.write_text(_HEADER + f"   0: {_word(bytes([127, 0, 0, 1]))}:D431 "
                     f"{_word(bytes([127, 0, 0, 1]))}:170C 01 00000000:00000000 00:00000000 "
                     "00000000  4242        0 1 1\n")
    assert socket_owner_uid(("127.0.0.1", 54321), ("127.0.0.1", 5900), (table,)) == 4242
    assert socket_owner_uid(("127.0.0.1", 5900), ("127.0.0.1", 54321), (table,)) is None
    assert socket_owner_uid(("127.0.0.1", 54321), ("127.0.0.1", 5900),
                            (tmp_path / "absent",)) is None


def test_a_real_loopback_connection_is_owned_by_this_user() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server, \
            socket.create_connection(server.getsockname()):
        accepted, peer = server.accept()
        with accepted:
            assert socket_owner_uid(peer, accepted.getsockname()) == os.getuid()
