"""The repository is self-contained: no pointer to notes outside it, and no broken link in its docs.

A user who clones the project gets only the tracked files, so every file a source comment, a config or a doc
refers to must be one of them. These checks read text files only (no model, no torch): well under a second,
so they are not marked slow and run in the quick `-m "not slow"` selection too.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
THIS = Path(__file__).resolve()

# A document cited by name: a Markdown file ("NOTES.md", "docs/x.md"), or an upper-case note name with a section
# number ("GUIDE section 3"). Either must be a file the repository tracks, or a clone lacks it. A quoted
# name ("report.md" in code) is a file the code writes, not a citation.
CITED_MARKDOWN = re.compile(r"(?<![\w/.\"'-])((?:\.\./|[\w.-]+/)*[\w.-]+\.md)\b")
CITED_SECTION = re.compile(r"\b([A-Z][A-Z_]{2,})\s+section\s+\d")

# Markdown links: inline [text](target "title") and ![alt](target), and reference definitions [id]: target.
INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
# A pointer into the docs written in plain text (source comments, configs): docs/NAME.md#anchor.
DOC_ANCHOR = re.compile(r"\b(docs/[\w.-]+\.md)#([\w-]+)")
FENCE = re.compile(r"^\s{0,3}(```|~~~)")


def _git_files() -> list[str]:
    """Tracked paths (relative to the repository root); skips the test outside a git checkout."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"not a git checkout, or git is missing: {exc}")
    return [p for p in out.stdout.decode("utf-8", "surrogateescape").split("\0") if p]


def _text(path: Path) -> str | None:
    """The file's text, or None for a binary (NUL bytes or not UTF-8) or a file deleted in the work tree."""
    try:
        data = path.read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        return None
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _tracked_lines():
    """(path, line number, line) of every tracked text file but this one."""
    for rel in _git_files():
        path = ROOT / rel
        if path.resolve() == THIS:
            continue
        text = _text(path)
        if text is not None:
            for no, line in enumerate(text.splitlines(), 1):
                yield rel, no, line


def _prose_lines(text: str):
    """(line number, line) outside fenced code blocks, with inline code spans blanked out."""
    in_fence = False
    for no, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        if not in_fence:
            yield no, re.sub(r"`+[^`]*`+", "", line)


def _slug(heading: str) -> str:
    """The anchor GitHub gives a heading: link text kept, punctuation dropped, lower case, spaces -> '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(md: Path) -> set[str]:
    """Every anchor of a Markdown file's headings (repeated headings get -1, -2, ... as on GitHub)."""
    seen: dict[str, int] = {}
    out = set()
    in_fence = False
    for line in md.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        m = re.match(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if in_fence or not m:
            continue
        slug = _slug(m.group(1))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def _tracked_or_parent(rel: str, tracked: set[str], tracked_dirs: set[str]) -> bool:
    return rel in tracked or rel.rstrip("/") in tracked_dirs


def _missing_citations(line: str, names: set[str], stems: set[str]) -> list[str]:
    """The documents `line` cites that are not among the tracked file names / Markdown stems."""
    missing = [m for m in CITED_MARKDOWN.findall(line) if Path(m).name not in names]
    return missing + [m for m in CITED_SECTION.findall(line) if m not in stems]


def test_citation_rule_on_known_lines():
    names, stems = {"methods.md", "README.md"}, {"methods", "README"}
    assert _missing_citations("see OLDPLAN.md, section 2", names, stems) == ["OLDPLAN.md"]
    assert _missing_citations("(../notes/GUIDE.md)", names, stems) == ["../notes/GUIDE.md"]
    assert _missing_citations("as PLAN section 3 says", names, stems) == ["PLAN"]
    assert _missing_citations("docs/methods.md#mapo and README.md", names, stems) == []
    assert _missing_citations('out / "report.md"', names, stems) == []  # a file the code writes
    assert _missing_citations("SDXL 1.0 on 8 GPU", names, stems) == []


def test_no_reference_to_files_outside_the_repository():
    """A document a source comment, config or doc cites by name is a tracked file (by its name anywhere in
    the tree, since citations are often relative to another folder)."""
    tracked = _git_files()
    names = {Path(p).name for p in tracked}
    stems = {Path(p).stem for p in tracked if p.endswith(".md")}
    hits = []
    for rel, no, line in _tracked_lines():
        missing = _missing_citations(line, names, stems)
        if missing:
            hits.append(f"{rel}:{no}: {', '.join(missing)}: {line.strip()}")
    assert not hits, (
        "these lines cite documents that are not part of the repository (a clone lacks them); put what the "
        "reader needs in docs/ (docs/methods.md, docs/toy_world.md) and point there instead:\n" + "\n".join(hits)
    )


def test_relative_markdown_links_resolve():
    tracked = set(_git_files())
    tracked_dirs = {parent.as_posix() for p in tracked for parent in Path(p).parents}
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    problems = []
    for md in docs:
        text = md.read_text(encoding="utf-8")
        for no, line in _prose_lines(text):
            targets = INLINE_LINK.findall(line)
            ref = REFERENCE_LINK.match(line)
            if ref:
                targets.append(ref.group(1))
            for target in targets:
                if not target or re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("//"):
                    continue  # an absolute URL (https:, mailto:, ...)
                where = f"{md.relative_to(ROOT)}:{no}: ({target})"
                file_part, _, anchor = target.partition("#")
                dest = (md.parent / unquote(file_part)).resolve() if file_part else md.resolve()
                try:
                    rel = dest.relative_to(ROOT).as_posix()
                except ValueError:
                    problems.append(f"{where} points outside the repository")
                    continue
                if not dest.exists():
                    problems.append(f"{where} points to {rel}, which does not exist")
                    continue
                if file_part and not _tracked_or_parent(rel, tracked, tracked_dirs):
                    problems.append(f"{where} points to {rel}, which git does not track (a clone lacks it)")
                    continue
                if anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                    problems.append(f"{where}: {rel} has no heading with the anchor #{anchor}")
    assert not problems, "broken links in the docs:\n" + "\n".join(problems)


def test_pointers_into_docs_name_existing_sections():
    """`docs/NAME.md#anchor` written in source comments, configs and docs names a real file and heading."""
    problems = []
    anchors: dict[str, set[str]] = {}
    for rel, no, line in _tracked_lines():
        for doc, anchor in DOC_ANCHOR.findall(line):
            target = ROOT / doc
            if not target.is_file():
                problems.append(f"{rel}:{no}: {doc} does not exist")
                continue
            if doc not in anchors:
                anchors[doc] = _anchors(target)
            if anchor not in anchors[doc]:
                problems.append(f"{rel}:{no}: {doc} has no heading with the anchor #{anchor}")
    assert not problems, "pointers into the docs that lead nowhere:\n" + "\n".join(problems)
