"""The command line the results renderers share: render a committed CSV into its markdown page, or, with ``--check``,
write nothing and exit 1 with a diff when the committed page differs from what the CSV renders (CI)."""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"


def parse(description: str, csv_help: str, argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("csv", type=Path, help=csv_help)
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if OUT_DIR's .md is not the CSV's")
    return p.parse_args(argv)


def write_or_check(md: Path, text: str, check: bool) -> int:
    """Write the page (0), or compare it with the committed one (0 when equal, 1 with the diff printed)."""
    if check:
        old = md.read_text() if md.exists() else ""
        sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), text.splitlines(True), str(md), "rendered"))
        return int(old != text)
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(text)
    print(text)
    return 0
