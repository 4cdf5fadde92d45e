"""The project's names for the fixtures of the shipped pytest plugin (dra_core.testing.plugin).

The control plane itself (binaries provided before the first test, one per session, the
release from ``DRA_K8S_VERSION`` and its gates from ``DRA_TEST_GATES``) comes from that plugin;
these fixtures give its pieces the names the tests use:

  * ``control_plane`` (session): the started :class:`ControlPlane`.
  * ``kube_api`` (session): a ``kubernetes.client.ApiClient`` for it (system:masters), for the
    helpers of :mod:`tests.controlplane.helpers`.
  * ``namespace`` (function): a fresh namespace (with its ``default`` ServiceAccount), deleted
    afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from dra_core.testing.controlplane import ControlPlane


@pytest.fixture(scope="session")
def control_plane(dra_control_plane: ControlPlane) -> ControlPlane:
    return dra_control_plane


@pytest.fixture(scope="session")
def kube_api(dra_control_plane: ControlPlane) -> Iterator[Any]:
    api = dra_control_plane.api_client()
    try:
        yield api
    finally:
        api.close()


@pytest.fixture
def namespace(dra_namespace: str) -> str:
    return dra_namespace
