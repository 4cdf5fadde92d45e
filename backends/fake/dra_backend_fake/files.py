"""Reading the fake backend's YAML files (inventory, control file) with bounds.

The files are read with :func:`dra_core.read_regular_file`: a FIFO, a device or a directory
in their place is refused at once (it could block forever or never end), and so is a file
larger than the limit. The YAML is then held to bounds before any of it is used: YAML aliases
let a few hundred bytes stand for a document of billions of nodes (whose validation would
never end), and nesting deep enough overflows the parser's recursion. A file past a bound is
an error that names it and the bound.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

import yaml

from dra_core import BoundedReadError, read_regular_file

__all__ = ("MAX_DEPTH", "MAX_NODES", "load_yaml_file")

#: The most YAML nodes a file may stand for once its aliases are expanded.
MAX_NODES: Final = 200_000
#: The deepest nesting of mappings and lists a file may have.
MAX_DEPTH: Final = 32


def load_yaml_file(path: Path, what: str, limit: int, error: type[ValueError]) -> object:
    """The YAML document in ``path`` (None when empty), within the bounds above.

    :param what: names the file in messages (``control file``, ``inventory file``).
    :param limit: the most bytes read.
    :param error: the ValueError subclass raised, its message naming ``what`` and ``path``.
    :raises FileNotFoundError: ``path`` does not exist (the caller decides what that means).
    """
    try:
        text = read_regular_file(path, limit).decode("utf-8")
    except FileNotFoundError:
        raise
    except BoundedReadError as exc:
        msg = f"{what} {path}: {exc.problem}"
        raise error(msg) from None
    except OSError as exc:
        msg = f"{what} {path}: cannot be read: {exc.strerror or exc}"
        raise error(msg) from None
    except UnicodeDecodeError as exc:
        msg = f"{what} {path}: not UTF-8 text (byte {exc.start}: {exc.reason})"
        raise error(msg) from None
    try:
        return _load(text)
    except yaml.YAMLError as exc:
        msg = f"{what} {path}: not valid YAML: {exc}"
        raise error(msg) from None
    except _TooBig as exc:
        msg = f"{what} {path}: {exc}"
        raise error(msg) from None
    except RecursionError:
        msg = f"{what} {path}: nested too deeply (more than {MAX_DEPTH} levels)"
        raise error(msg) from None


def _load(text: str) -> object:
    loader = yaml.SafeLoader(text)  # refuses control characters already
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_size(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


class _TooBig(Exception):
    pass


def _check_size(root: yaml.Node) -> None:
    """Refuse a document deeper than MAX_DEPTH or larger than MAX_NODES once expanded."""
    sizes: dict[int, int] = {}  # expanded size by node id: an alias is counted, not walked
    in_progress: set[int] = set()

    def size(node: yaml.Node, depth: int) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if depth > MAX_DEPTH:
            msg = f"nested more than {MAX_DEPTH} levels deep"
            raise _TooBig(msg)
        if key in in_progress:
            msg = "an alias refers to a node that contains it (the document is endless)"
            raise _TooBig(msg)
        in_progress.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(child, depth + 1) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(size(k, depth + 1) + size(v, depth + 1) for k, v in node.value)
        in_progress.discard(key)
        if total > MAX_NODES:
            msg = f"stands for more than {MAX_NODES} values once its aliases are expanded"
            raise _TooBig(msg)
        sizes[key] = total
        return total

    size(root, 0)
