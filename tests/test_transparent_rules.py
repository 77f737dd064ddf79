"""The transparent-mode ruleset and DNS question parsing are pure: tested as text."""

from __future__ import annotations

from portcullis.client.transparent import Capture, question_name, ruleset


def test_split_tunnel_on_captures_only_the_pushed_networks() -> None:
    text = ruleset("portcullis_1", Capture("on", ("10.1.0.0/16", "fd00::/8"), ("192.0.2.9",),
                                           tcp_port=4000, dns_port=5300))
    assert "ip daddr { 10.1.0.0/16 } tcp dport 1-65535 redirect to :4000" in text
    assert "ip6 daddr { fd00::/8 } tcp dport 1-65535 redirect to :4000" in text
    assert "ip daddr 192.0.2.9 return" in text          # the gateway itself: never captured
    assert "meta nfproto ipv4 udp dport 53 redirect to :5300" in text
    assert text.index("meta mark 0x70c return") < text.index("redirect")


def test_reverse_captures_everything_but_the_networks_and_off_everything() -> None:
    reverse = ruleset("t", Capture("reverse", ("10.0.0.0/8",), (), tcp_port=1,
                                   families=("ip",)))
    everything = ruleset("t", Capture("off", (), (), tcp_port=1, families=("ip",)))
    assert "ip daddr != { 10.0.0.0/8 } tcp dport 1-65535 redirect to :1" in reverse
    assert "meta nfproto ipv4 tcp dport 1-65535 redirect to :1" in everything
    assert "udp dport 53" not in everything


def test_question_names_are_read_from_queries() -> None:
    query = (b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"
             b"\x04Wiki\x04corp\x07example\x00\x00\x01\x00\x01")
    assert question_name(query) == "wiki.corp.example"
    assert question_name(b"\x00" * 5) is None
    assert question_name(query[:20]) is None


def test_udp_of_the_pushed_networks_is_marked_and_tproxied() -> None:
    text = ruleset("t", Capture("on", ("10.1.0.0/16",), (), tcp_port=1, udp_port=2,
                                udp_mark=0x7123, families=("ip",)))
    assert "ip daddr { 10.1.0.0/16 } meta l4proto udp meta mark set 0x7123" in text
    assert "meta mark 0x7123 meta l4proto udp tproxy ip to 127.0.0.1:2" in text
    assert "udp dport 53 return" in text   # DNS has its own forwarder


def test_full_tunnel_blocks_ipv6_it_does_not_capture() -> None:
    text = ruleset("t", Capture("off", (), ("2001:db8::1",), tcp_port=1, families=("ip",)))
    assert "meta nfproto ipv6 meta l4proto { tcp, udp } reject" in text
    assert "ip6 daddr 2001:db8::1 return" in text
    split = ruleset("t", Capture("on", ("10.0.0.0/8",), (), tcp_port=1, families=("ip",)))
    assert "reject" not in split
