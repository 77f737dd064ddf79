"""How many workers a node runs (`[gateway] workers`), and which settings hold it to one."""

from __future__ import annotations

import os
from typing import Any

import pytest

from portcullis.config.model import Settings
from portcullis.errors import ConfigError
from portcullis.node import ListenAddress, listen_addresses
from portcullis.workers import planned_workers

REDIS = "redis://127.0.0.1:6379/0"
MEMORY = {"ephemeral": "memory://"}
UP = ("gateway", "portal", "sta", "shadow-hub")


def settings(**sections: Any) -> Settings:
    return Settings.model_validate(sections)


def test_unset_means_one_worker_per_core_on_a_shared_store() -> None:
    plan = planned_workers(settings(store={"ephemeral": REDIS}), UP)
    assert plan.count == (os.cpu_count() or 1) and not plan.explicit


def test_unset_means_one_worker_per_core_on_the_default_embedded_store() -> None:
    plan = planned_workers(settings(), UP)
    assert plan.count == (os.cpu_count() or 1) and plan.single_reason is None


def test_unset_means_one_worker_on_a_memory_store_and_says_why() -> None:
    plan = planned_workers(settings(store=MEMORY), UP)
    assert plan.count == 1 and "memory://" in (plan.single_reason or "")


def test_several_workers_on_a_memory_store_are_a_config_error_naming_the_key() -> None:
    with pytest.raises(ConfigError) as raised:
        planned_workers(settings(store=MEMORY, gateway={"workers": 2}), UP)
    assert raised.value.key == "gateway.workers"
    assert "memory://" in str(raised.value) and "workers = 1" in str(raised.value)


def test_dial_out_relays_hold_the_edge_to_one_worker() -> None:
    dial_out = {"via": "relay", "mode": "dial-out"}
    plan = planned_workers(settings(store={"ephemeral": REDIS}, dialer=dial_out), UP)
    assert plan.count == 1 and "dial-out relays" in (plan.single_reason or "")
    with pytest.raises(ConfigError, match="dial-out relays"):
        planned_workers(settings(store={"ephemeral": REDIS}, dialer=dial_out,
                                 gateway={"workers": 4}), UP)


def test_an_explicit_count_is_kept_and_one_is_always_allowed() -> None:
    assert planned_workers(settings(store={"ephemeral": REDIS},
                                    gateway={"workers": 3}), UP).count == 3
    assert planned_workers(settings(gateway={"workers": 1}), UP).count == 1


def test_workers_must_be_at_least_one() -> None:
    with pytest.raises(ValueError, match="workers"):
        settings(gateway={"workers": 0})


def test_the_listeners_are_known_without_building_the_node() -> None:
    configured = settings(gateway={"listen": "127.0.0.1:9443"}, sta={"listen": "127.0.0.1:9445"},
                          portal={"listen": "127.0.0.1:9444"},
                          shadow={"listen": "127.0.0.1:9446"})
    assert listen_addresses(configured, UP) == [
        ListenAddress("sta", "127.0.0.1", 9445), ListenAddress("shadow-hub", "127.0.0.1", 9446),
        ListenAddress("gateway", "127.0.0.1", 9443)]
    # Without the gateway, the portal listens on its own.
    assert listen_addresses(configured, ("portal",)) == [
        ListenAddress("portal", "127.0.0.1", 9444)]
