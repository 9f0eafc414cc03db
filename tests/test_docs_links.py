"""Links inside the README and docs/: every relative link names a file of the repository, and
every #anchor a heading of the file it points into (GitHub's heading ids)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", flags=re.DOTALL | re.MULTILINE)


def heading_id(heading: str) -> str:
    """GitHub's id of a Markdown heading: lower case, punctuation dropped (hyphens and
    underscores kept), spaces as hyphens."""
    text = re.sub(r"`", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def heading_ids(document: Path) -> set[str]:
    text = FENCE.sub("", document.read_text(encoding="utf-8"))
    return {heading_id(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, re.MULTILINE)}


def relative_links(document: Path) -> list[str]:
    text = FENCE.sub("", document.read_text(encoding="utf-8"))
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]


def test_heading_id_follows_github():
    assert heading_id("Runs of 10,000–100,000 stimuli") == "runs-of-10000100000-stimuli"
    assert heading_id("The report's cost") == "the-reports-cost"
    assert heading_id("GPA's stopping rule: at the optimum") == "gpas-stopping-rule-at-the-optimum"
    assert heading_id("`runtime_env` on workers") == "runtime_env-on-workers"


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.name)
def test_every_relative_link_resolves(document):
    broken = []
    for target in relative_links(document):
        path, _, anchor = target.partition("#")
        file = (document.parent / path).resolve() if path else document
        if not file.exists():
            broken.append(f"{target}: no file {file.relative_to(REPO)}")
        elif anchor and file.suffix == ".md" and anchor not in heading_ids(file):
            broken.append(f"{target}: no heading with id {anchor!r} in {file.name}")
    assert not broken, f"{document.name} has broken links:\n" + "\n".join(broken)
