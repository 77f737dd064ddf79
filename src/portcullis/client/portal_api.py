"""The portal's JSON API from the client side: the login step loop, resources, launches."""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin

import httpx

from portcullis.errors import ClientError
from portcullis.net.loopback import LoopbackReceiver
from portcullis.net.tls import describe_tls_failure
from portcullis.proto.launchfile import LaunchFile, parse_launch_file

# Asked for every prompt the flow shows: (the step, one of its prompts) -> answer. The
# step carries what to show first: a message, a challenge, a TOTP enrolment.
Answerer = Callable[[dict[str, Any], dict[str, Any]], str]
# Shows the user a URL to open in a browser (and opens one, if it can).
Browse = Callable[[str], None]
# The answer a redirect step takes: the one-time code the loopback received (the name is
# the wire's; the client does not import the server's identity package).
CALLBACK_CODE = "callback_code"
# Shows a device step (RFC 8628): the URL to open on any device and the code to type.
ShowDevice = Callable[[dict[str, Any]], None]
# However long the provider's code lives, the CLI stops waiting for the user after this.
MAX_DEVICE_WAIT = 900.0


@dataclass(frozen=True)
class SignedIn:
    token: str
    user: str
    groups: list[str]


class PortalApi:
    def __init__(self, url: str, tls: ssl.SSLContext, token: str | None = None) -> None:
        self.url = url.rstrip("/")
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.url, verify=tls, timeout=30.0, headers=headers)

    def __enter__(self) -> PortalApi:
        return self

    def __exit__(self, *exc: object) -> None:
        self._http.close()

    def login(self, answer: Answerer, browse: Browse, *, device: ShowDevice | None = None,
              browser_timeout: float = 300.0) -> SignedIn:
        """Walk the flow. A redirect step (an identity provider) is shown in a browser:
        `browse` gets a loopback URL to open, and the provider's answer comes back to this
        process's loopback listener (RFC 8252), never to another machine. With `device`,
        the gateway is asked for the device authorization grant (RFC 8628) where the
        provider offers it: `device` shows the URL and code, and the step is answered
        with nothing every interval until the user has signed in (elsewhere, the
        loopback redirect as before)."""
        with LoopbackReceiver() as receiver:
            body = self._post_json("/api/v1/login", {"return_to": receiver.callback_url,
                                                     **({"device": True} if device else {})})
            for _ in range(20):  # a flow has a handful of steps; stop a runaway server
                if body.get("status") == "authenticated":
                    return SignedIn(str(body["token"]), str(body["user"]),
                                    list(body["groups"]))
                if body.get("status") != "continue":
                    raise ClientError("sign-in failed (a wrong answer, or the account is "
                                      "locked or disabled; your administrator can see which)")
                step = body["step"]
                if step["kind"] == "device" and device is not None:
                    device(step["device"])
                    body = self._await_device(str(body["handle"]), step["device"])
                    continue
                if step["kind"] == "redirect":
                    redirect = step["redirect"]
                    browse(receiver.start_at(str(redirect["url"]), redirect.get("form")))
                    back = receiver.wait(browser_timeout)
                    answers = {CALLBACK_CODE: back.get(CALLBACK_CODE, "")}
                else:
                    answers = {prompt["name"]: answer(step, prompt) for prompt in step["prompts"]}
                body = self._post_json("/api/v1/login", {"handle": body["handle"],
                                                         "answers": answers})
        raise ClientError("the portal asked too many sign-in steps")

    def _await_device(self, handle: str, shown: dict[str, Any]) -> dict[str, Any]:
        """Answer a device step with nothing every interval (the gateway asks the provider
        once per answer) until the flow moves on: the gateway's next answer."""
        deadline = time.monotonic() + min(float(shown["expires_in"]), MAX_DEVICE_WAIT)
        interval = float(shown["interval"])
        while time.monotonic() < deadline:
            time.sleep(interval)
            body = self._post_json("/api/v1/login", {"handle": handle, "answers": {}})
            step = body.get("step") or {}
            if body.get("status") != "continue" or step.get("kind") != "device":
                return body
            handle = str(body["handle"])
            # slow_down (RFC 8628 3.5) makes the gateway's interval longer.
            interval = max(interval, float(step["device"]["interval"]))
        raise ClientError("the sign-in at the identity provider was not completed in time; "
                          "sign in again")

    def resources(self) -> list[dict[str, Any]]:
        response = self._request("GET", "/api/v1/resources")
        self._check(response)
        resources: list[dict[str, Any]] = response.json()["resources"]
        return resources

    def browser_url(self, resource: dict[str, Any]) -> str:
        """Where a web or VNC resource of `resources()` opens (the portal's page for it)."""
        return urljoin(self.url + "/", str(resource.get("open", "/")))

    def launch(self, name: str) -> LaunchFile:
        response = self._request("POST", f"/api/v1/resources/{name}/launch")
        if response.status_code == 403:
            # A web application or a desktop is yours to open, in a browser: say where.
            listed = next((item for item in self.resources() if item.get("name") == name), None)
            if listed is not None and listed.get("kind") != "tcp":
                raise ClientError(f"{name!r} opens in a browser, not in the client: "
                                  f"{self.browser_url(listed)}")
            raise ClientError(f"you may not launch {name!r} (or there is no such resource); "
                              "the 'resources' command lists yours")
        self._check(response)
        return parse_launch_file(response.content)

    def admin_sessions(self) -> list[dict[str, Any]]:
        response = self._request("GET", "/api/v1/admin/sessions")
        self._check_admin(response)
        sessions: list[dict[str, Any]] = response.json()["sessions"]
        return sessions

    def end_sessions(self, *, session_id: str | None, user: str | None,
                     connections_only: bool = False) -> tuple[list[str], int]:
        """The connections ended on this gateway, and how many sign-in sessions were
        revoked (0 with `connections_only`)."""
        scope = "connections" if connections_only else "session"
        if session_id is not None:
            response = self._request("DELETE", f"/api/v1/admin/sessions/{session_id}",
                                     params={"scope": scope})
            if response.status_code == 404:
                return [], 0
            if response.status_code == 504:   # another worker did not confirm the end
                raise ClientError(_error_of(response))
        else:
            response = self._request("DELETE", "/api/v1/admin/sessions",
                                     params={"user": user or "", "scope": scope})
        self._check_admin(response)
        body = response.json()
        return list(body["ended"]), int(body.get("revoked", 0))

    def _check_admin(self, response: httpx.Response) -> None:
        if response.status_code == 403:
            raise ClientError("only members of the admin groups may do this "
                              "(sign in as an administrator)")
        self._check(response)

    def logout(self) -> None:
        self._request("POST", "/api/v1/logout")

    def shadow(self, method: str, path: str,
               payload: dict[str, Any] | None = None) -> dict[str, Any]:
        """A call to the shadow hub's operator API (`/api/v1/shadow/…`); its refusals
        say what to do, and become the ClientError's message."""
        response = self._request(method, f"/api/v1/shadow/{path}", json=payload)
        if response.status_code == 404 and "json" not in response.headers.get(
                "content-type", ""):
            raise ClientError(f"{self.url} runs no shadow hub")
        if response.status_code >= 400:
            try:
                error = str(response.json()["error"])
            except (ValueError, KeyError, TypeError):
                self._check(response)
                raise
            raise ClientError(error)
        result: dict[str, Any] = response.json()
        return result

    def _post_json(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        response = self._request("POST", path, json=payload)
        if response.status_code not in (200, 401):
            self._check(response)
        result: dict[str, Any] = response.json()
        return result

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            explained = describe_tls_failure(exc, self.url)
            raise ClientError(explained or f"cannot reach {self.url}: {exc}") from None

    @staticmethod
    def _check(response: httpx.Response) -> None:
        if response.status_code == 401:
            raise ClientError("your session has ended: sign in again with 'portcullis login'")
        if response.status_code >= 400:
            raise ClientError(f"the portal answered {response.status_code}: "
                              f"{response.text[:200]}")


def _error_of(response: httpx.Response) -> str:
    """The `error` of a JSON answer, else the start of its text."""
    try:
        return str(response.json()["error"])
    except (ValueError, KeyError, TypeError):
        return f"the portal answered {response.status_code}: {response.text[:200]}"
