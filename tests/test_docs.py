"""The README stays a newcomer's page: under 200 lines, its two set-up commands, and every link inside the repository
resolving (docs/ too)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parents[1]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_readme_is_short_and_keeps_its_two_commands():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) < 200
    assert 'pip install ".[cpu]" && diffrt generate' in text
    assert 'pip install -e ".[dev]" && python -m pytest -q' in text
    assert "../shared" not in text


def test_every_link_resolves_inside_the_repository():
    for page in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+://", target):
                continue
            path = (page.parent / target).resolve()
            assert path.exists(), f"{page.relative_to(ROOT)} links to {target}, which does not exist"
            assert ROOT.resolve() in path.parents, f"{page.relative_to(ROOT)} links outside the repository: {target}"
