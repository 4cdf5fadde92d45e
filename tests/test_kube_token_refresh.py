"""The kubernetes client's token refresh hook runs at most once a second, not per request."""

from __future__ import annotations

import time
from typing import Any

from kubernetes import client

from dra_core.kube.client import _refresh_at_most_every


def test_the_refresh_hook_runs_at_most_once_per_period_and_stays_throttled() -> None:
    configuration: Any = client.Configuration()
    calls: list[float] = []

    def hook(target: Any) -> None:
        calls.append(time.monotonic())
        target.refresh_api_key_hook = hook  # as the kubernetes client's hooks do

    configuration.refresh_api_key_hook = hook
    _refresh_at_most_every(configuration, 0.2)
    for _ in range(5):
        configuration.refresh_api_key_hook(configuration)
    assert len(calls) == 1
    assert configuration.refresh_api_key_hook is not hook, "installed again, still throttled"
    time.sleep(0.25)
    for _ in range(5):
        configuration.refresh_api_key_hook(configuration)
    assert len(calls) == 2


def test_no_hook_is_left_alone() -> None:
    configuration: Any = client.Configuration()
    _refresh_at_most_every(configuration, 1.0)
    assert configuration.refresh_api_key_hook is None
