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

# Notes that lived outside the repository and are gone for anyone who clones it: the old design and methods
# notes (also cited as "DESIGN section 1" / "DESIGN 1"), the toy-world notes, and a sibling shared/ folder.
# What they held is in docs/methods.md and docs/toy_world.md now.
STALE_REFERENCE = re.compile(
    r"DESIGN\.md|\bDESIGN(?:\s+section)?\s+\d|METHODS\.md|TOY_NOTES|\.\.[/\\]shared\b"
)

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


def test_no_reference_to_files_outside_the_repository():
    hits = []
    for rel in _git_files():
        path = ROOT / rel
        if path.resolve() == THIS:
            continue
        text = _text(path)
        if text is None:
            continue
        for no, line in enumerate(text.splitlines(), 1):
            if STALE_REFERENCE.search(line):
                hits.append(f"{rel}:{no}: {line.strip()}")
    assert not hits, (
        "these lines point to notes that are not part of the repository (DESIGN.md, METHODS.md, TOY_NOTES, "
        "../shared); point them to the right section of docs/methods.md or docs/toy_world.md instead:\n"
        + "\n".join(hits)
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
    for rel in _git_files():
        path = ROOT / rel
        if path.resolve() == THIS:
            continue
        text = _text(path)
        if text is None:
            continue
        for no, line in enumerate(text.splitlines(), 1):
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
