"""`[dialer]` is read when the node starts: a reload says that a change needs a restart."""

from __future__ import annotations

import signal

from conftest import Deployment, Process


def test_a_reload_says_a_changed_dialer_needs_a_restart(deployment: Deployment,
                                                        gateway: Process) -> None:
    with deployment.config.open("a") as handle:
        handle.write('\n[dialer]\nvia = "direct"\ntimeout = 7.5\n')
    gateway.popen.send_signal(signal.SIGHUP)
    reloaded = gateway.wait_for(r"configuration reloaded.*")
    assert "needs_restart=['dialer']" in reloaded.group(0)
