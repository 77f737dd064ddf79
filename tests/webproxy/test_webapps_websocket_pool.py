"""Found by `python -m bench webproxy` (memory per open WebSocket): a WebSocket through a
web resource kept its upstream connection in the resource's request pool (httpx's, at most
100) after it had closed, so after 100 WebSockets every request to that application
waited for the pool and got 502. WebSockets now have connections of their own, each given
back when it closes."""

from __future__ import annotations

import ssl

import websockets

from webproxy.test_webproxy_gateway import Published, published  # noqa: F401  (fixture)

POOL = 100  # httpx.AsyncClient's default max_connections, the upstream pool's size


async def test_an_application_answers_after_more_websockets_than_the_upstream_pool_holds(
        published: Published) -> None:  # noqa: F811
    cookie = published.enter(published.sign_in("alice"))
    context = ssl.create_default_context(cafile=str(published.deployment.ca))
    for _ in range(POOL):   # one after another: never more than one open
        async with websockets.connect(f"wss://wiki.localhost:{published.port}/ws",
                                      ssl=context, host="127.0.0.1", port=published.port,
                                      additional_headers={"cookie": cookie}, proxy=None,
                                      open_timeout=20) as socket:
            await socket.send("ping")
            assert await socket.recv() == "ping"
    answer = published.client.get(published.origin("wiki.localhost") + "/whoami",
                                  headers={"cookie": cookie})
    assert answer.status_code == 200, answer.text
