"""The portal's side of getting the client: the launch page's platform and the client
downloads served from the built dist/ (`make dist`), and nothing else from disk."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from starlette.applications import Starlette

from portcullis.portal.launching import client_files, download_routes, platform_of
from portcullis.portal.pages import TEMPLATES

WHEEL = "portcullis_client-0.1.0-py3-none-any.whl"


@pytest.mark.parametrize(("user_agent", "platform"), [
    ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/120.0", "windows"),
    ("Mozilla/5.0 (Macintosh; Intel Mac OS X 14_2) AppleWebKit/605.1.15 Safari/605.1", "macos"),
    ("Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/120.0", "linux"),
    ("", "linux"),
])
def test_the_launch_page_puts_the_visitors_platform_first(user_agent: str,
                                                          platform: str) -> None:
    assert platform_of(user_agent) == platform


def portal(dist: Path) -> httpx.AsyncClient:
    app = Starlette(routes=download_routes(dist))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="https://portal")


async def test_the_built_client_is_served_for_download(tmp_path: Path) -> None:
    (tmp_path / "portcullis-client.pyz").write_bytes(b"PK\x05\x06" + bytes(18))
    (tmp_path / WHEEL).write_bytes(b"wheel")
    (tmp_path / "portcullis-0.1.0-py3-none-any.whl").write_bytes(b"server")
    assert client_files(tmp_path) == ["portcullis-client.pyz", WHEEL]
    async with portal(tmp_path) as client:
        pyz = await client.get("/download/portcullis-client.pyz")
        wheel = await client.get(f"/download/{WHEEL}")
        server = await client.get("/download/portcullis-0.1.0-py3-none-any.whl")
    assert pyz.status_code == 200 and pyz.content == b"PK\x05\x06" + bytes(18)
    assert 'filename="portcullis-client.pyz"' in pyz.headers["content-disposition"]
    assert wheel.status_code == 200 and wheel.content == b"wheel"
    assert server.status_code == 404 and "server" not in server.text


async def test_before_make_dist_the_download_says_how_to_build_it(tmp_path: Path) -> None:
    async with portal(tmp_path / "dist") as client:
        missing = await client.get("/download/portcullis-client.pyz")
    assert missing.status_code == 404
    assert "make dist" in missing.text and "<html" in missing.text


@pytest.mark.parametrize("name", ["..%2F..%2Fetc%2Fpasswd", "portcullis.toml",
                                  "portcullis_client-0.1.0-py3-none-any.whl%2F..%2Fx"])
async def test_no_other_file_is_read_from_disk(tmp_path: Path, name: str) -> None:
    (tmp_path / "portcullis.toml").write_text("secret")
    async with portal(tmp_path) as client:
        answer = await client.get(f"/download/{name}")
    assert answer.status_code == 404 and "secret" not in answer.text


@pytest.mark.parametrize(("downloads", "linked"), [([], False),
                                                   (["portcullis-client.pyz"], True)])
def test_the_launch_page_links_the_client_only_once_it_is_built(downloads: list[str],
                                                                  linked: bool) -> None:
    launch = SimpleNamespace(title="Wiki", expires=datetime(2026, 1, 1, 12, 0, tzinfo=UTC))
    html = TEMPLATES.get_template("launch.html").render(
        launch=launch, url="portcullis://launch/?x", file_href="data:,",
        file_name="wiki.portcullis",
        platforms=[("linux", "Linux"), ("macos", "macOS"), ("windows", "Windows")],
        platform="linux", public_url="https://gw.example", downloads=downloads)
    assert ('href="/download/portcullis-client.pyz"' in html) is linked
    assert ("ask your administrator for <code>portcullis-client.pyz</code>" in html) is not linked
