"""``python -m dra_backend_i915``: print what this node would publish, without a cluster.

A stand-alone cousin of ``dra-core discover --backend i915`` for trying the backend on a
fake tree: ``python -m dra_backend_i915 --sysfs-root DIR/sys --devfs-root DIR/dev``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence

import yaml

from dra_backend_i915 import DRIVER_NAME, plugin
from dra_core import NodeContext

__all__ = ("main",)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the backend's options, discover, print the inventory and health as YAML."""
    parser = argparse.ArgumentParser(prog="python -m dra_backend_i915", description=__doc__)
    backend = plugin.I915Backend()
    for option in plugin.OPTIONS:
        parser.add_argument(f"--{option.name}", default=option.default, help=option.help)
    parser.add_argument("--node-name", default="node-1")
    args = vars(parser.parse_args(argv))
    node = args.pop("node_name")
    context = NodeContext(node_name=node, driver_name=DRIVER_NAME, options=args)
    try:
        backend.start(context)
        inventory = backend.discover(context)
    except (RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    health = backend.health(inventory, context)
    document = {
        "devices": [_plain(d) for d in inventory.devices],
        "counterSets": [_plain(s) for s in inventory.counter_sets],
        "unhealthy": [_plain(h) for h in health if not h.healthy],
    }
    yaml.safe_dump(document, sys.stdout, sort_keys=False)
    return 0


def _plain(value: object) -> object:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: _plain(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if getattr(value, f.name) not in (None, (), {}, False, "")
        }
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, bool | int | str | float) or value is None:
        return value
    return str(value)


if __name__ == "__main__":
    raise SystemExit(main())
