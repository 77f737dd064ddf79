"""A real relying party for the gateway's OpenID provider: the npm package openid-client
(pinned in tests/peers/node), driven one step at a time by openid_client_rp.mjs.

The test plays the browser between `start` (the authorization URL) and `callback` (the
URL the gateway redirected to); everything an application does is openid-client's own
code: discovery, PKCE S256, state and nonce checks, the ID token's signature and claims,
userinfo, refresh.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peers.missing import missing_peer

HERE = Path(__file__).parent
SCRIPT = HERE / "openid_client_rp.mjs"
PACKAGE = HERE / "node" / "node_modules" / "openid-client" / "package.json"


@dataclass
class RelyingParty:
    issuer: str
    ca: Path                  # the deployment CA, which signs the gateway's certificate
    client_id: str
    redirect_uri: str
    client_secret: str | None = None
    scope: str = "openid profile email groups"

    def run(self, step: str, **fields: Any) -> dict[str, Any]:
        node = shutil.which("node")
        if node is None or not PACKAGE.exists():
            missing_peer("node or the npm package openid-client is missing "
                         "(run scripts/install-peers)")
        request = {"issuer": self.issuer, "client_id": self.client_id,
                   "client_secret": self.client_secret, "redirect_uri": self.redirect_uri,
                   "scope": self.scope, **fields}
        result = subprocess.run(
            [node, str(SCRIPT), step], input=json.dumps(request), capture_output=True,
            text=True, timeout=30, env={**os.environ, "NODE_EXTRA_CA_CERTS": str(self.ca)})
        assert result.returncode == 0, result.stderr
        answer: dict[str, Any] = json.loads(result.stdout)
        return answer
