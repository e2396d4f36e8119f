"""The documents' claims about the tests name tests that exist: a renamed or removed test fails here, not silently
in the README's Reliability section."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_test_the_docs_name_exists():
    defined = {
        m for f in (REPO / "python_tests").glob("test_*.py") for m in re.findall(r"def (test_\w+)", f.read_text())
    }
    docs = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    named = {(d.name, m) for d in docs for m in re.findall(r"`(test_\w+)`", d.read_text())}
    assert named, "the README names no test: this check would prove nothing"
    assert sorted(name for name in named if name[1] not in defined) == []
