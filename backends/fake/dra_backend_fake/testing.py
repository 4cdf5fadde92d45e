"""Helpers for tests that drive the fake backend: contexts, claims, control-file writes.

Usable by any test suite (the core's, a CI harness): they build only public ``dra_core``
values and files.
"""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from dra_backend_fake import DRIVER_NAME
from dra_core import (
    AllocatedClaim,
    AllocatedDevice,
    ClaimRef,
    NodeContext,
    PreparedClaim,
    PreparedDevice,
)

__all__ = ("NODE", "allocated_claim", "node_context", "prepared_claim", "write_control")

#: The node name (and pool name) the helpers use.
NODE = "node-1"

_ticks = itertools.count(1)


def node_context(
    *,
    rediscover: Callable[[], None] | None = None,
    config: Mapping[str, Any] | None = None,
    **options: object,
) -> NodeContext:
    """A context with backend options given as keywords (``control_file=path``), keyed with
    underscores as the CLI passes them."""
    opts = {k.replace("-", "_"): (None if v is None else str(v)) for k, v in options.items()}
    if rediscover is None:
        return NodeContext(
            node_name=NODE, driver_name=DRIVER_NAME, options=opts, config=config or {}
        )
    return NodeContext(
        node_name=NODE,
        driver_name=DRIVER_NAME,
        options=opts,
        config=config or {},
        request_rediscovery=rediscover,
    )


def allocated_claim(
    *devices: str | tuple[Any, ...],
    configs: Mapping[str, tuple[object, ...]] | None = None,
    uid: str | None = None,
    name: str = "claim",
) -> AllocatedClaim:
    """A claim allocating ``devices``: device names (request ``req<i>``), or tuples
    ``(request, device)`` / ``(request, device, share_id, consumed_capacity)``."""
    allocated = []
    for index, spec in enumerate(devices):
        request, device, *rest = (f"req{index}", spec) if isinstance(spec, str) else spec
        allocated.append(
            AllocatedDevice(
                request=str(request),
                pool=NODE,
                device=str(device),
                share_id=rest[0] if rest else None,
                consumed_capacity=rest[1] if len(rest) > 1 else {},
            )
        )
    ref = ClaimRef(namespace="default", name=name, uid=uid or str(uuid.uuid4()))
    return AllocatedClaim(ref=ref, devices=tuple(allocated), configs=configs or {})


def prepared_claim(claim: AllocatedClaim, devices: list[PreparedDevice]) -> PreparedClaim:
    """The checkpoint's record of ``claim`` prepared as ``devices``."""
    return PreparedClaim(ref=claim.ref, devices=tuple(devices))


def write_control(path: Path, content: str | Mapping[str, Any]) -> None:
    """Write a control file (YAML text or a mapping) and step its mtime forward.

    Two writes within the file system's timestamp granularity would otherwise look unchanged.
    """
    text = content if isinstance(content, str) else yaml.safe_dump(dict(content))
    path.write_text(text)
    stamp = 1_700_000_000_000_000_000 + next(_ticks) * 1_000_000_000
    os.utime(path, ns=(stamp, stamp))
