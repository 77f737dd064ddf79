"""TOTP codes from the real `oathtool` (OATH Toolkit), as an authenticator app shows
them."""

from __future__ import annotations

import subprocess
import time

from conftest import require_program


def oathtool_code(secret: str, at: float | None = None, *, digits: int = 6,
                  algorithm: str = "sha1", period: int = 30, base32: bool = True) -> str:
    """The code `oathtool` computes for `secret` (base32, or hex with base32=False) at
    Unix time `at`, now by default. Under CI a missing oathtool fails the test; elsewhere
    it skips it."""
    program = require_program("oathtool")
    mode = "--totp" if algorithm == "sha1" else f"--totp={algorithm}"
    moment = time.time() if at is None else at
    args = [program, mode, "-d", str(digits), "-s", f"{period}s", "-N", f"@{int(moment)}"]
    if base32:
        args.append("-b")
    result = subprocess.run([*args, secret], capture_output=True, text=True, timeout=10,
                            check=True)
    return result.stdout.strip()
