"""The backend author's guide documents every hook with its exact signature, and nothing else."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from dra_core import hookspecs

GUIDE = Path(__file__).parent.parent / "docs" / "backend-guide.md"


def specs() -> dict[str, str]:
    """Each hookspec's documented signature, e.g. 'dra_discover(context)'."""
    found = {}
    for name, function in inspect.getmembers(hookspecs, inspect.isfunction):
        if hasattr(function, "dra_spec"):
            found[name] = f"{name}({', '.join(inspect.signature(function).parameters)})"
    return found


def test_every_hookspec_has_a_docstring_with_its_arguments():
    for name, signature in specs().items():
        doc = inspect.getdoc(getattr(hookspecs, name)) or ""
        assert doc, f"{name} has no docstring"
        for parameter in inspect.signature(getattr(hookspecs, name)).parameters:
            assert f":param {parameter}:" in doc, f"{signature}: :param {parameter}: undocumented"
        assert "Raising" in doc or "Raise " in doc, f"{name}: say what raising means"


def test_guide_documents_every_hook_with_its_signature():
    headings = set(re.findall(r"^### `(dra_\w+\([^)]*\))`$", GUIDE.read_text(), re.MULTILINE))
    expected = set(specs().values())
    assert expected - headings == set(), "hooks missing from docs/backend-guide.md"
    assert headings - expected == set(), "docs/backend-guide.md documents hooks that drifted"
