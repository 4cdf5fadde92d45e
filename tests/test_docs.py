"""The docs stay true to the code: the backend author's guide documents every hook with its exact
signature, and nothing else; every test that docs/guarantees.md and RELEASE.md cite as proof
exists."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

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


GUARANTEES = GUIDE.parent / "guarantees.md"
ROOT = GUIDE.parent.parent
# `path/to/test_file.py::test_name` or `...::test_name[param-id]`, as docs/guarantees.md cites.
CITATION = re.compile(r"`([\w./-]+\.py)::(\w+)(?:\[[^\]`]*\])?`")


def defined_tests(path: Path) -> set[str]:
    """Names of the test functions a file defines, at module level or in classes."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return {
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test")
    }


#: Each document that cites tests as proof, and how many citations it has at least.
CITING_DOCS = {GUARANTEES: 50, ROOT / "RELEASE.md": 8}


@pytest.mark.parametrize("doc", CITING_DOCS, ids=lambda p: p.name)
def test_every_test_cited_in_the_guarantees_exists(doc: Path):
    text = doc.read_text()
    cited = CITATION.findall(text)
    assert len(cited) >= CITING_DOCS[doc], f"{doc.name} cites its tests as `path::test_name`"
    unreadable = [
        span
        for span in re.findall(r"`[^`\n]*::[^`\n]*`", text)
        if span != "`path::test_name`" and not CITATION.fullmatch(span)
    ]
    assert unreadable == [], "cite tests as `path/to/file.py::test_name`"
    missing = []
    for path, name in cited:
        file = ROOT / path
        if not file.is_file():
            missing.append(f"{path}::{name} (no such file)")
        elif name not in defined_tests(file):
            missing.append(f"{path}::{name} (no such test in the file)")
    assert missing == [], f"{doc.name} cites tests that do not exist"


def test_citations_are_recognised_whatever_their_form():
    """The pattern is not vacuous: a parametrized id is stripped, and a bad name is caught."""
    text = "`tests/test_docs.py::test_a[x-1]` and `tests/test_docs.py::test_b`"
    assert CITATION.findall(text) == [
        ("tests/test_docs.py", "test_a"),
        ("tests/test_docs.py", "test_b"),
    ]
    assert "test_every_test_cited_in_the_guarantees_exists" in defined_tests(Path(__file__))
    assert "test_no_such_thing" not in defined_tests(Path(__file__))
