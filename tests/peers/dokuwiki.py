"""DokuWiki from Debian (the `dokuwiki` package), run as a private instance: php-fpm and
nginx started by the test on a free loopback port, with their own configuration, and the
wiki's configuration and data in a temporary directory. Never the system's services.

How it is put together:
- Debian's DokuWiki reads its defaults from /etc/dokuwiki and its local settings from
  DOKU_CONF; php-fpm prepends a file defining DOKU_CONF to our directory, whose
  local.php points `savedir` at a fresh, writable data directory (DokuWiki wants only the
  empty sub-directories; it writes every page, lock and cache itself).
- ACLs are off, so anyone may edit: the test is about the proxy, not DokuWiki's users.
  DokuWiki still keeps a PHP session (cookie "DokuWiki") and ties the edit form's
  security token to it, so a save works only if the cookie made the round trip; after
  a save it answers with a redirect (303) to the page, as an absolute URL built from the
  Host it was sent.
- nginx logs every request it receives to access.log: what reached the upstream.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import time
from pathlib import Path

import httpx

from conftest import Process, free_port, require_program
from peers.missing import missing_peer

DOKUWIKI = Path("/usr/share/dokuwiki")
DEBIAN_CONF = Path("/etc/dokuwiki")
START_TIMEOUT = 20.0
DATA_DIRECTORIES = ("pages", "attic", "media", "media_attic", "meta", "media_meta",
                    "cache", "index", "locks", "tmp", "log")
# Files of Debian's configuration that are links into /var/lib/dokuwiki (readable by
# www-data only); unused with ACLs off.
PRIVATE_CONF = ("acl.auth.php", "users.auth.php")


def php_fpm_program() -> str:
    """Debian names php-fpm after the PHP version (php-fpm8.2); take the newest."""
    found = sorted(glob.glob("/usr/sbin/php-fpm*"))
    if not found:
        missing_peer("php-fpm is not installed (run 'make peers' as root)")
    return found[-1]


class DokuWiki:
    """A running DokuWiki at `url` (http://127.0.0.1:PORT/doku.php)."""

    def __init__(self, directory: Path, *, baseurl: str = "") -> None:
        if not (DOKUWIKI / "doku.php").exists():
            missing_peer("dokuwiki is not installed (run 'make peers' as root)")
        self.directory = directory
        self.baseurl = baseurl
        self.port = free_port()
        self.data = directory / "data"
        self.access_log = directory / "access.log"
        self._processes: list[Process] = []

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def page_text(self, page: str) -> str:
        """The saved wiki text of `page` (as DokuWiki stores it), "" if never saved."""
        path = self.data / "pages" / f"{page.replace(':', '/')}.txt"
        return path.read_text() if path.exists() else ""

    def requests_received(self) -> list[str]:
        """Every request line nginx received (method and target), in order."""
        if not self.access_log.exists():
            return []
        return [line.split('"')[1] for line in self.access_log.read_text().splitlines()
                if line.count('"') >= 2]

    def start(self) -> DokuWiki:
        self.directory.mkdir(parents=True, exist_ok=True)
        try:
            self._write_wiki_config()
            self._start_php_fpm()
            self._start_nginx()
            self._wait_until_answering()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        for process in reversed(self._processes):
            process.stop()
        self._processes.clear()

    def __enter__(self) -> DokuWiki:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.close()

    def _write_wiki_config(self) -> None:
        conf = self.directory / "conf"
        shutil.copytree(DEBIAN_CONF, conf,
                        ignore=lambda _dir, names: [n for n in names if n in PRIVATE_CONF])
        (conf / "local.php").write_text(
            "<?php\n"
            "$conf['title'] = 'Portcullis test wiki';\n"
            f"$conf['savedir'] = '{self.data}';\n"
            "$conf['useacl'] = 0;\n"
            "$conf['lang'] = 'en';\n"
            "$conf['updatecheck'] = 0;\n"
            "$conf['dnslookups'] = 0;\n"
            "$conf['userewrite'] = 0;\n"
            # Behind a reverse proxy: the public address, for the absolute URLs DokuWiki
            # writes (redirects); empty, it builds them from the request's Host.
            f"$conf['baseurl'] = '{self.baseurl}';\n")
        for name in DATA_DIRECTORIES:
            (self.data / name).mkdir(parents=True, exist_ok=True)
        (self.directory / "prepend.php").write_text(
            f"<?php define('DOKU_CONF', '{conf}/');\n")
        (self.directory / "sessions").mkdir(exist_ok=True)

    def _start_php_fpm(self) -> None:
        user = pwd.getpwuid(os.geteuid()).pw_name
        config = self.directory / "php-fpm.conf"
        config.write_text(
            "[global]\n"
            f"pid = {self.directory}/php-fpm.pid\n"
            f"error_log = {self.directory}/php-fpm-error.log\n"
            "daemonize = no\n"
            "[dokuwiki]\n"
            # `user` only counts when started as root (and -R allows that); the pool then
            # runs as root too, so nginx's workers (same user) may use the socket.
            f"user = {user}\n"
            f"listen = {self.directory}/php-fpm.sock\n"
            "listen.mode = 0600\n"
            "pm = static\n"
            "pm.max_children = 4\n"
            "catch_workers_output = yes\n"
            f"php_admin_value[auto_prepend_file] = {self.directory}/prepend.php\n"
            f"php_admin_value[session.save_path] = {self.directory}/sessions\n"
            f"php_admin_value[error_log] = {self.directory}/php-error.log\n")
        args = ["--nodaemonize", "--fpm-config", str(config)]
        if os.geteuid() == 0:
            args.append("--allow-to-run-as-root")
        self._processes.append(Process(args, self.directory / "php-fpm.log",
                                       program=php_fpm_program(), group=True))

    def _start_nginx(self) -> None:
        user = pwd.getpwuid(os.geteuid()).pw_name
        here = self.directory
        config = here / "nginx.conf"
        config.write_text(
            # `user` is ignored (with a warning) unless started as root; as root it keeps
            # the workers in our user, which owns the temporary directory.
            f"daemon off;\nworker_processes 1;\nuser {user};\npid {here}/nginx.pid;\n"
            f"error_log {here}/nginx-error.log info;\n"
            "events { worker_connections 256; }\n"
            "http {\n"
            "  include /etc/nginx/mime.types;\n"
            f"  access_log {self.access_log};\n"
            f"  client_body_temp_path {here}/body;\n  fastcgi_temp_path {here}/fastcgi;\n"
            f"  proxy_temp_path {here}/proxy;\n  uwsgi_temp_path {here}/uwsgi;\n"
            f"  scgi_temp_path {here}/scgi;\n"
            "  server {\n"
            f"    listen 127.0.0.1:{self.port};\n"
            f"    root {DOKUWIKI};\n"
            "    index doku.php;\n"
            # As Debian's Apache configuration: the code and data are not for the web.
            "    location ~ ^/(bin|conf|data|inc|vendor)/ { deny all; }\n"
            "    location ~ \\.php$ {\n"
            "      include /etc/nginx/fastcgi_params;\n"
            "      fastcgi_param SCRIPT_FILENAME $document_root$fastcgi_script_name;\n"
            f"      fastcgi_pass unix:{here}/php-fpm.sock;\n"
            "    }\n"
            "  }\n"
            "}\n")
        nginx = require_program("nginx")
        self._processes.append(Process(["-p", str(here), "-e", "stderr", "-c", str(config)],
                                       here / "nginx.log", program=nginx, group=True))

    def _wait_until_answering(self) -> None:
        """Until doku.php renders the start page (php-fpm and nginx both up)."""
        deadline = time.monotonic() + START_TIMEOUT
        last = ""
        while time.monotonic() < deadline:
            for process in self._processes:
                if process.popen.poll() is not None:
                    raise RuntimeError(f"{process.popen.args[0]} exited "
                                       f"{process.popen.returncode}:\n{process.output()}")
            try:
                response = httpx.get(f"{self.origin}/doku.php", timeout=2)
                if response.status_code == 200 and "Portcullis test wiki" in response.text:
                    return
                last = f"{response.status_code} {response.text[:500]}"
            except httpx.HTTPError as exc:
                last = repr(exc)
            time.sleep(0.05)
        raise RuntimeError(f"DokuWiki did not answer within {START_TIMEOUT} s: {last}")
