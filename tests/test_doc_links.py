"""Every relative link in README.md, docs/ and the studies' records in experiments/ resolves: the file exists, and an anchor names a heading of the file it
points into (GitHub's anchors: the heading in lower case, without punctuation but `-` and `_`, spaces as `-`, a
repeated heading numbered `-1`, `-2`, ...) or an `<a id="...">` in it. Links in fenced code blocks and in inline code
are text, not links."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import REPO_ROOT

LINK = re.compile(r"\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^()\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
HTML_ANCHOR = re.compile(r"<a\s+(?:id|name)=\"([^\"]+)\"")


def _prose(path: Path) -> list[tuple[int, str]]:
    """(line number, line) of each line outside fenced code blocks."""
    lines, fenced = [], False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            lines.append((number, line))
    return lines


def anchors(path: Path) -> set[str]:
    """The anchors GitHub gives the headings of a Markdown file, and its HTML anchors."""
    seen: dict[str, int] = {}
    out = set()
    for _, line in _prose(path):
        out.update(HTML_ANCHOR.findall(line))
        match = HEADING.match(line)
        if not match:
            continue
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", match.group(2))  # a link in a heading: its text
        slug = re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        out.add(slug if count == 0 else f"{slug}-{count}")
    return out


def _documents() -> list[Path]:
    return [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md")),
            *sorted((REPO_ROOT / "experiments").rglob("*.md"))]


@pytest.mark.parametrize("document", _documents(), ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_every_relative_link_resolves(document):
    broken = []
    for number, line in _prose(document):
        for target in LINK.findall(re.sub(r"`[^`]*`", "", line)):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
                continue
            path, _, anchor = target.partition("#")
            where = (document.parent / path).resolve() if path else document
            if not where.exists():
                broken.append(f"line {number}: {target}: no such file")
            elif anchor and where.suffix == ".md" and anchor not in anchors(where):
                broken.append(f"line {number}: {target}: no heading with that anchor in {where.name}")
    assert not broken, f"{document.name}: " + "; ".join(broken)


def test_anchors_follow_githubs_rule():
    """The anchor rule on headings whose anchors GitHub shows (checked by hand on github.com)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "page.md"
        page.write_text("# `internvlx bench`\n## LVTC on vLLM: what the saving path saves (issue 56)\n"
                        "## Tests\n```\n## not a heading\n```\n## Tests\n### With vLLM's defaults (on)\n"
                        '<a id="by-hand"></a>**A paragraph.**\n')
        assert anchors(page) == {"internvlx-bench", "lvtc-on-vllm-what-the-saving-path-saves-issue-56", "tests",
                                 "tests-1", "with-vllms-defaults-on", "by-hand"}
