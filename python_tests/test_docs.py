"""The documents hold together: the tests they name exist, the rendered results pages are what their CSVs render, every
relative link and anchor resolves inside the repository, nothing cites the spec outside it, and the README stays an
index whose test command is the one CI runs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", REPO / "CHANGELOG.md", *sorted((REPO / "docs").rglob("*.md"))]
RENDERED = [  # (renderer, the CSV it renders; the committed .md lies beside the CSV)
    ("benchmarks/render_backbones.py", "docs/results/backbones.csv"),
    ("benchmarks/render_label_efficiency.py", "docs/results/label_efficiency.csv"),
    ("benchmarks/render_learning_parity.py", "docs/results/learning_parity.csv"),
    ("benchmarks/render_ops.py", "docs/results/ops_cpu.csv"),
    ("benchmarks/render_patches.py", "docs/results/patches_cpu.csv"),
    ("benchmarks/render_shuffle.py", "docs/results/shuffle_cpu.csv"),
]
TEST_COMMAND = "python -m pytest python_tests -q"
README_MAX_LINES = 160
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
NUMBER = re.compile(r"\d+(?:,\d{3})*(?:\.\d+)?")  # a figure as written: 0.68, 2,200, 16,000
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
SPEC = "/".join(("shared", "spec"))  # spelt so that this file does not name it


def test_every_test_the_docs_name_exists():
    defined = {
        m for f in (REPO / "python_tests").glob("test_*.py") for m in re.findall(r"def (test_\w+)", f.read_text())
    }
    named = {(d.relative_to(REPO).as_posix(), m) for d in DOCS for m in re.findall(r"`(test_\w+)`", d.read_text())}
    assert named, "the README names no test: this check would prove nothing"
    assert sorted(name for name in named if name[1] not in defined) == []


@pytest.mark.parametrize("renderer, csv", RENDERED, ids=lambda v: Path(v).stem)
def test_the_committed_results_page_is_what_its_csv_renders(renderer, csv):
    """A number edited by hand in the .md, or a CSV updated without re-rendering, fails here with the diff."""
    run = subprocess.run([sys.executable, renderer, csv, "--check"], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, f"{csv} renders otherwise than the committed page:\n{run.stdout}{run.stderr}"


def _outside_code(text: str) -> list[str]:
    """The lines of a markdown text outside fenced code blocks, inline code spans removed."""
    lines, fence = [], False
    for line in text.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fence = not fence
            continue
        if not fence:
            lines.append(re.sub(r"`[^`]*`", "", line))
    return lines


def slugs(path: Path) -> set[str]:
    """The anchors GitHub gives the headings of ``path``: lowercase, punctuation other than - and _ dropped, spaces to
    -, a repeated slug numbered -1, -2, ..."""
    seen: dict = {}
    out = set()
    fence = False
    for line in path.read_text().splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fence = not fence
        m = None if fence else re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m is None:
            continue
        text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", m.group(1))  # a link in a heading: its text
        slug = re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def broken_links(doc: Path, root: Path = REPO) -> list[str]:
    """Each relative link of ``doc`` that names no file or folder inside ``root`` (the repository), or an anchor that
    names no heading of its markdown file."""
    bad = []
    for line in _outside_code(doc.read_text()):
        for target in LINK.findall(line):
            if SCHEME.match(target):
                continue  # http(s), mailto: not this test's business
            path, _, anchor = target.partition("#")
            where = (doc.parent / path).resolve() if path else doc
            if root not in (where, *where.parents) or not where.exists():
                bad.append(f"{target}: no such file in the repository")
            elif anchor and (where.suffix != ".md" or anchor not in slugs(where)):
                bad.append(f"{target}: no heading #{anchor} in {where.relative_to(root).as_posix()}")
    return bad


def test_github_slugs():
    """The slug rule on headings of the kind the docs use (checked against how GitHub renders these)."""
    page = REPO / "docs" / "training.md"
    assert {"the-network", "your-own-training-stage-the-trainer"} <= slugs(page)
    assert "the-run-directory-resume-and-the-gpu-options" in slugs(page)
    assert "reliability-what-is-checked" in slugs(REPO / "docs" / "testing.md")


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.relative_to(REPO).as_posix())
def test_every_relative_link_resolves(doc):
    assert broken_links(doc) == []


def test_the_link_check_finds_a_broken_link(tmp_path):
    """The checker itself: a missing file, a missing anchor, a link out of the repository (to a file that exists) are
    reported; links that resolve are not, nor is a link inside code."""
    root = tmp_path / "repo"
    (root / "docs").mkdir(parents=True)
    (tmp_path / "outside.md").write_text("# Outside\n")
    (root / "docs" / "usage.md").write_text("# Usage\n\n## Your own deformations\n")
    doc = root / "docs" / "probe.md"
    doc.write_text(
        "[a](usage.md#no-such-heading) [b](no_such_file.md) [c](../../outside.md) [d](usage.md#your-own-deformations)"
        " [e](#probe) ![f](usage.md) `[g](nowhere.md)`\n\n# Probe\n\n```\n[h](nowhere.md)\n```\n"
    )
    assert [b.split(":")[0] for b in broken_links(doc, root)] == [
        "usage.md#no-such-heading",
        "no_such_file.md",
        "../../outside.md",
    ]


def _tracked(*patterns: str) -> list[str]:
    """The repository's files matching ``patterns``: tracked, or new and not ignored (about to be committed)."""
    args = ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", *patterns]
    run = subprocess.run(args, cwd=REPO, capture_output=True, text=True, check=True)
    return sorted({p for p in run.stdout.split("\0") if p})


