"""The README and the manual under docs/ link only to files of this repository that exist (and to headings
that exist in them), and the README stays a front page of under 10,000 characters."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_LIMIT = 10_000

# Pages that another branch adds. Linked already; a missing one is tolerated until it lands, after which it
# is checked like any other page. Remove the entry once the page is on main.
PENDING = {ROOT / "docs" / "robustness.md"}

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # http:, https:, mailto:, ...


def links(page: Path) -> list[str]:
    """The targets of the page's inline links and images, outside code blocks and code spans."""
    text = CODE_SPAN.sub("", FENCE.sub("", page.read_text(encoding="utf-8")))
    return LINK.findall(text)


def anchors(page: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped (not - or _), spaces to -, repeats numbered."""
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    ids = set()
    for heading in HEADING.findall(text):
        slug = re.sub(r"[^\w\- ]", "", heading.replace("`", "").strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        ids.add(slug if count == 0 else f"{slug}-{count}")
    return ids


def test_the_pages_exist() -> None:
    assert (ROOT / "README.md").is_file()
    assert len(PAGES) > 5, "the manual under docs/ is missing"


def problems(page: Path, root: Path = ROOT) -> list[str]:
    """What is wrong with the page's relative links: a target outside ``root``, a missing file or heading."""
    found = []
    for target in links(page):
        if EXTERNAL.match(target):
            continue
        path, _, fragment = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.is_relative_to(root):
            found.append(f"{target}: outside the repository")
        elif not resolved.exists():
            if resolved not in PENDING:
                found.append(f"{target}: no such file")
        elif fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
            found.append(f"{target}: no heading #{fragment} in {resolved.relative_to(root)}")
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve_inside_the_repository(page: Path) -> None:
    found = problems(page)
    assert not found, f"{page.relative_to(ROOT)}: " + "; ".join(found)


def test_the_readme_is_a_front_page() -> None:
    size = len((ROOT / "README.md").read_text(encoding="utf-8"))
    assert size < README_LIMIT, f"README.md has {size} characters; move details into docs/ (limit {README_LIMIT})"


def test_the_checker_catches_bad_links(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        '# A `code` heading: yes\n[a](other.md) ![b](pic.png "title") [c](https://x.org/y) `[d](in-code.md)`\n'
        "```\n[e](in-fence.md)\n```\n"
    )
    assert links(page) == ["other.md", "pic.png", "https://x.org/y"]
    assert anchors(page) == {"a-code-heading-yes"}
    (tmp_path / "pic.png").write_bytes(b"")
    page.write_text("# Top\n[ok](#top) [x](#nowhere) ![p](pic.png) [m](missing.md) [out](../../etc/passwd)\n")
    assert problems(page, root=tmp_path) == [
        "#nowhere: no heading #nowhere in page.md",
        "missing.md: no such file",
        "../../etc/passwd: outside the repository",
    ]
