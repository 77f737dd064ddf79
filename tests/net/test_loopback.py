"""The CLI's loopback receiver (RFC 8252): it takes the one answer a browser brings back
to this machine, and nothing a web page could forge from elsewhere."""

from __future__ import annotations

import http.client
from urllib.parse import urlsplit

import pytest

from portcullis.errors import ClientError
from portcullis.net.loopback import LoopbackReceiver


def request(receiver: LoopbackReceiver, method: str, path: str, *, host: str | None = None,
            body: str | None = None) -> tuple[int, str]:
    port = int(receiver.host.rsplit(":", 1)[1])
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    headers = {"Host": host or receiver.host}
    if body is not None:
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    connection.request(method, path, body=body, headers=headers)
    response = connection.getresponse()
    answer = (response.status, response.getheader("location") or response.read().decode())
    connection.close()
    return answer


def test_the_start_page_sends_the_browser_on_and_the_callback_takes_the_answer() -> None:
    with LoopbackReceiver() as receiver:
        start = urlsplit(receiver.start_at("https://idp.example/authorize?x=1")).path
        assert start.startswith("/start/") and len(start) > 20
        assert request(receiver, "GET", start) == (303, "https://idp.example/authorize?x=1")
        callback = urlsplit(receiver.callback_url).path
        assert callback.startswith("/callback/") and len(callback) > 20
        status, page = request(receiver, "GET", callback + "?callback_code=abc")
        assert status == 200 and "return to the terminal" in page
        assert receiver.wait(5) == {"callback_code": "abc"}


def test_a_post_binding_start_page_posts_the_form_escaped() -> None:
    with LoopbackReceiver("/login/callback/") as receiver:
        start = urlsplit(receiver.start_at("https://idp.example/sso",
                                           {"SAMLRequest": 'a"><script>', "RelayState": "r"})).path
        status, page = request(receiver, "GET", start)
        assert status == 200 and 'value="a&quot;&gt;&lt;script&gt;"' in page
        request(receiver, "POST", "/login/callback/corp", body="SAMLResponse=x&RelayState=r")
        assert receiver.wait(5) == {"SAMLResponse": "x", "RelayState": "r"}


def test_another_host_name_is_refused_and_guessed_paths_are_not_found() -> None:
    """A DNS-rebinding page reaches the port under its own name: refused before anything
    is served; and without the unguessable paths nothing is served either."""
    with LoopbackReceiver() as receiver:
        start = urlsplit(receiver.start_at("https://idp.example/authorize")).path
        assert request(receiver, "GET", start, host="attacker.example")[0] == 421
        callback = urlsplit(receiver.callback_url).path
        assert request(receiver, "GET", callback + "?callback_code=forged",
                       host=f"attacker.example:{receiver.host.rsplit(':', 1)[1]}")[0] == 421
        assert request(receiver, "GET", "/start")[0] == 404
        assert request(receiver, "GET", "/callback?callback_code=forged")[0] == 404
        with pytest.raises(ClientError, match="no answer from the browser"):
            receiver.wait(0.2)