def _may_name_shared(path: str, text: str) -> bool:
    """CI, the Makefile and the test configuration name the optional inputs beside the checkout; so may the benchmarks
    and tests that look for optional data there."""
    if path.startswith(".ci/") or path in ("Makefile", "python_tests/conftest.py"):
        return True
    looks = re.search(r"""shared["']?\s*/\s*["']?(data|third_party)""", text)
    return path.startswith(("benchmarks/", "python_tests/")) and looks is not None


def test_nothing_cites_the_spec_outside_the_repository():
    """The spec beside the checkout (SPEC) lies outside the repository: a reader cannot follow a pointer there."""
    files = _tracked("*.md", "*.py")
    assert "README.md" in files, "git ls-files found nothing: this check would prove nothing"
    cites = []
    for path in files:
        full = REPO / path
        text = full.read_text(errors="replace") if full.exists() else ""
        if SPEC in text and not _may_name_shared(path, text):
            cites += [f"{path}:{n}" for n, line in enumerate(text.splitlines(), 1) if SPEC in line]
    assert not cites, f"{SPEC} is named by: " + ", ".join(cites)


def test_the_readme_is_an_index_whose_test_command_ci_runs():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines: move the manual to docs/"
    fenced, fence = [], None
    for line in lines:
        if line.startswith("```"):
            fence = None if fence is not None else line[3:].strip()
        elif fence == "bash":
            fenced.append(line.strip())
    assert TEST_COMMAND in fenced, f"README.md has no line `{TEST_COMMAND}` in a bash block"
    assert TEST_COMMAND in [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]


def _headline_blocks(text: str) -> list[str]:
    """The README's "Headline numbers" section, cut into blocks: each bullet (with its continuation lines), each
    table row, each other paragraph."""
    section = text.split("\n## Headline numbers", 1)[1].split("\n## ", 1)[0]
    blocks: list[str] = []
    for line in section.splitlines():
        starts = line.startswith(("- ", "| ")) or not blocks or not blocks[-1] or blocks[-1].startswith("| ")
        if not line.strip():
            blocks.append("")
        elif starts:
            blocks.append(line)
        else:
            blocks[-1] += "\n" + line
    return [b for b in blocks if b.strip()]


def test_the_readme_headline_numbers_are_those_of_the_results_pages():
    """Each headline bullet that links a rendered results page names only numbers that page holds, and each table
    row there is a line of the page it summarises (the label-efficiency table: docs/results/label_efficiency.md), so a
    re-rendered page cannot leave the README behind."""
    results = {p.name: p.read_text() for p in (REPO / "docs" / "results").glob("*.md")}
    checked, rows = 0, 0
    for block in _headline_blocks((REPO / "README.md").read_text()):
        pages = [results[Path(t).name] for t in LINK.findall(block) if t.startswith("docs/results/")]
        if block.startswith("| "):
            rows += 1
            if not set("-:| ") >= set(block):  # the separator row
                assert any(block in page.splitlines() for page in results.values()), f"not on a results page: {block}"
            continue
        if not pages:
            continue
        words = re.sub(r"\]\([^)]*\)", "]", block)  # link targets hold no figures
        on_pages = {n for page in pages for n in NUMBER.findall(page)}
        for number in NUMBER.findall(words):
            assert number in on_pages, f"{number} is not on {block!r}'s linked page"
            checked += 1
    assert checked and rows, "the headline section links no results page: this check would prove nothing"
